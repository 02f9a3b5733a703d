package nstest

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/egress-cni/egress-cni/internal/nscore"
)

// Addresses of the pod topology. They are all from documentation ranges
// (RFC 5737, RFC 3849), so a leak could never reach a real host.
var (
	// PodIPv4 and PodIPv6 are on the pod's end of the veth.
	PodIPv4 = netip.MustParseAddr("192.0.2.2")
	PodIPv6 = netip.MustParseAddr("2001:db8:1::2")
	// WorldIPv4 and WorldIPv6 are on the world's end; they are the pod's
	// default gateways.
	WorldIPv4 = netip.MustParseAddr("192.0.2.1")
	WorldIPv6 = netip.MustParseAddr("2001:db8:1::1")
	// InternetIPv4 and InternetIPv6 stand for a destination outside the
	// cluster. They live on the world's loopback, so the pod reaches them
	// through its default route.
	InternetIPv4 = netip.MustParseAddr("203.0.113.10")
	InternetIPv6 = netip.MustParseAddr("2001:db8:2::10")
)

// Prefix lengths of the veth link.
const (
	linkBitsV4 = 24
	linkBitsV6 = 64
)

// PodOptions tunes NewPod. The zero value gives the layout described on
// Pod.
type PodOptions struct {
	// IfName is the pod's interface name. Default "eth0".
	IfName string
	// WorldIfName is the world's interface name. Default "veth0".
	WorldIfName string
}

// Pod is a pod network namespace joined to a "world" namespace by a veth
// pair:
//
//	pod (NS)                                world (World)
//	eth0 192.0.2.2/24  <-- veth -->  veth0 192.0.2.1/24
//	     2001:db8:1::2/64                  2001:db8:1::1/64
//	default via 192.0.2.1            lo    203.0.113.10/32
//	default via 2001:db8:1::1              2001:db8:2::10/128
//
// IPv6 duplicate address detection is off on both ends, so addresses are
// usable at once. The world has no default route; the pod's default
// routes point only at the world.
type Pod struct {
	// NS is the pod's network namespace; apply capture rules here.
	NS ns.NetNS
	// World is the peer namespace standing for the node and everything
	// beyond it.
	World ns.NetNS
	// IfName and WorldIfName are the two ends of the veth pair.
	IfName      string
	WorldIfName string
}

// NewPod builds the topology described on Pod. Both namespaces and the
// veth pair go away in t.Cleanup.
func NewPod(t testing.TB, opts PodOptions) *Pod {
	t.Helper()
	p := &Pod{IfName: opts.IfName, WorldIfName: opts.WorldIfName}
	if p.IfName == "" {
		p.IfName = "eth0"
	}
	if p.WorldIfName == "" {
		p.WorldIfName = "veth0"
	}
	p.World = NewNS(t)
	p.NS = NewNS(t)

	// The veth is created inside the pod namespace with its peer placed
	// straight into the world namespace, so it never exists in the root
	// namespace, not even briefly.
	Link(t,
		LinkEnd{NS: p.NS, Name: p.IfName, Addrs: []netip.Prefix{netip.PrefixFrom(PodIPv4, linkBitsV4), netip.PrefixFrom(PodIPv6, linkBitsV6)}},
		LinkEnd{NS: p.World, Name: p.WorldIfName, Addrs: []netip.Prefix{netip.PrefixFrom(WorldIPv4, linkBitsV4), netip.PrefixFrom(WorldIPv6, linkBitsV6)}})
	Route(t, p.NS, netip.MustParsePrefix("0.0.0.0/0"), WorldIPv4)
	Route(t, p.NS, netip.MustParsePrefix("::/0"), WorldIPv6)
	err := p.World.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("could not find lo: %w", err)
		}
		for _, a := range []netip.Addr{InternetIPv4, InternetIPv6} {
			if err := nscore.AddrAdd(lo, netip.PrefixFrom(a, a.BitLen())); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("could not set up world namespace: %v", err)
	}
	return p
}
