package node

import (
	"net"
	"net/netip"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// Link-scope multicast gets no pass around the reverse-path check: a
// datagram to ff02::1 from a source that is not routed back through its
// interface (a forged internet source, from a namespace that is no
// registered pod) is dropped as reverse-path. Control: without the node
// rules the node's listener receives it. Neighbour discovery between
// global addresses (a solicitation from a global source to the
// solicited-node group) and link-local sources still work.
func TestLinkMulticastNeedsReversePath(t *testing.T) {
	nstest.RequirePrivileged(t)
	host, peer := nstest.NewNS(t), nstest.NewNS(t)
	nstest.Link(t,
		nstest.LinkEnd{NS: host, Name: "eth1", Addrs: []netip.Prefix{netip.MustParsePrefix("2001:db8:1::1/64")}},
		nstest.LinkEnd{NS: peer, Name: "eth0", Addrs: []netip.Prefix{netip.MustParsePrefix("2001:db8:1::2/64"), netip.MustParsePrefix("2001:db8:ff::9/128")}})

	// The node's listener on every address, multicast included.
	var lc *net.UDPConn
	if err := host.Do(func(ns.NetNS) error {
		var err error
		lc, err = net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6unspecified, Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer lc.Close()
	// received sends one datagram from src in peer to dst and says
	// whether the node's listener got it.
	received := func(src, dst string) bool {
		t.Helper()
		msg := "from " + src + " to " + dst
		sendUDP(t, peer, &net.UDPAddr{IP: net.ParseIP(src)}, &net.UDPAddr{IP: net.ParseIP(dst), Port: 9999, Zone: "eth0"}, msg)
		return arrived(t, lc, msg)
	}

	mustApply(t, host, mustParse(t, `{"role":"app","podCIDRs":["10.244.0.0/16","2001:db8:10::/48"],"nodeCIDRs":["2001:db8:1::/64"]}`))
	if received("2001:db8:ff::9", "ff02::1") {
		t.Error("with the node rules, a forged internet source reached the node through ff02::1")
	}
	// Unicast between global addresses needs neighbour discovery from
	// global sources to solicited-node groups, both ways.
	if !received("2001:db8:1::2", "2001:db8:1::1") {
		t.Error("with the node rules, a unicast datagram between global addresses on one link was lost (neighbour discovery?)")
	}
	if !received("2001:db8:1::2", "ff02::1") {
		t.Error("with the node rules, an on-link global source was refused to ff02::1")
	}
	c := countersIn(t, host)
	if got := c.ByReason[ReasonReversePath][FamilyIPv6]; got != 1 {
		t.Errorf("reverse-path/ipv6 counted %d, want 1", got)
	}
	if err := in(host, Remove); err != nil {
		t.Fatal(err)
	}
	if !received("2001:db8:ff::9", "ff02::1") {
		t.Error("control: without the node rules the forged datagram did not arrive either, so the first check cannot fail")
	}
}
