package sim

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// Topology is how a node's primary CNI connects pods.
type Topology int

const (
	// Bridged: the bridge plugin, every pod's veth a port of one bridge
	// that holds the pods' gateway addresses (bridge, flannel, kubenet).
	Bridged Topology = iota
	// Routed: the ptp plugin, one routed veth per pod with a host route
	// to its addresses (Calico, Cilium, kindnet).
	Routed
)

func (t Topology) String() string {
	if t == Routed {
		return "routed"
	}
	return "bridged"
}

// Options vary the simulated cluster.
type Options struct {
	Topology Topology
	// Bridge names the bridge of the Bridged topology (default cni0;
	// kubenet's is cbr0).
	Bridge string
}

// NewClusterWith is NewCluster with options: it builds the same cluster,
// then rewrites each node's primary CNI config for the topology (before
// any installer has run): for Routed, 10-bridge.conflist becomes
// 10-ptp.conflist with the ptp plugin and the same host-local ranges and
// routes; for Bridged, the bridge gets its name.
func NewClusterWith(cl *Cleanups, pluginsDir string, opts Options) (*Cluster, error) {
	c, err := NewCluster(cl, pluginsDir)
	if err != nil {
		return nil, err
	}
	for _, n := range []*Node{c.App, c.Egress} {
		if err := n.rewritePrimary(opts); err != nil {
			return nil, fmt.Errorf("%s node: %w", n.Name, err)
		}
	}
	return c, nil
}

func (n *Node) rewritePrimary(opts Options) error {
	old := filepath.Join(n.ConfDir, "10-bridge.conflist")
	b, err := os.ReadFile(old)
	if err != nil {
		return err
	}
	var list map[string]any
	if err := json.Unmarshal(b, &list); err != nil {
		return fmt.Errorf("%s: %w", old, err)
	}
	plugins, _ := list["plugins"].([]any)
	if len(plugins) != 1 {
		return fmt.Errorf("%s: expected the primary plugin alone", old)
	}
	primary, _ := plugins[0].(map[string]any)
	file := old
	switch opts.Topology {
	case Bridged:
		if opts.Bridge != "" {
			primary["bridge"] = opts.Bridge
		}
	case Routed:
		plugins[0] = map[string]any{"type": "ptp", "ipMasq": false, "mtu": 1500, "ipam": primary["ipam"]}
		file = filepath.Join(n.ConfDir, "10-ptp.conflist")
		if err := os.Remove(old); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown topology %d", opts.Topology)
	}
	out, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(file, append(out, '\n'), 0o644)
}

