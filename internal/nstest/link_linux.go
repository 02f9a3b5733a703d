package nstest

import (
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/egress-cni/egress-cni/internal/sockopt"
)

// LinkEnd is one end of a veth pair made by Link.
type LinkEnd struct {
	NS    ns.NetNS
	Name  string
	Addrs []netip.Prefix
}

// Link joins two namespaces of the test with a veth pair. The pair is
// created inside a.NS with its peer placed straight into b.NS, so it
// never exists in the root namespace. Each end gets its addresses (IPv6
// without DAD) and is up and ready (carrier, link-local address) on
// return. The pair dies with its namespaces.
func Link(t testing.TB, a, b LinkEnd) {
	t.Helper()
	err := a.NS.Do(func(ns.NetNS) error {
		return netlink.LinkAdd(&netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: a.Name},
			PeerName:      b.Name,
			PeerNamespace: netlink.NsFd(int(b.NS.Fd())),
		})
	})
	if err != nil {
		t.Fatalf("could not create veth %s/%s: %v", a.Name, b.Name, err)
	}
	for _, e := range []LinkEnd{a, b} {
		if err := e.NS.Do(func(ns.NetNS) error {
			_, err := setupLink(e.Name, e.Addrs...)
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range []LinkEnd{a, b} {
		if err := e.NS.Do(func(ns.NetNS) error { return waitLinkReady(e.Name) }); err != nil {
			t.Fatal(err)
		}
	}
}

// Route adds a route to dst via gw inside the namespace; dst may be a
// default route (0.0.0.0/0, ::/0).
func Route(t testing.TB, n ns.NetNS, dst netip.Prefix, gw netip.Addr) {
	t.Helper()
	err := n.Do(func(ns.NetNS) error {
		return netlink.RouteAdd(&netlink.Route{
			Dst: &net.IPNet{IP: net.IP(dst.Masked().Addr().AsSlice()), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())},
			Gw:  net.IP(gw.AsSlice()),
		})
	})
	if err != nil {
		t.Fatalf("could not add route %s via %s in %s: %v", dst, gw, n.Path(), err)
	}
}

// Sysctl sets a sysctl of the namespace, given as "net.ipv4.ip_forward"
// or "net/ipv4/ip_forward". Only net.* keys are per namespace: others
// are refused, so a test cannot change the machine.
func Sysctl(t testing.TB, n ns.NetNS, key, value string) {
	t.Helper()
	path := strings.ReplaceAll(key, ".", "/")
	if !strings.HasPrefix(path, "net/") {
		t.Fatalf("sysctl %s is not per network namespace", key)
	}
	if err := n.Do(func(ns.NetNS) error { return writeSysctl("/proc/sys/"+path, value) }); err != nil {
		t.Fatal(err)
	}
}

// OriginalDst returns a TCP connection's destination before a REDIRECT
// (SO_ORIGINAL_DST, or its IPv6 twin), for test proxies.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) { return sockopt.OriginalDst(c) }
