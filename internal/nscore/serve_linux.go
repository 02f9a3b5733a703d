package nscore

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
	"unsafe"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/sockopt"
)

// Servers tracks listening sockets and their handler goroutines.
type Servers struct {
	mu      sync.Mutex
	closers []func() error
	wg      sync.WaitGroup
	once    sync.Once
}

// Track registers c to run at Close.
func (s *Servers) Track(c func() error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closers = append(s.closers, c)
}

// Go runs f on a goroutine that Close waits for.
func (s *Servers) Go(f func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
}

// Close closes every tracked socket and waits for the handlers, once.
func (s *Servers) Close() {
	s.once.Do(func() {
		s.mu.Lock()
		closers := s.closers
		s.mu.Unlock()
		for _, c := range closers {
			_ = c()
		}
		s.wg.Wait()
	})
}

// Serve tracks l and serves each of its connections with handle on a
// goroutine of its own, closing the connection after. A lifetime above
// zero is the connection's deadline.
func (s *Servers) Serve(l net.Listener, lifetime time.Duration, handle func(net.Conn)) {
	s.Track(l.Close)
	s.Go(func() {
		AcceptLoop(l, func(c net.Conn) bool {
			s.Go(func() {
				defer c.Close()
				if lifetime > 0 {
					_ = c.SetDeadline(time.Now().Add(lifetime))
				}
				handle(c)
			})
			return true
		})
	})
}

// AcceptLoop accepts connections on l and hands each to handle until l
// is closed or handle returns false. Other accept errors are retried.
func AcceptLoop(l net.Listener, handle func(net.Conn) bool) {
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		if !handle(c) {
			return
		}
	}
}

// Owner is the UID and GID a server's sockets are created as.
type Owner struct{ UID, GID uint32 }

// As runs fn, on the calling (locked) thread, with its filesystem UID and
// GID set to o's: a socket takes its owner from them. A nil o runs fn as
// is.
func (o *Owner) As(fn func() error) error {
	if o == nil {
		return fn()
	}
	// The raw calls return the previous IDs, to put back.
	oldGID, _, _ := unix.RawSyscall(unix.SYS_SETFSGID, uintptr(o.GID), 0, 0)
	oldUID, _, _ := unix.RawSyscall(unix.SYS_SETFSUID, uintptr(o.UID), 0, 0)
	defer func() {
		// setfsuid and setfsgid report no error, only the previous ID.
		_, _, _ = unix.RawSyscall(unix.SYS_SETFSUID, oldUID, 0, 0)
		_, _, _ = unix.RawSyscall(unix.SYS_SETFSGID, oldGID, 0, 0)
	}()
	return fn()
}

// Listen listens on a TCP network and address inside n, the socket owned
// by own (nil: this process).
func Listen(n ns.NetNS, network, addr string, own *Owner) (*net.TCPListener, error) {
	return listenIn(n, network, addr, own, func() (*net.TCPListener, error) {
		l, err := net.Listen(network, addr)
		if err != nil {
			return nil, err
		}
		return l.(*net.TCPListener), nil
	})
}

// ListenUDP is Listen for UDP.
func ListenUDP(n ns.NetNS, network, addr string, own *Owner) (*net.UDPConn, error) {
	return listenIn(n, network, addr, own, func() (*net.UDPConn, error) {
		c, err := net.ListenPacket(network, addr)
		if err != nil {
			return nil, err
		}
		return c.(*net.UDPConn), nil
	})
}

// listenIn runs listen inside n as own.
func listenIn[T any](n ns.NetNS, network, addr string, own *Owner, listen func() (T, error)) (T, error) {
	var sock T
	err := n.Do(func(ns.NetNS) error {
		return own.As(func() error {
			var err error
			sock, err = listen()
			return err
		})
	})
	if err != nil {
		return sock, fmt.Errorf("could not listen on %s %s in %s: %w", network, addr, n.Path(), err)
	}
	return sock, nil
}

// ServeUDPEcho tracks pc and answers every datagram with reply(from,
// dst), from the address the datagram was sent to (IP_PKTINFO or
// IPV6_PKTINFO), so that wildcard sockets and REDIRECTed datagrams work
// with connected clients; dst is that address with pc's port.
func (s *Servers) ServeUDPEcho(pc *net.UDPConn, reply func(from, dst netip.AddrPort) string) error {
	s.Track(pc.Close)
	local := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	if err := setPktInfo(pc, local.Addr().Is6() && !local.Addr().Is4In6()); err != nil {
		return err
	}
	s.Go(func() {
		buf, oob := make([]byte, 2048), make([]byte, 256)
		for {
			_, oobn, _, from, err := pc.ReadMsgUDPAddrPort(buf, oob)
			if err != nil {
				return
			}
			// Answer from the address the datagram was sent to, so
			// that a connected client accepts the reply and conntrack
			// can undo a REDIRECT.
			dst, out := pktInfoReply(oob[:oobn])
			if !dst.IsValid() {
				dst = local.Addr()
			}
			msg := reply(from, netip.AddrPortFrom(dst, local.Port()))
			_, _, _ = pc.WriteMsgUDPAddrPort([]byte(msg), out, from)
		}
	})
	return nil
}

// setPktInfo asks for the destination address of each datagram.
func setPktInfo(c *net.UDPConn, v6 bool) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		if v6 {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// pktInfoReply returns the destination address of a received datagram
// and the control message that makes the reply leave from it.
func pktInfoReply(oob []byte) (netip.Addr, []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return netip.Addr{}, nil
	}
	for _, m := range msgs {
		switch {
		case m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_PKTINFO && len(m.Data) >= unix.SizeofInet4Pktinfo:
			info := (*unix.Inet4Pktinfo)(unsafe.Pointer(&m.Data[0]))
			return netip.AddrFrom4(info.Addr), unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: info.Addr})
		case m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_PKTINFO && len(m.Data) >= unix.SizeofInet6Pktinfo:
			info := (*unix.Inet6Pktinfo)(unsafe.Pointer(&m.Data[0]))
			return netip.AddrFrom16(info.Addr), unix.PktInfo6(&unix.Inet6Pktinfo{Addr: info.Addr})
		}
	}
	return netip.Addr{}, nil
}

// DialIn connects from inside n (the socket stays there), within
// timeout.
func DialIn(n ns.NetNS, network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	return c, err
}

// Relay copies both ways between a and b until either side is done, at
// most for lifetime, and closes both.
func Relay(a, b net.Conn, lifetime time.Duration) {
	deadline := time.Now().Add(lifetime)
	_ = a.SetDeadline(deadline)
	_ = b.SetDeadline(deadline)
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(a, b); done <- struct{}{} }()
	go func() { _, _ = io.Copy(b, a); done <- struct{}{} }()
	<-done
	a.Close()
	b.Close()
	<-done
}

// OriginalDst returns a redirected TCP connection's destination before
// NAT: SO_ORIGINAL_DST, or for IPv6 IP6T_SO_ORIGINAL_DST.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) { return sockopt.OriginalDst(c) }
