package cni

import (
	"errors"
	"fmt"
	"slices"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"

	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// GatewayStore edits the node layer's gateway sets in the current (host)
// network namespace. pkg/node implements it; tests inject a fake.
type GatewayStore interface {
	AddGateways(gws ...node.Gateway) error
	RemoveGateways(match func(node.Gateway) bool) ([]node.Gateway, error)
	ListGateways() ([]node.Gateway, error)
}

// nodeGateways is GatewayStore over pkg/node.
type nodeGateways struct{}

func (nodeGateways) AddGateways(gws ...node.Gateway) error { return node.AddGateways(gws...) }
func (nodeGateways) RemoveGateways(match func(node.Gateway) bool) ([]node.Gateway, error) {
	return node.RemoveGateways(match)
}

func (nodeGateways) ListGateways() ([]node.Gateway, error) { return node.ListGateways() }

func (p *Plugin) gateways() GatewayStore {
	if p.Gateways != nil {
		return p.Gateways
	}
	return nodeGateways{}
}

// addGatewayMembership runs at the end of ADD with nodeEnforcement. For a
// gateway pod it adds an (host interface, address) pair per address of
// the pod, after dropping entries of another container that hold one of
// those addresses; for any other pod it only drops such stale entries, so
// an ordinary pod that reuses a departed gateway's address (a DEL that
// never came) does not inherit its exemption. Each is one netlink batch
// on the gateway sets: no rule is rewritten.
func (p *Plugin) addGatewayMembership(inv *invocation, args *skel.CmdArgs) error {
	s := inv.s
	ips, err := resultIPs(s.Conf.PrevResult)
	if err != nil {
		return withCode(types.ErrDecodingFailure, err, "")
	}
	why := s.Gateways.IsGateway(inv.pod, s.Annotations)
	store := p.gateways()
	stale := func(g node.Gateway) bool {
		return g.ContainerID != args.ContainerID && slices.Contains(ips, g.IP)
	}
	if why == "" {
		if len(ips) == 0 {
			return nil
		}
		removed, err := store.RemoveGateways(stale)
		if err != nil {
			return fmt.Errorf("%s: could not remove stale gateway entries of its addresses: %w", podOrNetns(inv.pod, args.Netns), err)
		}
		if len(removed) > 0 {
			inv.log.Warn("removed stale gateway entries holding this pod's addresses (a DEL was missed)", "removed", gatewayStrings(removed))
		}
		return nil
	}
	who := podOrNetns(inv.pod, args.Netns)
	if len(ips) == 0 {
		return withCode(types.ErrInvalidNetworkConfig, fmt.Errorf("%s is an egress gateway (%s) but prevResult has no IP address to exempt", who, why), "")
	}
	iface, how, err := hostInterface(args.Netns, args.IfName, s.Conf.PrevResult)
	if err != nil {
		return fmt.Errorf("%s is an egress gateway (%s): %w", who, why, err)
	}
	gws := make([]node.Gateway, 0, len(ips))
	for _, ip := range ips {
		gws = append(gws, node.Gateway{Iface: iface, IP: ip, ContainerID: args.ContainerID})
	}
	removed, err := store.RemoveGateways(stale)
	if err != nil {
		return fmt.Errorf("%s: could not remove stale gateway entries of its addresses: %w", who, err)
	}
	if err := store.AddGateways(gws...); err != nil {
		if errors.Is(err, node.ErrNotApplied) {
			return withCode(types.ErrTryAgainLater, fmt.Errorf("%s is an egress gateway (%s) but the node's egress rules are not in place: %w", who, why, err),
				"nodeEnforcement is on: apply the node rules (egress-node apply, or the installer) before gateway pods start")
		}
		return fmt.Errorf("%s: could not exempt gateway %s: %w", who, iface, err)
	}
	inv.log.Info("gateway exempted", "gateway", why, "iface", iface, "ifaceFrom", how, "ips", ips,
		"staleRemoved", gatewayStrings(removed))
	return nil
}

func gatewayStrings(gws []node.Gateway) []string {
	out := make([]string, len(gws))
	for i, g := range gws {
		out[i] = g.String()
	}
	return out
}

// hostInterface finds the host-side interface of the pod's link, for any
// veth-based primary CNI: the pod's ifName inside its namespace names its
// veth peer by index (IFLA_LINK), which is resolved in the current (host)
// namespace and checked to be a veth whose own peer is that pod
// interface. If that fails (another link type, a peer in a third
// namespace), it falls back to prevResult's host interfaces that are
// veths here. It says which way it found the name.
func hostInterface(nsPath, ifName string, prev types.Result) (string, string, error) {
	var podIndex, peerIndex int
	err := netns.Do(nsPath, func() error {
		l, err := netlink.LinkByName(ifName)
		if err != nil {
			return err
		}
		podIndex = l.Attrs().Index
		peerIndex = l.Attrs().ParentIndex
		if v, ok := l.(*netlink.Veth); ok && peerIndex == 0 {
			peerIndex, err = netlink.VethPeerIndex(v)
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil && peerIndex > 0 {
		if h, err := netlink.LinkByIndex(peerIndex); err == nil && h.Type() == "veth" && h.Attrs().ParentIndex == podIndex {
			return h.Attrs().Name, "veth peer", nil
		}
	}
	var found []string
	for _, name := range hostInterfaces(prev) {
		if h, err := netlink.LinkByName(name); err == nil && h.Type() == "veth" {
			found = append(found, name)
		}
	}
	if len(found) == 1 {
		return found[0], "prevResult", nil
	}
	return "", "", fmt.Errorf("could not find the host-side interface of %s in %s (veth peer lookup: %v; veth host interfaces in prevResult: %q)",
		ifName, nsPath, errOr(err, "peer not in this namespace"), found)
}

func errOr(err error, s string) string {
	if err != nil {
		return err.Error()
	}
	return s
}

// checkGatewayMembership verifies that a gateway pod holds an entry for
// each of its addresses, with its container ID. Other pods are not
// checked: an entry of theirs would be removed by their next ADD.
func (p *Plugin) checkGatewayMembership(inv *invocation, args *skel.CmdArgs) error {
	s := inv.s
	why := s.Gateways.IsGateway(inv.pod, s.Annotations)
	if why == "" {
		return nil
	}
	who := podOrNetns(inv.pod, args.Netns)
	ips, err := resultIPs(s.Conf.PrevResult)
	if err != nil {
		return withCode(types.ErrDecodingFailure, err, "")
	}
	gws, err := p.gateways().ListGateways()
	if err != nil {
		return fmt.Errorf("%s is an egress gateway (%s): could not list the node's gateway sets: %w", who, why, err)
	}
	var missing []string
	for _, ip := range ips {
		if !slices.ContainsFunc(gws, func(g node.Gateway) bool { return g.IP == ip && g.ContainerID == args.ContainerID }) {
			missing = append(missing, ip.String())
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s is an egress gateway (%s) but the node's gateway sets lack its address(es) %v", who, why, missing)
	}
	return nil
}

// delGatewayMembership drops the container's gateway entries. It needs
// neither prevResult nor the pod's namespace, and succeeds when there is
// nothing to drop or the node tables are absent.
func (p *Plugin) delGatewayMembership(inv *invocation, containerID string) error {
	removed, err := p.gateways().RemoveGateways(func(g node.Gateway) bool { return g.ContainerID == containerID })
	if err != nil {
		return fmt.Errorf("could not remove gateway entries of container %s: %w", containerID, err)
	}
	if len(removed) > 0 {
		inv.log.Info("gateway entries removed", "removed", gatewayStrings(removed))
	}
	return nil
}

// gcGatewayMembership drops entries whose container is not among the
// valid attachments: gateways whose DEL never came.
func (p *Plugin) gcGatewayMembership(inv *invocation, valid []types.GCAttachment) error {
	keep := map[string]bool{}
	for _, a := range valid {
		keep[a.ContainerID] = true
	}
	removed, err := p.gateways().RemoveGateways(func(g node.Gateway) bool { return !keep[g.ContainerID] })
	if err != nil {
		return fmt.Errorf("could not collect gateway entries: %w", err)
	}
	if len(removed) > 0 {
		inv.log.Info("GC removed gateway entries of containers that no longer exist", "removed", gatewayStrings(removed))
	}
	return nil
}
