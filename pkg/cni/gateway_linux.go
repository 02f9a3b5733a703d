package cni

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// PodStore edits the node layer's per-pod sets in the current (host)
// network namespace. pkg/node implements it; tests inject a fake.
type PodStore interface {
	RegisterPod(p node.Pod) ([]node.Pod, error)
	UnregisterPods(match func(containerID string) bool) ([]node.Pod, error)
	ListPods() ([]node.Pod, error)
}

// nodePods is PodStore over pkg/node.
type nodePods struct{}

func (nodePods) RegisterPod(p node.Pod) ([]node.Pod, error) { return node.RegisterPod(p) }
func (nodePods) UnregisterPods(match func(string) bool) ([]node.Pod, error) {
	return node.UnregisterPods(match)
}
func (nodePods) ListPods() ([]node.Pod, error) { return node.ListPods() }

func (p *Plugin) pods() PodStore {
	if p.Pods != nil {
		return p.Pods
	}
	return nodePods{}
}

// registerPod runs at the end of ADD with nodeEnforcement, for every
// pod: it registers the pod's host side and addresses with the node
// rules (source validation), and a gateway's exemption on egress nodes.
// One read and one netlink batch on the per-pod sets; no rule is
// rewritten. It fails closed: a pod whose host side it cannot find, or
// whose link is not a veth the host stack sees (macvlan, ipvlan, a moved
// device), is refused, since the node could not enforce it.
func (p *Plugin) registerPod(inv *invocation, args *skel.CmdArgs) error {
	s := inv.s
	who := podOrNetns(inv.pod, args.Netns)
	ips, err := resultIPs(s.Conf.PrevResult)
	if err != nil {
		return withCode(types.ErrDecodingFailure, err, "")
	}
	if len(ips) == 0 {
		return withCode(types.ErrInvalidNetworkConfig, fmt.Errorf("%s: prevResult has no IP address, so the node cannot validate what the pod sends", who),
			"nodeEnforcement needs the primary plugin's addresses in prevResult")
	}
	why, refused := s.Gateways.IsGateway(inv.pod, s.Annotations)
	if refused {
		inv.log.Warn("pod asks to be an egress gateway by annotation outside gatewaySelector.allowedNamespaces: not a gateway",
			"annotation", s.Gateways.Annotation, "namespace", inv.pod.Namespace)
	}
	find := p.HostSide
	if find == nil {
		find = hostSide
	}
	port, l3, how, err := find(args.Netns, args.IfName, s.Conf.PrevResult)
	if err != nil {
		return withCode(types.ErrInvalidNetworkConfig, fmt.Errorf("%s: the node cannot enforce this pod: %w", who, err),
			"nodeEnforcement needs the pod's link to be a veth whose peer is in the host namespace (bridge, ptp, Calico, Cilium, …)")
	}
	entry := node.Pod{ContainerID: args.ContainerID, Port: port, L3: l3, IPs: ips, Gateway: why != ""}
	stale, err := p.pods().RegisterPod(entry)
	if errors.Is(err, node.ErrNotApplied) && s.NodeConfig != "" {
		// The first ADD after boot protects the node: apply the node
		// rules from the config the installer left on the host, then
		// register. Racing ADDs apply once (one winner under the lock).
		applied, aerr := p.applyNodeRules(s.NodeConfig)
		if aerr != nil {
			return withCode(types.ErrTryAgainLater, fmt.Errorf("%s: the node's egress rules are not in place and could not be applied from %s: %w", who, s.NodeConfig, aerr),
				"nodeEnforcement is on: no pod starts on a node without its rules")
		}
		if applied {
			inv.log.Warn("node rules were missing (reboot, or removed); applied them before this pod", "nodeConfig", s.NodeConfig)
		}
		stale, err = p.pods().RegisterPod(entry)
	}
	switch {
	case errors.Is(err, node.ErrNotApplied):
		return withCode(types.ErrTryAgainLater, fmt.Errorf("%s: the node's egress rules are not in place: %w", who, err),
			"nodeEnforcement is on: no pod starts on a node without its rules; the installer applies them")
	case errors.Is(err, node.ErrNotEgressNode):
		return withCode(types.ErrInvalidNetworkConfig, fmt.Errorf("%s is an egress gateway (%s): %w", who, why, err),
			"schedule egress gateways on egress nodes (nodeSelector egress-cni.io/role: egress)")
	case err != nil:
		return fmt.Errorf("%s: could not register with the node rules: %w", who, err)
	}
	if len(stale) > 0 {
		inv.log.Warn("removed stale registrations holding this pod's addresses or port (a DEL was missed)", "removed", podStrings(stale))
		if s.StateDir != "" {
			gone := map[string]bool{}
			for _, x := range stale {
				gone[x.ContainerID] = x.ContainerID != args.ContainerID
			}
			if _, err := node.RemoveIdentities(s.StateDir, func(id string) bool { return gone[id] }); err != nil {
				inv.log.Warn("could not remove the identity records of stale registrations", "error", err)
			}
		}
	}
	// The identity record names the pod in the agent's drop audit. It
	// is not enforcement: a failure to write it is logged, and the
	// audit says "unknown" for this pod's drops.
	if s.StateDir != "" {
		rec := node.Identity{ContainerID: args.ContainerID, Namespace: inv.pod.Namespace, Name: inv.pod.Name, UID: inv.pod.UID,
			Port: port, L3: l3, IPs: ips, Gateway: why != "", Created: time.Now().UTC()}
		if err := node.WriteIdentity(s.StateDir, rec); err != nil {
			inv.log.Warn("could not record the pod's identity for the drop audit", "stateDir", s.StateDir, "error", err)
		}
	}
	inv.log.Info("registered with the node rules", "port", port, "l3", l3, "found", how, "ips", ips, "gateway", why)
	return nil
}

