package nscore

import (
	"fmt"
	"net/netip"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// Addresses of the pod topology (WirePod). They are all from
// documentation ranges (RFC 5737, RFC 3849), so a leak could never reach
// a real host.
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

// Prefix lengths of the pod's veth link.
const (
	podBitsV4 = 24
	podBitsV6 = 64
)

// PodLink names the two ends of WirePod's veth pair and what else the
// world's loopback holds.
type PodLink struct {
	// IfName is the pod's interface name; WorldIfName the world's.
	IfName, WorldIfName string
	// WorldLoopback are more addresses (host routes) on the world's
	// loopback, next to InternetIPv4 and InternetIPv6.
	WorldLoopback []netip.Addr
}

// WirePod joins a pod namespace to a "world" namespace by a veth pair:
//
//	pod                                     world
//	eth0 192.0.2.2/24  <-- veth -->  veth0 192.0.2.1/24
//	     2001:db8:1::2/64                  2001:db8:1::1/64
//	default via 192.0.2.1            lo    203.0.113.10/32
//	default via 2001:db8:1::1              2001:db8:2::10/128
//
// (with the names of l). The veth is created inside the pod namespace
// with its peer placed straight into the world namespace, so it never
// exists in the root namespace, not even briefly. IPv6 duplicate address
// detection is off on both ends, so addresses are usable at once. The
// world has no default route; the pod's default routes point only at the
// world.
func WirePod(pod, world ns.NetNS, l PodLink) error {
	if err := Link(
		LinkEnd{NS: pod, Name: l.IfName, Addrs: []netip.Prefix{netip.PrefixFrom(PodIPv4, podBitsV4), netip.PrefixFrom(PodIPv6, podBitsV6)}},
		LinkEnd{NS: world, Name: l.WorldIfName, Addrs: []netip.Prefix{netip.PrefixFrom(WorldIPv4, podBitsV4), netip.PrefixFrom(WorldIPv6, podBitsV6)}},
	); err != nil {
		return err
	}
	if err := Route(pod, netip.MustParsePrefix("0.0.0.0/0"), WorldIPv4); err != nil {
		return err
	}
	if err := Route(pod, netip.MustParsePrefix("::/0"), WorldIPv6); err != nil {
		return err
	}
	err := world.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("could not find lo: %w", err)
		}
		for _, a := range append([]netip.Addr{InternetIPv4, InternetIPv6}, l.WorldLoopback...) {
			if err := AddrAdd(lo, netip.PrefixFrom(a, a.BitLen())); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("could not set up world namespace: %w", err)
	}
	return nil
}