// PodSubnets are the node's pod ranges and their gateways, as its primary
// CNI config's host-local ranges give them.
func (n *Node) PodSubnets() (subnets []netip.Prefix, gateways []netip.Addr, err error) {
	files, err := libcni.ConfFiles(n.ConfDir, []string{".conflist"})
	if err != nil {
		return nil, nil, err
	}
	sort.Strings(files)
	if len(files) == 0 {
		return nil, nil, fmt.Errorf("no conflist in %s", n.ConfDir)
	}
	b, err := os.ReadFile(files[0])
	if err != nil {
		return nil, nil, err
	}
	var list struct {
		Plugins []struct {
			IPAM *struct {
				Ranges [][]struct {
					Subnet  string `json:"subnet"`
					Gateway string `json:"gateway"`
				} `json:"ranges"`
			} `json:"ipam"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, nil, err
	}
	for _, p := range list.Plugins {
		if p.IPAM == nil {
			continue
		}
		for _, rs := range p.IPAM.Ranges {
			for _, r := range rs {
				s, err := netip.ParsePrefix(r.Subnet)
				if err != nil {
					return nil, nil, err
				}
				g, _ := netip.ParseAddr(r.Gateway)
				subnets, gateways = append(subnets, s), append(gateways, g)
			}
		}
	}
	if len(subnets) == 0 {
		return nil, nil, fmt.Errorf("%s: no host-local ranges", files[0])
	}
	return subnets, gateways, nil
}

// HostPeer is the host-side interface of the pod's eth0 (the veth peer
// in the node's namespace) and its bridge master, if it has one.
func (p *Pod) HostPeer() (port, master string, err error) {
	var peerIndex int
	err = p.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		peerIndex = l.Attrs().ParentIndex
		if v, ok := l.(*netlink.Veth); ok && peerIndex == 0 {
			peerIndex, err = netlink.VethPeerIndex(v)
		}
		return err
	})
	if err != nil {
		return "", "", err
	}
	err = p.Node.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByIndex(peerIndex)
		if err != nil {
			return err
		}
		port = l.Attrs().Name
		if m := l.Attrs().MasterIndex; m != 0 {
			ml, err := netlink.LinkByIndex(m)
			if err != nil {
				return err
			}
			master = ml.Attrs().Name
		}
		return nil
	})
	return port, master, err
}

// NewUnregisteredPod wires a pod by hand, not through CNI, the way
// Cilium's agent does: a routed veth whose host side is hostIf (Cilium
// names them lxc…), the pod's addresses as /32 and /128 with host routes
// to them, and in the pod a default route through the node (IPv4: on
// link, via the node's uplink address, which the node answers ARP for
// on any interface; IPv6: via fe80::1 on the host side). No plugin ever
// sees it: it shows whether coverage depends on registration or names.
func (n *Node) NewUnregisteredPod(cl *Cleanups, name, hostIf string, ip4, ip6 netip.Addr) (*Pod, error) {
	p, err := n.NewPod(cl, "unregistered", name, nil)
	if err != nil {
		return nil, err
	}
	p.ID, p.IP4, p.IP6 = "", ip4, ip6
	p.GW4, p.GW6 = n.Uplink4, netip.MustParseAddr("fe80::1")
	if err := Link(
		LinkEnd{NS: n.NS, Name: hostIf, Addrs: []netip.Prefix{netip.PrefixFrom(p.GW6, 64)}},
		LinkEnd{NS: p.NS, Name: "eth0", Addrs: []netip.Prefix{netip.PrefixFrom(ip4, 32), netip.PrefixFrom(ip6, 128)}},
	); err != nil {
		return nil, err
	}
	err = n.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(hostIf)
		if err != nil {
			return err
		}
		for _, a := range []netip.Addr{ip4, ip6} {
			if err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Scope: netlink.SCOPE_LINK, Dst: hostNet(a)}); err != nil {
				return fmt.Errorf("route to %s via %s: %w", a, hostIf, err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = p.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Scope: netlink.SCOPE_LINK, Dst: hostNet(p.GW4)}); err != nil {
			return err
		}
		for _, r := range []netlink.Route{
			{LinkIndex: l.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Gw: net.IP(p.GW4.AsSlice()), Src: net.IP(ip4.AsSlice())},
			{LinkIndex: l.Attrs().Index, Dst: &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}, Gw: net.IP(p.GW6.AsSlice())},
		} {
			if err := netlink.RouteAdd(&r); err != nil {
				return fmt.Errorf("pod default route via %s: %w", r.Gw, err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return p, nil
}

// NewUnregisteredBridgePod wires a pod by hand onto the node's pod
// bridge, not through CNI: a veth whose host side (hostIf, any name:
// Antrea's are <pod>-<hash>) is a port of bridge, the pod's addresses in
// the bridge's subnets and default routes via the bridge's gateway
// addresses. No plugin ever sees it.
func (n *Node) NewUnregisteredBridgePod(cl *Cleanups, name, hostIf, bridge string, ip4, ip6 netip.Addr) (*Pod, error) {
	subs, gws, err := n.PodSubnets()
	if err != nil {
		return nil, err
	}
	p, err := n.NewPod(cl, "unregistered", name, nil)
	if err != nil {
		return nil, err
	}
	p.ID, p.IP4, p.IP6 = "", ip4, ip6
	var addrs []netip.Prefix
	for i, s := range subs {
		a := ip4
		if s.Addr().Is6() {
			a, p.GW6 = ip6, gws[i]
		} else {
			p.GW4 = gws[i]
		}
		addrs = append(addrs, netip.PrefixFrom(a, s.Bits()))
	}
	if err := Link(LinkEnd{NS: n.NS, Name: hostIf}, LinkEnd{NS: p.NS, Name: "eth0", Addrs: addrs}); err != nil {
		return nil, err
	}
	err = n.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(hostIf)
		if err != nil {
			return err
		}
		br, err := netlink.LinkByName(bridge)
		if err != nil {
			return err
		}
		return netlink.LinkSetMaster(l, br)
	})
	if err != nil {
		return nil, fmt.Errorf("%s into %s: %w", hostIf, bridge, err)
	}
	err = p.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		for _, gw := range []netip.Addr{p.GW4, p.GW6} {
			if !gw.IsValid() {
				continue
			}
			dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
			if gw.Is6() {
				dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
			}
			if err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: dst, Gw: net.IP(gw.AsSlice())}); err != nil {
				return fmt.Errorf("pod default route via %s: %w", gw, err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return p, nil
}

func hostNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

// Counters reads every named nftables counter in the node's namespace,
// keyed "family table name" ("inet egress_cni_node dropped").
func (n *Node) Counters() (map[string]uint64, error) {
	return NFTCounters(n.NS)
}

// NFTCounters reads every named nftables counter in n, keyed "family
// table name".
func NFTCounters(n ns.NetNS) (map[string]uint64, error) {
	out, err := Exec(n, "nft", "-j", "list", "counters")
	if err != nil {
		return nil, err
	}
	var doc struct {
		Nftables []struct {
			Counter *struct {
				Family  string `json:"family"`
				Table   string `json:"table"`
				Name    string `json:"name"`
				Packets uint64 `json:"packets"`
			} `json:"counter"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return nil, fmt.Errorf("nft counters %q: %w", out, err)
	}
	m := map[string]uint64{}
	for _, o := range doc.Nftables {
		if c := o.Counter; c != nil {
			m[c.Family+" "+c.Table+" "+c.Name] = c.Packets
		}
	}
	return m, nil
}
