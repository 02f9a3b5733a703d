package initcmd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/sockopt"
)

// ExitValidation is istio-iptables' exit code for a failed validation,
// which Istio's CNI repair controller and runbooks look for.
const ExitValidation = 126

// errValidation is the failure Run turns into ExitValidation.
var errValidation = errors.New("capture validation failed; workload is not ready for Istio: " +
	"the rules that redirect the pod's traffic to the proxy are not in place. " +
	"With a CNI plugin (egress-cni or istio-cni), this can happen when the pod was scheduled before the plugin was installed on the node: " +
	"delete the pod so that it is created again with the rules")

// probe is Istio's validation: it listens where the proxy listens
// (127.0.0.1 on the outbound and inbound capture ports, or ::1), dials
// 127.0.0.6:<probe port> (::6) from 127.0.0.1 (::1), and succeeds when a
// listener accepts that connection and reads the probe port back with
// SO_ORIGINAL_DST. It only works when the capture rules are in place:
// 127.0.0.6 is not local to the listeners' port, and only the proxy's
// own loopback connections are redirected inbound. It runs as the proxy
// (UID 1337) and needs no capability.
type probe struct {
	v6        bool
	ports     []uint16
	probePort uint16
	timeout   time.Duration
	log       *slog.Logger
}

// hostIsIPv6 picks the probe's family as istio-iptables does: the family
// of the first address that is neither loopback nor link-local. A pod
// with no such address is probed over IPv4.
func hostIsIPv6() bool {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		n, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() {
			continue
		}
		return ip.Is6()
	}
	return false
}

func (p *probe) run(ctx context.Context) error {
	listenIP, serverIP := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.6")
	if p.v6 {
		listenIP, serverIP = netip.IPv6Loopback(), netip.MustParseAddr("::6")
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()

	done := make(chan struct{}, len(p.ports))
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
		if err != nil {
			return err
		}
		return serr
	}}
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	for _, port := range p.ports {
		addr := net.JoinHostPort(listenIP.String(), strconv.Itoa(int(port)))
		l, err := lc.Listen(ctx, "tcp", addr)
		if err != nil {
			p.log.Warn("validation: cannot listen", "addr", addr, "err", err)
			continue
		}
		p.log.Info("validation: listening", "addr", addr)
		listeners = append(listeners, l)
		go p.serve(l, done)
	}
	if len(listeners) == 0 {
		return fmt.Errorf("%w: no listener available on %s ports %v", errValidation, listenIP, p.ports)
	}
	target := netip.AddrPortFrom(serverIP, p.probePort)
	go func() {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: listenIP.AsSlice()}, Timeout: time.Second}
		for ctx.Err() == nil {
			if c, err := d.DialContext(ctx, "tcp", target.String()); err == nil {
				c.Close()
			} else {
				p.log.Debug("validation: probe", "target", target, "err", err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
	select {
	case <-done:
		p.log.Info("validation passed: the capture rules are in place", "probe", target)
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%w (no probe to %s reached the proxy ports within %s)", errValidation, target, p.timeout)
	}
}

// serve accepts probes; one whose original destination port is the
// probe port proves the redirect.
func (p *probe) serve(l net.Listener, done chan<- struct{}) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		orig, err := sockopt.OriginalDst(c.(*net.TCPConn))
		c.Close()
		if err != nil {
			p.log.Debug("validation: connection without an original destination", "from", c.RemoteAddr(), "err", err)
			continue
		}
		if orig.Port() == p.probePort {
			done <- struct{}{}
			return
		}
	}
}
