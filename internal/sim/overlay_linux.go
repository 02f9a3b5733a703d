package sim

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nscore"
)

// Flannel's VXLAN backend, as it sets up every node: a VXLAN device
// flannel.1 (VNI 1, UDP 8472, the node's address as the local end, no
// learning), holding the first address of the node's pod subnet, and for
// every other node a route to its pod subnet via its VTEP address on
// flannel.1 (onlink), a permanent neighbour entry giving that address the
// other VTEP's MAC (flannel publishes it in the Node annotation
// flannel.alpha.coreos.com/backend-data) and a forwarding entry sending
// that MAC to the other node's address. Pod traffic between the nodes
// then goes through the overlay. Like flannel, nothing restricts who may
// send the device a datagram: it decapsulates what anyone sends to UDP
// 8472 of a node address, with whatever inner source.
const (
	FlannelDevice        = "flannel.1"
	FlannelVNI    uint32 = 1
	FlannelPort   uint16 = 8472
)

// VTEP is one node's end of the overlay.
type VTEP struct {
	Node *Node
	MAC  net.HardwareAddr
	// Addr4 and Addr6 are the device's addresses (flannel gives it the
	// pod subnet's network address; the IPv6 one is ::f1 of the subnet).
	Addr4, Addr6 netip.Addr
	// Underlay is where other nodes send its datagrams (the uplink
	// address).
	Underlay netip.AddrPort
	// Subnets are the node's pod subnets, routed to it through the
	// overlay.
	Subnets []netip.Prefix
}

// Flannel is the overlay of a cluster.
type Flannel struct {
	VTEPs []VTEP
}

// VTEP returns n's end of the overlay.
func (f *Flannel) VTEP(n *Node) VTEP {
	for _, v := range f.VTEPs {
		if v.Node == n {
			return v
		}
	}
	return VTEP{}
}

// FlannelOptions vary the overlay.
type FlannelOptions struct {
	// IPMasq programs flannel's --ip-masq rules (its default manifest's
	// setting), in a table of their own (ip and ip6 flannel-sim): traffic
	// between pod subnets keeps its addresses, traffic from a pod to
	// anything else (another node's address, the internet) is
	// masqueraded, except what kube-proxy marked 0x4000 (kube-proxy
	// masquerades that itself).
	IPMasq bool
}

// FlannelTable is the table of the ip-masq rules.
const FlannelTable = "flannel-sim"

// InstallFlannel sets up the overlay on both nodes of c, without
// ip-masq. The devices die with the nodes' namespaces.
func InstallFlannel(c *Cluster) (*Flannel, error) { return InstallFlannelWith(c, FlannelOptions{}) }

// InstallFlannelWith is InstallFlannel with options.
func InstallFlannelWith(c *Cluster, opts FlannelOptions) (*Flannel, error) {
	f := &Flannel{}
	for i, n := range []*Node{c.App, c.Egress} {
		subs, _, err := n.PodSubnets()
		if err != nil {
			return nil, err
		}
		v := VTEP{Node: n, MAC: net.HardwareAddr{0x02, 0xf1, 0x00, 0x00, 0x00, byte(i + 1)},
			Underlay: netip.AddrPortFrom(n.Uplink4, FlannelPort), Subnets: subs}
		for _, s := range subs {
			if s.Addr().Is4() {
				v.Addr4 = s.Masked().Addr()
			} else {
				b := s.Masked().Addr().As16()
				b[15] = 0xf1
				v.Addr6 = netip.AddrFrom16(b)
			}
		}
		if err := n.NS.Do(func(ns.NetNS) error { return v.create() }); err != nil {
			return nil, fmt.Errorf("%s on the %s node: %w", FlannelDevice, n.Name, err)
		}
		f.VTEPs = append(f.VTEPs, v)
	}
	for _, local := range f.VTEPs {
		for _, remote := range f.VTEPs {
			if remote.Node == local.Node {
				continue
			}
			if err := local.Node.NS.Do(func(ns.NetNS) error { return local.addPeer(remote) }); err != nil {
				return nil, fmt.Errorf("%s on the %s node, peer %s: %w", FlannelDevice, local.Node.Name, remote.Node.Name, err)
			}
		}
	}
	if opts.IPMasq {
		for _, v := range f.VTEPs {
			if _, err := execStdin(v.Node.NS, f.masqRules(v), "nft", "-f", "-"); err != nil {
				return nil, fmt.Errorf("flannel ip-masq on the %s node: %w", v.Node.Name, err)
			}
		}
	}
	return f, nil
}

