package nstest

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/netwait"
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
	err := p.NS.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: p.IfName},
			PeerName:      p.WorldIfName,
			PeerNamespace: netlink.NsFd(int(p.World.Fd())),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("could not create veth %s/%s: %w", p.IfName, p.WorldIfName, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	err = p.NS.Do(func(ns.NetNS) error {
		link, err := setupLink(p.IfName,
			netip.PrefixFrom(PodIPv4, linkBitsV4), netip.PrefixFrom(PodIPv6, linkBitsV6))
		if err != nil {
			return err
		}
		for _, gw := range []netip.Addr{WorldIPv4, WorldIPv6} {
			r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: net.IP(gw.AsSlice())}
			if gw.Is4() {
				r.Dst = &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
			} else {
				r.Dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
			}
			if err := netlink.RouteAdd(r); err != nil {
				return fmt.Errorf("could not add default route via %s: %w", gw, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("could not set up pod namespace: %v", err)
	}

	err = p.World.Do(func(ns.NetNS) error {
		if _, err := setupLink(p.WorldIfName,
			netip.PrefixFrom(WorldIPv4, linkBitsV4), netip.PrefixFrom(WorldIPv6, linkBitsV6)); err != nil {
			return err
		}
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("could not find lo: %w", err)
		}
		for _, a := range []netip.Addr{InternetIPv4, InternetIPv6} {
			if err := addrAdd(lo, netip.PrefixFrom(a, a.BitLen())); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("could not set up world namespace: %v", err)
	}
	for _, side := range []struct {
		n      ns.NetNS
		ifName string
	}{{p.NS, p.IfName}, {p.World, p.WorldIfName}} {
		if err := side.n.Do(func(ns.NetNS) error { return waitLinkReady(side.ifName) }); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func waitLinkReady(name string) error { return netwait.LinkReady(name) }

// setupLink turns DAD off, adds the addresses and brings the link up. It
// runs inside the link's namespace.
func setupLink(name string, addrs ...netip.Prefix) (netlink.Link, error) {
	// accept_dad=0 before the link goes up also covers the link-local
	// address, which nodad on our own addresses does not.
	if err := writeSysctl("/proc/sys/net/ipv6/conf/"+name+"/accept_dad", "0"); err != nil {
		return nil, err
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("could not find %s: %w", name, err)
	}
	for _, a := range addrs {
		if err := addrAdd(link, a); err != nil {
			return nil, err
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("could not bring %s up: %w", name, err)
	}
	return link, nil
}

func addrAdd(link netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := netlink.AddrAdd(link, a); err != nil {
		return fmt.Errorf("could not add %s to %s: %w", p, link.Attrs().Name, err)
	}
	return nil
}

// writeSysctl writes a /proc/sys/net file. Opened from a thread inside a
// namespace, /proc/sys/net belongs to that namespace.
func writeSysctl(path, value string) error {
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("could not set %s=%s: %w", path, value, err)
	}
	return nil
}
