package nstest

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nscore"
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

	s nscore.Servers
}

// Close closes every socket and waits for the handlers to finish.
func (s *Server) Close() { s.s.Close() }

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
	t.Cleanup(s.Close)
	for _, network := range []string{"tcp4", "tcp6"} {
		host := "0.0.0.0"
		if network == "tcp6" {
			host = "::"
		}
		l := listenTCP(t, n, network, net.JoinHostPort(host, strconv.Itoa(int(port))), nil)
		s.addListener(l, func(c *net.TCPConn) string {
			return fmt.Sprintf("proxy:%d orig=%s src=%s\n", port, originalDst(c), c.RemoteAddr())
		})
	}
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
	return serveEcho(t, n, addr, &nscore.Owner{UID: uid, GID: gid})
}

func serveEcho(t testing.TB, n ns.NetNS, addr string, own *nscore.Owner) *Server {
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
	t.Cleanup(s.Close)
	for _, a := range addrs {
		fam := "4"
		if ap, err := netip.ParseAddrPort(a); err == nil && ap.Addr().Is6() {
			fam = "6"
		}
		l := listenTCP(t, n, "tcp"+fam, a, own)
		s.addListener(l, func(c *net.TCPConn) string {
			return fmt.Sprintf("%s src=%s dst=%s\n", KindDirect, c.RemoteAddr(), c.LocalAddr())
		})
		pc, err := nscore.ListenUDP(n, "udp"+fam, a, own)
		if err == nil {
			err = s.s.ServeUDPEcho(pc, func(from, dst netip.AddrPort) string {
				return fmt.Sprintf("%s src=%s dst=%s\n", KindDirect, from, dst)
			})
		}
		if err != nil {
			t.Fatalf("could not serve udp %s in %s: %v", a, n.Path(), err)
		}
		s.Addrs = append(s.Addrs, pc.LocalAddr())
	}
	return s
}

func listenTCP(t testing.TB, n ns.NetNS, network, addr string, own *nscore.Owner) *net.TCPListener {
	t.Helper()
	l, err := nscore.Listen(n, network, addr, own)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func (s *Server) addListener(l *net.TCPListener, reply func(*net.TCPConn) string) {
	s.Addrs = append(s.Addrs, l.Addr())
	s.s.Serve(l, connTimeout, func(c net.Conn) {
		_, _ = c.Write([]byte(reply(c.(*net.TCPConn))))
		// Let the client read before the close; it sends nothing, so
		// this returns at EOF or the deadline.
		_, _ = bufio.NewReader(c).ReadByte()
	})
}

// originalDst returns the connection's pre-NAT destination, or "none".
func originalDst(c *net.TCPConn) string {
	ap, err := nscore.OriginalDst(c)
	if err != nil {
		return "none"
	}
	return ap.String()
}