// masqRules are flannel's ip-masq rules on local's node: traffic within
// the pod network, and from outside into the node's own pod subnet,
// keeps its addresses; what pods send out of the pod network, and what
// enters another node's pod subnet from outside it, is masqueraded.
func (f *Flannel) masqRules(local VTEP) string {
	var b strings.Builder
	for _, fam := range []string{"ip", "ip6"} {
		var all, mine []string
		for _, v := range f.VTEPs {
			for _, s := range v.Subnets {
				if s.Addr().Is6() == (fam == "ip6") {
					all = append(all, s.Masked().String())
					if v.Node == local.Node {
						mine = append(mine, s.Masked().String())
					}
				}
			}
		}
		if len(all) == 0 || len(mine) == 0 {
			continue
		}
		podnet, own := "{ "+strings.Join(all, ", ")+" }", "{ "+strings.Join(mine, ", ")+" }"
		mcast := "224.0.0.0/4"
		if fam == "ip6" {
			mcast = "ff00::/8"
		}
		fmt.Fprintf(&b, "add table %[1]s %[2]s\ndelete table %[1]s %[2]s\ntable %[1]s %[2]s {\n", fam, FlannelTable)
		writeChain(&b, "postrouting", "type nat hook postrouting priority srcnat; policy accept;", []string{
			"meta mark & 0x4000 == 0x4000 return",
			fmt.Sprintf("%[1]s saddr %[2]s %[1]s daddr %[3]s return", fam, own, podnet),
			fmt.Sprintf("%[1]s saddr %[2]s %[1]s daddr %[3]s return", fam, podnet, own),
			fmt.Sprintf("%[1]s saddr != %[2]s %[1]s daddr %[3]s return", fam, podnet, own),
			fmt.Sprintf("%[1]s saddr %[2]s %[1]s daddr != %[3]s masquerade", fam, podnet, mcast),
			fmt.Sprintf("%[1]s saddr != %[2]s %[1]s daddr %[2]s masquerade", fam, podnet),
		})
		b.WriteString("}\n")
	}
	return b.String()
}

func (v VTEP) create() error {
	up, err := netlink.LinkByName("uplink")
	if err != nil {
		return err
	}
	dev := &netlink.Vxlan{
		LinkAttrs:    netlink.LinkAttrs{Name: FlannelDevice, MTU: 1450, HardwareAddr: v.MAC},
		VxlanId:      int(FlannelVNI),
		VtepDevIndex: up.Attrs().Index,
		SrcAddr:      net.IP(v.Underlay.Addr().AsSlice()),
		Port:         int(FlannelPort),
		Learning:     false,
	}
	if err := netlink.LinkAdd(dev); err != nil {
		return fmt.Errorf("could not create %s: %w", FlannelDevice, err)
	}
	if err := nscore.WriteSysctl("/proc/sys/net/ipv6/conf/"+FlannelDevice+"/accept_dad", "0"); err != nil {
		return err
	}
	l, err := netlink.LinkByName(FlannelDevice)
	if err != nil {
		return err
	}
	for _, a := range []netip.Addr{v.Addr4, v.Addr6} {
		if !a.IsValid() {
			continue
		}
		addr := &netlink.Addr{IPNet: hostNet(a)}
		if a.Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(l, addr); err != nil {
			return fmt.Errorf("could not add %s to %s: %w", a, FlannelDevice, err)
		}
	}
	// Up at once (a VXLAN device's operstate stays unknown; its
	// neighbours are permanent entries, so nothing waits for it).
	return netlink.LinkSetUp(l)
}

func (v VTEP) addPeer(remote VTEP) error {
	l, err := netlink.LinkByName(FlannelDevice)
	if err != nil {
		return err
	}
	idx := l.Attrs().Index
	// The forwarding entry: remote's MAC lives at remote's node address.
	if err := netlink.NeighSet(&netlink.Neigh{
		LinkIndex: idx, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT, Flags: netlink.NTF_SELF,
		IP: net.IP(remote.Underlay.Addr().AsSlice()), HardwareAddr: remote.MAC,
	}); err != nil {
		return fmt.Errorf("fdb entry: %w", err)
	}
	for _, s := range remote.Subnets {
		gw := remote.Addr4
		fam := netlink.FAMILY_V4
		if s.Addr().Is6() {
			gw, fam = remote.Addr6, netlink.FAMILY_V6
		}
		if err := netlink.NeighSet(&netlink.Neigh{
			LinkIndex: idx, Family: fam, State: netlink.NUD_PERMANENT, IP: net.IP(gw.AsSlice()), HardwareAddr: remote.MAC,
		}); err != nil {
			return fmt.Errorf("neighbour %s: %w", gw, err)
		}
		if err := netlink.RouteAdd(&netlink.Route{
			LinkIndex: idx, Dst: &net.IPNet{IP: net.IP(s.Masked().Addr().AsSlice()), Mask: net.CIDRMask(s.Bits(), s.Addr().BitLen())},
			Gw: net.IP(gw.AsSlice()), Flags: int(netlink.FLAG_ONLINK),
		}); err != nil {
			return fmt.Errorf("route %s via %s: %w", s, gw, err)
		}
	}
	return nil
}
