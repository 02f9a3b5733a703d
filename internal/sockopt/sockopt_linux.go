// Package sockopt holds the socket tricks our test proxies, demo and
// test clients share: reading a redirected connection's original
// destination, dialing from a foreign source address, and naming why a
// dial failed.
package sockopt

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// OriginalDst returns a redirected TCP connection's destination before
// NAT: SO_ORIGINAL_DST for IPv4, IP6T_SO_ORIGINAL_DST (also 80) for IPv6.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	la, _ := c.LocalAddr().(*net.TCPAddr)
	is6 := la != nil && la.IP.To4() == nil
	var ap netip.AddrPort
	var serr error
	err = rc.Control(func(fd uintptr) {
		var sa4 unix.RawSockaddrInet4
		var sa6 unix.RawSockaddrInet6
		level, p, l := unix.SOL_IP, unsafe.Pointer(&sa4), uint32(unsafe.Sizeof(sa4))
		if is6 {
			level, p, l = unix.SOL_IPV6, unsafe.Pointer(&sa6), uint32(unsafe.Sizeof(sa6))
		}
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), unix.SO_ORIGINAL_DST, uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
		if e != 0 {
			serr = e
			return
		}
		if is6 {
			ap = netip.AddrPortFrom(netip.AddrFrom16(sa6.Addr), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa6.Port))[:]))
		} else {
			ap = netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:]))
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("no original destination for %s: %w", c.LocalAddr(), err)
	}
	return ap, nil
}

// SourceDialer sets d to dial from source, which need not be an address
// of the namespace: IP_FREEBIND lets the socket bind it and, with
// CAP_NET_ADMIN (UID 0), IP_TRANSPARENT lets the kernel send from it.
// Without CAP_NET_ADMIN the dial fails with ENETUNREACH: an unprivileged
// process cannot spoof.
func SourceDialer(d *net.Dialer, network, source string) error {
	ip := net.ParseIP(source)
	if ip == nil {
		return fmt.Errorf("bad source address %q", source)
	}
	if strings.HasPrefix(network, "udp") {
		d.LocalAddr = &net.UDPAddr{IP: ip}
	} else {
		d.LocalAddr = &net.TCPAddr{IP: ip}
	}
	d.Control = func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			level, freebind, transparent := unix.SOL_IP, unix.IP_FREEBIND, unix.IP_TRANSPARENT
			if ip.To4() == nil {
				level, freebind, transparent = unix.SOL_IPV6, unix.IPV6_FREEBIND, unix.IPV6_TRANSPARENT
			}
			serr = unix.SetsockoptInt(int(fd), level, freebind, 1)
			_ = unix.SetsockoptInt(int(fd), level, transparent, 1)
		})
		if err != nil {
			return err
		}
		return serr
	}
	return nil
}

// Classify names why a dial or read failed: refused, timeout,
// unreachable or other.
func Classify(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTUNREACH):
		return "unreachable"
	}
	return "other"
}

// Exchange is one probe, as the test clients and the demo's clients run
// it in a child process of the identity under test: dial (from source,
// if given), then for UDP send "ping\n" and return the first datagram;
// for TCP return the first line, or with untilEOF everything until the
// peer closes. Every step is bounded by timeout.
func Exchange(network, addr, source string, timeout time.Duration, untilEOF bool) ([]byte, error) {
	d := net.Dialer{Timeout: timeout}
	if source != "" {
		if err := SourceDialer(&d, network, source); err != nil {
			return nil, err
		}
	}
	c, err := d.Dial(network, addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if strings.HasPrefix(network, "udp") {
		if _, err := c.Write([]byte("ping\n")); err != nil {
			return nil, err
		}
		buf := make([]byte, 2048)
		n, err := c.Read(buf)
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
	if !untilEOF {
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return nil, err
		}
		return []byte(line), nil
	}
	b, err := io.ReadAll(c)
	if len(b) == 0 && err != nil {
		return nil, err
	}
	if len(b) == 0 {
		return nil, errors.New("connection closed without a reply")
	}
	return b, nil
}
