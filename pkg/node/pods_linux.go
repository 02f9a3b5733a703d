package node

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Pod is what the node rules know of one pod: its host side and its
// addresses, written by the CNI plugin at ADD. Every element carries the
// container ID as its comment, so DEL (without a prevResult) and GC find
// a container's elements.
type Pod struct {
	ContainerID string
	// Port is the pod's host-side veth.
	Port string
	// L3 is the interface the host routes the pod through: the bridge
	// the veth is a port of (bridge, flannel, kubenet), or the veth
	// itself (ptp, Calico, Cilium).
	L3  string
	IPs []netip.Addr
	// Gateway: the pod is a registered egress gateway (egress nodes
	// only).
	Gateway bool
}

// Routed says the pod's veth is its L3 interface (no bridge).
func (p Pod) Routed() bool { return p.L3 == p.Port }

func (p Pod) String() string {
	g := ""
	if p.Gateway {
		g = ", gateway"
	}
	return fmt.Sprintf("%s via %s %v (container %s%s)", p.Port, p.L3, p.IPs, shortID(p.ContainerID), g)
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// ErrNotApplied says the node tables are missing: pod registration needs
// `egress-node apply` (or the installer) to have run first.
var ErrNotApplied = errors.New("node rules are not applied (table inet " + Table + " is missing); run egress-node apply first")

// ErrNotEgressNode refuses a gateway on a node whose role is app.
var ErrNotEgressNode = errors.New("this node's role is app: egress gateways are honoured only on egress nodes (node config role \"egress\")")

func (p Pod) validate() error {
	for _, n := range []string{p.Port, p.L3} {
		if n == "" || len(n) >= ifNameSize {
			return fmt.Errorf("invalid pod host interface %q (port %q, l3 %q)", n, p.Port, p.L3)
		}
	}
	if len(p.IPs) == 0 {
		return fmt.Errorf("pod on %s has no address to register", p.Port)
	}
	for _, ip := range p.IPs {
		if !ip.IsValid() || ip.Zone() != "" || ip.Is4In6() {
			return fmt.Errorf("invalid pod address %v on %s", ip, p.Port)
		}
	}
	return nil
}

// element is one per-pod set element as it is in the kernel.
type element struct {
	set     *setSpec
	key     []byte
	comment string
}

// elements are the set elements that make up p.
func (p Pod) elements() []element {
	var out []element
	add := func(s *setSpec, key []byte) { out = append(out, element{set: s, key: key, comment: p.ContainerID}) }
	inet, br := setsByName(podSets(inetTable)), setsByName(podSets(bridgeTable))
	gws := setsByName(gatewaySets())
	add(br[SetPodIfaces], ifnameKey(p.Port))
	if p.Routed() {
		add(inet[SetPodIfaces], ifnameKey(p.Port))
	}
	for _, ip := range p.IPs {
		src, addrs, gw := SetPodSourcesV4, SetPodAddrsV4, SetGatewaysV4
		if ip.Is6() {
			src, addrs, gw = SetPodSourcesV6, SetPodAddrsV6, SetGatewaysV6
		}
		add(br[src], ifaceAddrKey(p.Port, ip))
		add(br[addrs], ip.AsSlice())
		add(inet[src], ifaceAddrKey(p.L3, ip))
		add(inet[addrs], ip.AsSlice())
		if p.Gateway {
			add(gws[gw], ifaceAddrKey(p.L3, ip))
		}
	}
	return out
}

func setsByName(ss []*setSpec) map[string]*setSpec {
	m := map[string]*setSpec{}
	for _, s := range ss {
		m[s.name] = s
	}
	return m
}

// state is every per-pod element of the node, read in one pass.
type state struct {
	elems  []element
	egress bool
}

func readState(c *nftables.Conn) (*state, error) {
	st := &state{}
	all := append(append(podSets(inetTable), podSets(bridgeTable)...), gatewaySets()...)
	for _, s := range all {
		live, err := c.GetSetByName(s.table, s.name)
		if err != nil {
			if !rules.IsNFTNotFound(err) {
				return nil, fmt.Errorf("could not look up set %s: %w", s.name, err)
			}
			// Any per-pod set missing, in either table, means the node
			// rules are not (all) there: on a bridged node the inet table
			// alone cannot tell the gateway's port from a neighbour's
			// (found by the last red-team pass, with only the bridge
			// table deleted). The gateway sets exist on egress nodes only.
			if s.name != SetGatewaysV4 && s.name != SetGatewaysV6 {
				return nil, ErrNotApplied
			}
			continue
		}
		if s.name == SetGatewaysV4 {
			st.egress = true
		}
		els, err := c.GetSetElements(live)
		if err != nil {
			return nil, fmt.Errorf("could not list set %s: %w", s.name, err)
		}
		for _, e := range els {
			st.elems = append(st.elems, element{set: s, key: e.Key, comment: e.Comment})
		}
	}
	return st, nil
}

// pods groups the elements by container.
func (st *state) pods() []Pod {
	byID := map[string]*Pod{}
	var order []string
	get := func(id string) *Pod {
		if p, ok := byID[id]; ok {
			return p
		}
		p := &Pod{ContainerID: id}
		byID[id] = p
		order = append(order, id)
		return p
	}
	for _, e := range st.elems {
		p := get(e.comment)
		switch {
		case e.set.name == SetPodIfaces && e.set.table == bridgeTable:
			p.Port = ifname(e.key)
		case e.set.name == SetPodSourcesV4 || e.set.name == SetPodSourcesV6:
			if e.set.table == inetTable {
				p.L3 = ifname(e.key[:ifNameSize])
			}
		case e.set.name == SetPodAddrsV4 || e.set.name == SetPodAddrsV6:
			if e.set.table == inetTable {
				if ip, ok := netip.AddrFromSlice(e.key); ok {
					p.IPs = append(p.IPs, ip)
				}
			}
		case e.set.name == SetGatewaysV4 || e.set.name == SetGatewaysV6:
			p.Gateway = true
		}
	}
	out := make([]Pod, 0, len(order))
	for _, id := range order {
		out = append(out, *byID[id])
	}
	return out
}

func ifname(key []byte) string { return strings.TrimRight(string(key), "\x00") }

// RegisterPod registers p's host side and addresses in one netlink
// batch, after removing every element of other containers that hold one
// of p's addresses or p's port (a pod whose DEL never came, whose address
// or veth name was reused): a new pod never inherits a departed pod's
// identity, and a departed gateway's exemption dies with its address.
// It returns the pods it removed.
//
// The cost is one read of the per-pod sets and one batch; no rule is
// rewritten.
func RegisterPod(p Pod) ([]Pod, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	return retryNotFound(func(c *nftables.Conn) ([]Pod, error) {
		st, err := readState(c)
		if err != nil {
			return nil, err
		}
		if p.Gateway && !st.egress {
			return nil, ErrNotEgressNode
		}
		var stale []Pod
		for _, o := range st.pods() {
			if o.ContainerID == p.ContainerID {
				continue
			}
			if o.Port == p.Port || slices.ContainsFunc(o.IPs, func(ip netip.Addr) bool { return slices.Contains(p.IPs, ip) }) {
				stale = append(stale, o)
			}
		}
		var del []element
		for _, e := range st.elems {
			if slices.ContainsFunc(stale, func(o Pod) bool { return o.ContainerID == e.comment }) {
				del = append(del, e)
			}
		}
		if err := queue(c, del, false); err != nil {
			return nil, err
		}
		if err := queue(c, p.elements(), true); err != nil {
			return nil, err
		}
		if err := c.Flush(); err != nil {
			return nil, fmt.Errorf("could not register pod %s: %w", p, err)
		}
		return stale, nil
	})
}

// UnregisterPods removes every element whose container matches, in one
// batch, and returns the pods removed. It succeeds when nothing matches
// and when the node tables are absent.
func UnregisterPods(match func(containerID string) bool) ([]Pod, error) {
	del, err := deleteElements(func(e element) bool { return match(e.comment) })
	return (&state{elems: del}).pods(), err
}

// deleteElements removes, in one batch, every per-pod element for which
// match is true, and returns them. No tables: nothing to delete.
func deleteElements(match func(element) bool) ([]element, error) {
	var deleted []element
	_, err := retryNotFound(func(c *nftables.Conn) ([]Pod, error) {
		deleted = nil
		st, err := readState(c)
		if errors.Is(err, ErrNotApplied) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		for _, e := range st.elems {
			if match(e) {
				deleted = append(deleted, e)
			}
		}
		if len(deleted) == 0 {
			return nil, nil
		}
		if err := queue(c, deleted, false); err != nil {
			return nil, err
		}
		if err := c.Flush(); err != nil {
			return nil, fmt.Errorf("could not delete per-pod elements: %w", err)
		}
		return nil, nil
	})
	if err != nil {
		return nil, err
	}
	return deleted, nil
}

// ListPods returns the registered pods.
func ListPods() ([]Pod, error) {
	st, err := snapshot()
	if err != nil {
		return nil, err
	}
	return st.pods(), nil
}

// snapshot reads every per-pod element on a connection of its own.
func snapshot() (*state, error) {
	c, err := rules.NFTConn(0)
	if err != nil {
		return nil, fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	return readState(c)
}

// IsEgressNode says whether the node rules in place are an egress
// node's (they hold the gateway sets).
func IsEgressNode() (bool, error) {
	c, err := rules.NFTConn(0)
	if err != nil {
		return false, fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		if _, err := c.GetSetByName(t, SetPodSourcesV4); err != nil {
			if rules.IsNFTNotFound(err) {
				return false, ErrNotApplied
			}
			return false, err
		}
	}
	_, err = c.GetSetByName(inetTable, SetGatewaysV4)
	if rules.IsNFTNotFound(err) {
		return false, nil
	}
	return err == nil, err
}

func queue(c *nftables.Conn, els []element, add bool) error {
	bySet := map[*setSpec][]nftables.SetElement{}
	var order []*setSpec
	for _, e := range els {
		if _, ok := bySet[e.set]; !ok {
			order = append(order, e.set)
		}
		bySet[e.set] = append(bySet[e.set], nftables.SetElement{Key: e.key, Comment: e.comment})
	}
	for _, s := range order {
		var err error
		if add {
			err = rules.NFTQueueElements(c, s.set(), bySet[s])
		} else {
			err = rules.NFTQueueDeleteElements(c, s.set(), bySet[s])
		}
		if err != nil {
			return fmt.Errorf("could not queue elements of set %s: %w", s.name, err)
		}
	}
	return nil
}

// retryNotFound runs a read-modify-write on a fresh connection until it
// does not fail with ENOENT. Another writer (a second DEL of the same
// container, GC, an ADD removing stale entries) may delete a listed
// element first: the kernel then refuses the whole batch and nothing of
// it happened, so the state is read again and the batch retried.
func retryNotFound(f func(c *nftables.Conn) ([]Pod, error)) ([]Pod, error) {
	const attempts = 10
	var err error
	for range attempts {
		var c *nftables.Conn
		c, err = rules.NFTConn(0)
		if err != nil {
			return nil, fmt.Errorf("could not open nftables netlink socket: %w", err)
		}
		var out []Pod
		out, err = f(c)
		c.CloseLasting()
		if err == nil || errors.Is(err, ErrNotApplied) || !rules.IsNFTNotFound(err) {
			return out, err
		}
	}
	return nil, fmt.Errorf("per-pod elements kept changing under %d attempts: %w", attempts, err)
}

// Gateway is one gateway entry: the interface the host routes the
// gateway through (its veth, or the bridge it is a port of) and one of
// its addresses. `egress-node gateway` edits these by hand.
type Gateway struct {
	Iface       string
	IP          netip.Addr
	ContainerID string
}

func (g Gateway) String() string {
	return fmt.Sprintf("%s . %s (container %s)", g.Iface, g.IP, shortID(g.ContainerID))
}

// ListGateways returns the gateway entries (none on an app node).
func ListGateways() ([]Gateway, error) {
	st, err := snapshot()
	if err != nil {
		return nil, err
	}
	var out []Gateway
	for _, e := range st.elems {
		if g, ok := gatewayOf(e); ok {
			out = append(out, g)
		}
	}
	return out, nil
}

// AddGateways adds gateway entries by hand (the source validation of the
// pod's own port still applies: a gateway entry exempts an address only
// on the interface named).
func AddGateways(gws ...Gateway) error {
	var els []element
	sets := setsByName(gatewaySets())
	for _, g := range gws {
		if g.Iface == "" || len(g.Iface) >= ifNameSize || !g.IP.IsValid() || g.IP.Zone() != "" {
			return fmt.Errorf("invalid gateway %q / %v: need a host interface name and an IP address", g.Iface, g.IP)
		}
		s := sets[SetGatewaysV4]
		if g.IP.Is6() {
			s = sets[SetGatewaysV6]
		}
		els = append(els, element{set: s, key: ifaceAddrKey(g.Iface, g.IP.Unmap()), comment: g.ContainerID})
	}
	_, err := retryNotFound(func(c *nftables.Conn) ([]Pod, error) {
		st, err := readState(c)
		if err != nil {
			return nil, err
		}
		if !st.egress {
			return nil, ErrNotEgressNode
		}
		if err := queue(c, els, true); err != nil {
			return nil, err
		}
		return nil, c.Flush()
	})
	return err
}

// RemoveGateways deletes the gateway entries for which match is true.
func RemoveGateways(match func(Gateway) bool) ([]Gateway, error) {
	del, err := deleteElements(func(e element) bool {
		g, ok := gatewayOf(e)
		return ok && match(g)
	})
	var removed []Gateway
	for _, e := range del {
		g, _ := gatewayOf(e)
		removed = append(removed, g)
	}
	return removed, err
}

// gatewayOf decodes a gateway set element.
func gatewayOf(e element) (Gateway, bool) {
	if e.set.name != SetGatewaysV4 && e.set.name != SetGatewaysV6 {
		return Gateway{}, false
	}
	ip, ok := netip.AddrFromSlice(e.key[ifNameSize:])
	return Gateway{Iface: ifname(e.key[:ifNameSize]), IP: ip, ContainerID: e.comment}, ok
}
