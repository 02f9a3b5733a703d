package nstest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/sockopt"
)

// Reply kinds, the first word of every line the servers write.
const (
	KindProxy  = "proxy"
	KindDirect = "direct"
)

// Reply is a parsed server reply line. Servers write one of
//
//	proxy:<port> orig=<ip:port> src=<ip:port>
//	direct src=<ip:port> dst=<ip:port>
//
// where orig is the connection's destination before NAT (SO_ORIGINAL_DST,
// or "none" when conntrack has no entry), src the client as the server
// sees it and dst the server's local address.
type Reply struct {
	Kind string
	// Port is the proxy's listening port (proxy replies only).
	Port uint16
	// Orig is the pre-NAT destination (proxy replies only). Invalid when
	// the kernel returned none.
	Orig netip.AddrPort
	Src  netip.AddrPort
	Dst  netip.AddrPort
}

// ParseReply parses a line written by a ServeProxy or ServeEcho server.
func ParseReply(s string) (Reply, error) {
	var r Reply
	f := strings.Fields(s)
	if len(f) == 0 {
		return r, fmt.Errorf("empty reply")
	}
	kind, port, _ := strings.Cut(f[0], ":")
	switch kind {
	case KindProxy:
		n, err := strconv.ParseUint(port, 10, 16)
		if err != nil {
			return r, fmt.Errorf("bad proxy port in reply %q", s)
		}
		r.Port = uint16(n)
	case KindDirect:
	default:
		return r, fmt.Errorf("unknown reply %q", s)
	}
	r.Kind = kind
	for _, kv := range f[1:] {
		k, v, _ := strings.Cut(kv, "=")
		var dst *netip.AddrPort
		switch k {
		case "orig":
			dst = &r.Orig
		case "src":
			dst = &r.Src
		case "dst":
			dst = &r.Dst
		default:
			continue
		}
		if v == "none" {
			continue
		}
		ap, err := netip.ParseAddrPort(v)
		if err != nil {
			return r, fmt.Errorf("bad %s in reply %q: %w", k, s, err)
		}
		*dst = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return r, nil
}

// Server is a set of listening sockets started by ServeProxy or
// ServeEcho. It stops in t.Cleanup; Close stops it earlier.
type Server struct {
	// Addrs are the bound addresses, one per socket.
	Addrs []net.Addr

	closers []func() error
	wg      sync.WaitGroup
	once    sync.Once
}

// Close closes every socket and waits for the handlers to finish.
func (s *Server) Close() {
	s.once.Do(func() {
		for _, c := range s.closers {
			_ = c()
		}
		s.wg.Wait()
	})
}

// connTimeout bounds every server-side read and write.
const connTimeout = 2 * time.Second

// ServeProxy listens on TCP port on every IPv4 and IPv6 address of the
// namespace (two sockets, 0.0.0.0 and [::] with IPV6_V6ONLY) and answers
// each connection with
//
//	proxy:<port> orig=<ip:port> src=<ip:port>\n
//
// where orig is SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6):
// the destination the client asked for before a REDIRECT rewrote it.
// The sockets are created inside the namespace and stay bound to it.
func ServeProxy(t testing.TB, n ns.NetNS, port uint16) *Server {
	t.Helper()
	s := &Server{}
	for _, network := range []string{"tcp4", "tcp6"} {
		host := "0.0.0.0"
		if network == "tcp6" {
			host = "::"
		}
		l := listenTCP(t, n, network, net.JoinHostPort(host, strconv.Itoa(int(port))))
		s.addListener(l, func(c *net.TCPConn) string {
			return fmt.Sprintf("proxy:%d orig=%s src=%s\n", port, originalDst(c), c.RemoteAddr())
		})
	}
	t.Cleanup(s.Close)
	return s
}

// ServeEcho serves TCP and UDP on addr ("ip:port"; an empty host, ":port",
// means both 0.0.0.0 and [::]) inside the namespace, answering each TCP
// connection and each UDP datagram with
//
//	direct src=<remote ip:port> dst=<local ip:port>\n
//
// UDP replies are sent from the address each datagram was sent to
// (IP_PKTINFO), so wildcard sockets and REDIRECTed datagrams work with
// connected clients; dst is that address.
func ServeEcho(t testing.TB, n ns.NetNS, addr string) *Server {
	t.Helper()
	return serveEcho(t, n, addr, nil)
}

// ServeEchoAs is ServeEcho with sockets owned by uid:gid, as if a process
// of that user served them: the packets it sends match owner rules
// (meta skuid, -m owner) of that user. Istio's DNS proxy stand-in runs
// as the proxy UID, whose answers the DNS conntrack zones pick out.
func ServeEchoAs(t testing.TB, n ns.NetNS, addr string, uid, gid uint32) *Server {
	t.Helper()
	return serveEcho(t, n, addr, &owner{uid, gid})
}

// owner of the sockets a server creates.
type owner struct{ uid, gid uint32 }

// as runs fn, on the calling (locked) thread, with its filesystem UID and
// GID set to o's: a socket takes its owner from them.
func (o *owner) as(fn func() error) error {
	if o == nil {
		return fn()
	}
	// The raw calls return the previous IDs, to put back.
	oldGID, _, _ := unix.RawSyscall(unix.SYS_SETFSGID, uintptr(o.gid), 0, 0)
	oldUID, _, _ := unix.RawSyscall(unix.SYS_SETFSUID, uintptr(o.uid), 0, 0)
	defer func() {
		unix.RawSyscall(unix.SYS_SETFSUID, oldUID, 0, 0)
		unix.RawSyscall(unix.SYS_SETFSGID, oldGID, 0, 0)
	}()
	return fn()
}

func serveEcho(t testing.TB, n ns.NetNS, addr string, own *owner) *Server {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("bad echo address %q: %v", addr, err)
	}
	addrs := []string{addr}
	if host == "" {
		addrs = []string{net.JoinHostPort("0.0.0.0", port), net.JoinHostPort("::", port)}
	}
	s := &Server{}
	for _, a := range addrs {
		fam := "4"
		if ap, err := netip.ParseAddrPort(a); err == nil && ap.Addr().Is6() {
			fam = "6"
		}
		l := listenTCPAs(t, n, "tcp"+fam, a, own)
		s.addListener(l, func(c *net.TCPConn) string {
			return fmt.Sprintf("%s src=%s dst=%s\n", KindDirect, c.RemoteAddr(), c.LocalAddr())
		})
		var pc *net.UDPConn
		err := n.Do(func(ns.NetNS) error {
			return own.as(func() error {
				c, err := net.ListenPacket("udp"+fam, a)
				if err != nil {
					return err
				}
				pc = c.(*net.UDPConn)
				return setPktInfo(pc, fam == "6")
			})
		})
		if err != nil {
			s.Close()
			t.Fatalf("could not listen on udp %s in %s: %v", a, n.Path(), err)
		}
		s.Addrs = append(s.Addrs, pc.LocalAddr())
		s.closers = append(s.closers, pc.Close)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			buf, oob := make([]byte, 2048), make([]byte, 256)
			local := pc.LocalAddr().(*net.UDPAddr).AddrPort()
			for {
				_, oobn, _, from, err := pc.ReadMsgUDPAddrPort(buf, oob)
				if err != nil {
					return
				}
				// Answer from the address the datagram was sent to,
				// so that a connected client accepts the reply and
				// conntrack can undo a REDIRECT.
				dst, out := pktInfoReply(oob[:oobn])
				if !dst.IsValid() {
					dst = local.Addr()
				}
				msg := fmt.Sprintf("%s src=%s dst=%s\n", KindDirect, from, netip.AddrPortFrom(dst, local.Port()))
				_, _, _ = pc.WriteMsgUDPAddrPort([]byte(msg), out, from)
			}
		}()
	}
	t.Cleanup(s.Close)
	return s
}