func podStrings(ps []node.Pod) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	return out
}

// hostSide finds the host side of the pod's link: the pod's ifName
// inside its namespace names its veth peer by index (IFLA_LINK), which is
// resolved in the current (host) namespace and checked to be a veth whose
// own peer is that pod interface. If that fails (a peer in a third
// namespace), it falls back to prevResult's host interfaces that are
// veths here. l3 is the bridge the veth is a port of, or the veth itself.
func hostSide(nsPath, ifName string, prev types.Result) (port, l3, how string, err error) {
	var podIndex, peerIndex int
	var podType string
	err = netns.Do(nsPath, func() error {
		l, err := netlinksafe.LinkByName(ifName)
		if err != nil {
			return err
		}
		podType = l.Type()
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
	if err == nil && podType != "veth" {
		return "", "", "", fmt.Errorf("its interface %s is a %s, not a veth: its traffic does not cross the node's forward path", ifName, podType)
	}
	var h netlink.Link
	if err == nil && peerIndex > 0 {
		if l, e := netlink.LinkByIndex(peerIndex); e == nil && l.Type() == "veth" && l.Attrs().ParentIndex == podIndex {
			h, how = l, "veth peer"
		}
	}
	if h == nil {
		var found []netlink.Link
		for _, name := range hostInterfaces(prev) {
			if l, e := netlinksafe.LinkByName(name); e == nil && l.Type() == "veth" {
				found = append(found, l)
			}
		}
		if len(found) != 1 {
			return "", "", "", fmt.Errorf("could not find the host side of %s in %s (veth peer lookup: %v; veth host interfaces in prevResult: %d)",
				ifName, nsPath, errOr(err, "peer not in this namespace"), len(found))
		}
		h, how = found[0], "prevResult"
	}
	port, l3 = h.Attrs().Name, h.Attrs().Name
	if m := h.Attrs().MasterIndex; m > 0 {
		br, e := netlink.LinkByIndex(m)
		if e != nil {
			return "", "", "", fmt.Errorf("host veth %s has master index %d, which could not be read: %w", port, m, e)
		}
		if br.Type() != "bridge" {
			return "", "", "", fmt.Errorf("host veth %s is enslaved to %s, a %s: only bridges and routed veths are enforced", port, br.Attrs().Name, br.Type())
		}
		l3 = br.Attrs().Name
	}
	return port, l3, how, nil
}

func errOr(err error, s string) string {
	if err != nil {
		return err.Error()
	}
	return s
}

// checkRegistration verifies that the pod is registered with each of
// its addresses, as a gateway exactly when it is one.
func (p *Plugin) checkRegistration(inv *invocation, args *skel.CmdArgs) error {
	s := inv.s
	who := podOrNetns(inv.pod, args.Netns)
	ips, err := resultIPs(s.Conf.PrevResult)
	if err != nil {
		return withCode(types.ErrDecodingFailure, err, "")
	}
	why, _ := s.Gateways.IsGateway(inv.pod, s.Annotations)
	pods, err := p.pods().ListPods()
	if err != nil {
		return fmt.Errorf("%s: could not list the node's pod registrations: %w", who, err)
	}
	i := slices.IndexFunc(pods, func(x node.Pod) bool { return x.ContainerID == args.ContainerID })
	if i < 0 {
		return fmt.Errorf("%s is not registered with the node rules", who)
	}
	var missing []string
	for _, ip := range ips {
		if !slices.Contains(pods[i].IPs, ip) {
			missing = append(missing, ip.String())
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s: the node's registration lacks its address(es) %v", who, missing)
	}
	if pods[i].Gateway != (why != "") {
		return fmt.Errorf("%s: registered as gateway=%v, but the selector says gateway=%v", who, pods[i].Gateway, why != "")
	}
	return nil
}

// unregisterPod drops the container's registration. It needs neither
// prevResult nor the pod's namespace, and succeeds when there is nothing
// to drop or the node tables are absent.
func (p *Plugin) unregisterPod(inv *invocation, containerID string) error {
	removed, err := p.pods().UnregisterPods(func(id string) bool { return id == containerID })
	if err != nil {
		return fmt.Errorf("could not remove the node registration of container %s: %w", containerID, err)
	}
	if dir := inv.s.StateDir; dir != "" {
		if _, err := node.RemoveIdentities(dir, func(id string) bool { return id == containerID }); err != nil {
			inv.log.Warn("could not remove the pod's identity record", "error", err)
		}
	}
	if len(removed) > 0 {
		inv.log.Info("node registration removed", "removed", podStrings(removed))
	}
	return nil
}

// gcRegistrations drops registrations whose container is not among the
// valid attachments: pods whose DEL never came.
func (p *Plugin) gcRegistrations(inv *invocation, valid []types.GCAttachment) error {
	keep := map[string]bool{}
	for _, a := range valid {
		keep[a.ContainerID] = true
	}
	removed, err := p.pods().UnregisterPods(func(id string) bool { return !keep[id] })
	if err != nil {
		return fmt.Errorf("could not collect node registrations: %w", err)
	}
	if dir := inv.s.StateDir; dir != "" {
		if ids, err := node.RemoveIdentities(dir, func(id string) bool { return !keep[id] }); err != nil {
			inv.log.Warn("could not collect identity records", "error", err)
		} else if len(ids) > 0 {
			inv.log.Info("GC removed identity records of containers that no longer exist", "removed", ids)
		}
	}
	if len(removed) > 0 {
		inv.log.Info("GC removed node registrations of containers that no longer exist", "removed", podStrings(removed))
	}
	return nil
}
