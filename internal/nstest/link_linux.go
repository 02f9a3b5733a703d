package nstest

import (
	"net"
	"net/netip"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nscore"
)

// LinkEnd is one end of a veth pair made by Link.
type LinkEnd = nscore.LinkEnd

// Link joins two namespaces of the test with a veth pair (nscore.Link):
// created inside a.NS with its peer placed straight into b.NS, so it
// never exists in the root namespace. Each end gets its addresses (IPv6
// without DAD) and is up and ready (carrier, link-local address) on
// return. The pair dies with its namespaces.
func Link(t testing.TB, a, b LinkEnd) {
	t.Helper()
	if err := nscore.Link(a, b); err != nil {
		t.Fatal(err)
	}
}

// Route adds a route to dst via gw inside the namespace; dst may be a
// default route (0.0.0.0/0, ::/0).
func Route(t testing.TB, n ns.NetNS, dst netip.Prefix, gw netip.Addr) {
	t.Helper()
	if err := nscore.Route(n, dst, gw); err != nil {
		t.Fatal(err)
	}
}

// Sysctl sets a sysctl of the namespace, given as "net.ipv4.ip_forward"
// or "net/ipv4/ip_forward". Only net.* keys are per namespace: others
// are refused, so a test cannot change the machine.
func Sysctl(t testing.TB, n ns.NetNS, key, value string) {
	t.Helper()
	if err := nscore.Sysctl(n, key, value); err != nil {
		t.Fatal(err)
	}
}

// OriginalDst returns a TCP connection's destination before a REDIRECT
// (SO_ORIGINAL_DST, or its IPv6 twin), for test proxies.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) { return nscore.OriginalDst(c) }