func listenTCP(t testing.TB, n ns.NetNS, network, addr string) *net.TCPListener {
	t.Helper()
	return listenTCPAs(t, n, network, addr, nil)
}

func listenTCPAs(t testing.TB, n ns.NetNS, network, addr string, own *owner) *net.TCPListener {
	t.Helper()
	var l *net.TCPListener
	err := n.Do(func(ns.NetNS) error {
		return own.as(func() error {
			ln, err := net.Listen(network, addr)
			if err != nil {
				return err
			}
			l = ln.(*net.TCPListener)
			return nil
		})
	})
	if err != nil {
		t.Fatalf("could not listen on %s %s in %s: %v", network, addr, n.Path(), err)
	}
	return l
}

func (s *Server) addListener(l *net.TCPListener, reply func(*net.TCPConn) string) {
	s.Addrs = append(s.Addrs, l.Addr())
	s.closers = append(s.closers, l.Close)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.AcceptTCP()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(connTimeout))
				_, _ = c.Write([]byte(reply(c)))
				// Let the client read before the close; it sends
				// nothing, so this returns at EOF or the deadline.
				_, _ = bufio.NewReader(c).ReadByte()
			}()
		}
	}()
}

// originalDst returns the connection's pre-NAT destination, or "none".
func originalDst(c *net.TCPConn) string {
	ap, err := sockopt.OriginalDst(c)
	if err != nil {
		return "none"
	}
	return ap.String()
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
