package sim

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
)

// The network of the cluster without any CNI (the drawing in
// cluster_linux.go): the internet host, the router and the nodes' uplinks
// to it. NewCluster builds its nodes on top; test/netns builds its own
// nodes (CNI chains driven by the test) on the same network through
// internal/simtest.

// NetOptions tunes NewNet.
type NetOptions struct {
	// NewNS makes the namespace of the given role ("internet",
	// "router", "app-node", ...); nil means NewNS on the Cleanups
	// (named namespaces, as `ip netns list` shows them).
	NewNS func(name string) (ns.NetNS, error)
	// CountPings makes the internet host's "seen" counter count ICMP
	// and ICMPv6 echo requests too, not only packets to EchoPort.
	CountPings bool
}

// Net is the internet host and the router, linked, with forwarding on.
type Net struct {
	Internet, Router ns.NetNS
	newNS            func(string) (ns.NetNS, error)
}

// NewNet builds the internet host and the router: linked on
// 203.0.113.0/24 and 2001:db8:ff::/64, the internet host's default routes
// via the router, forwarding on in the router, and a counter "seen"
// (table inet probe) on the internet host of what reaches its echo port,
// whatever happens to the reply (a spoofed datagram's answer goes to the
// address's real owner). No server runs yet.
func NewNet(cl *Cleanups, o NetOptions) (*Net, error) {
	w := &Net{newNS: o.NewNS}
	if w.newNS == nil {
		w.newNS = func(name string) (ns.NetNS, error) { return NewNS(cl, name) }
	}
	var err error
	if w.Internet, err = w.newNS("internet"); err != nil {
		return nil, err
	}
	if w.Router, err = w.newNS("router"); err != nil {
		return nil, err
	}
	pfx := netip.MustParsePrefix
	if err := Link(
		LinkEnd{NS: w.Router, Name: "inet0", Addrs: []netip.Prefix{pfx("203.0.113.1/24"), pfx("2001:db8:ff::1/64")}},
		LinkEnd{NS: w.Internet, Name: "eth0", Addrs: []netip.Prefix{netip.PrefixFrom(InternetV4, 24), netip.PrefixFrom(InternetV6, 64)}},
	); err != nil {
		return nil, err
	}
	for _, r := range []struct{ dst, gw string }{{"0.0.0.0/0", "203.0.113.1"}, {"::/0", "2001:db8:ff::1"}} {
		if err := Route(w.Internet, pfx(r.dst), netip.MustParseAddr(r.gw)); err != nil {
			return nil, err
		}
	}
	for _, k := range []string{"net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"} {
		if err := Sysctl(w.Router, k, "1"); err != nil {
			return nil, err
		}
	}
	rules := []string{
		"add table inet probe",
		"add counter inet probe seen",
		"add chain inet probe in { type filter hook prerouting priority -300; }",
		fmt.Sprintf("add rule inet probe in th dport %d counter name seen", EchoPort),
	}
	if o.CountPings {
		rules = append(rules,
			"add rule inet probe in icmp type echo-request counter name seen",
			"add rule inet probe in icmpv6 type echo-request counter name seen")
	}
	if _, err := Exec(w.Internet, "nft", strings.Join(rules, "\n")); err != nil {
		return nil, fmt.Errorf("internet host's packet counter: %w", err)
	}
	return w, nil
}

// NodeNet is a node's namespace and its addresses towards the router.
type NodeNet struct {
	NS               ns.NetNS
	Uplink4, Uplink6 netip.Addr
}

// WireNode makes a node's namespace (role name+"-node") and links it to
// the router: the router's routerIf holds 192.0.2.(off+1)/30 and
// 2001:db8:<first letter of name>::1/64, the node's "uplink"
// 192.0.2.(off+2)/30 and ...::2/64; the node's default routes go via the
// router, the router's routes to the node's pod subnets sub4 and sub6 via
// the node. Forwarding is on in the node, and default.accept_dad off, so
// that a bridge made later does not hold its IPv6 gateway address
// tentative.
func (w *Net) WireNode(name, routerIf string, off byte, sub4, sub6 string) (NodeNet, error) {
	n := NodeNet{Uplink4: netip.AddrFrom4([4]byte{192, 0, 2, off + 2})}
	var err error
	if n.NS, err = w.newNS(name + "-node"); err != nil {
		return n, err
	}
	r4 := netip.AddrFrom4([4]byte{192, 0, 2, off + 1})
	letter := name[:1]
	r6 := netip.MustParseAddr("2001:db8:" + letter + "::1")
	n.Uplink6 = netip.MustParseAddr("2001:db8:" + letter + "::2")
	if err := Link(
		LinkEnd{NS: w.Router, Name: routerIf, Addrs: []netip.Prefix{netip.PrefixFrom(r4, 30), netip.PrefixFrom(r6, 64)}},
		LinkEnd{NS: n.NS, Name: "uplink", Addrs: []netip.Prefix{netip.PrefixFrom(n.Uplink4, 30), netip.PrefixFrom(n.Uplink6, 64)}},
	); err != nil {
		return n, err
	}
	for _, r := range []struct {
		in  ns.NetNS
		dst string
		gw  netip.Addr
	}{{n.NS, "0.0.0.0/0", r4}, {n.NS, "::/0", r6}, {w.Router, sub4, n.Uplink4}, {w.Router, sub6, n.Uplink6}} {
		if err := Route(r.in, netip.MustParsePrefix(r.dst), r.gw); err != nil {
			return n, err
		}
	}
	for _, s := range []struct{ k, v string }{
		{"net.ipv4.ip_forward", "1"}, {"net.ipv6.conf.all.forwarding", "1"}, {"net.ipv6.conf.default.accept_dad", "0"},
	} {
		if err := Sysctl(n.NS, s.k, s.v); err != nil {
			return n, err
		}
	}
	return n, nil
}
