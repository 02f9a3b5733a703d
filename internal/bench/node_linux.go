//go:build linux

package bench

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"

	"github.com/egress-cni/egress-cni/internal/nscore"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// NodeResult holds the node-layer figures. Apply and the gateway update
// are timed in-process (library calls in the node namespace): they are
// what egress-node and the plugin call.
type NodeResult struct {
	Apply      Stats // node.Apply into a fresh namespace
	Apply10k   Stats // node.Apply of a 10,000-entry allow list, fresh namespace
	Reapply    Stats // node.Apply over existing rules
	Gateway    Stats // RegisterPod + UnregisterPods of one gateway pod (what ADD and DEL do)
	GatewayAdd Stats // RegisterPod alone (ADD), with 100 other pods registered
	GatewayDel Stats // UnregisterPods alone (DEL)
	Forward    []ForwardRow
	// UDP is the forward path's small-packet rate, one flow, in the
	// same states: source validation is a per-packet lookup.
	UDP []ForwardRow
}

// ForwardRow is the forward-path rate in one state of the node.
type ForwardRow struct {
	State  string
	Rate   float64 // median slice, connections per second
	Mean   float64
	Conns  int
	Slices []float64
	window time.Duration
}

// nodeConfig allows the pod and server subnets; an egress node, so that
// gateway registration is measured too. extra adds that many /32 allow
// entries.
func nodeConfig(extra int) (*node.Config, error) {
	f := node.File{Role: node.RoleEgress, Uplink: "srvbench0", PodCIDRs: []string{"198.51.100.0/24"}, Allow: []string{"203.0.113.0/24"}}
	for i := range extra {
		f.Allow = append(f.Allow, fmt.Sprintf("100.%d.%d.%d/32", 64+i/(256*128), (i/128)%256, (i%128)*2))
	}
	return f.Config()
}

// benchPod is the forward path's pod as the plugin registers it.
var benchPod = node.Pod{ContainerID: "bench-pod", Port: gwIfName, L3: gwIfName, IPs: []netip.Addr{podAddr.Addr()}}

var (
	podAddr  = netip.MustParsePrefix("198.51.100.2/24")
	podGW    = netip.MustParsePrefix("198.51.100.1/24")
	srvAddr  = netip.MustParsePrefix("203.0.113.2/24")
	srvGW    = netip.MustParsePrefix("203.0.113.1/24")
	srvPort  = uint16(8080)
	gwIfName = "vethbench0"
)

func (b *Bench) measureNode() (*NodeResult, error) {
	cfg, err := nodeConfig(0)
	if err != nil {
		return nil, err
	}
	big, err := nodeConfig(10000)
	if err != nil {
		return nil, err
	}
	res := &NodeResult{}
	var apply, apply10k, reapply, gw, gwAdd, gwDel []time.Duration
	for range b.cfg.NodeRuns {
		err := inFreshNS(func() error {
			start := time.Now()
			if err := node.Apply(cfg); err != nil {
				return err
			}
			apply = append(apply, time.Since(start))
			start = time.Now()
			if err := node.Apply(cfg); err != nil {
				return err
			}
			reapply = append(reapply, time.Since(start))
			// A node with 100 pods, as a busy node has; then one
			// gateway pod's ADD and DEL, 20 times.
			for i := range 100 {
				p := node.Pod{ContainerID: fmt.Sprintf("bench-%03d", i), Port: fmt.Sprintf("vethb%03d", i), L3: "cni0",
					IPs: []netip.Addr{netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i)})}}
				if _, err := node.RegisterPod(p); err != nil {
					return err
				}
			}
			g := benchPod
			g.Gateway = true
			for range 20 {
				start = time.Now()
				if _, err := node.RegisterPod(g); err != nil {
					return err
				}
				mid := time.Now()
				removed, err := node.UnregisterPods(func(id string) bool { return id == g.ContainerID })
				if err != nil {
					return err
				}
				end := time.Now()
				gw, gwAdd, gwDel = append(gw, end.Sub(start)), append(gwAdd, mid.Sub(start)), append(gwDel, end.Sub(mid))
				if len(removed) != 1 {
					return fmt.Errorf("removed %d pods, want 1", len(removed))
				}
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("node rules: %w", err)
		}
	}
	for range b.cfg.NodeRuns {
		err := inFreshNS(func() error {
			start := time.Now()
			if err := node.Apply(big); err != nil {
				return err
			}
			apply10k = append(apply10k, time.Since(start))
			return node.Check(big)
		})
		if err != nil {
			return nil, fmt.Errorf("node rules, 10,000 allow entries: %w", err)
		}
	}
	res.Apply, res.Apply10k, res.Reapply, res.Gateway = summarize(apply), summarize(apply10k), summarize(reapply), summarize(gw)
	res.GatewayAdd, res.GatewayDel = summarize(gwAdd), summarize(gwDel)

	// The forward path is measured on an app node, where ordinary pods
	// live: an egress node adds a NAT chain, whose cost (nat for every
	// new connection) belongs to masquerading the gateways, not to
	// enforcement.
	appCfg, err := (&node.File{Role: node.RoleApp, PodCIDRs: []string{"198.51.100.0/24"}, Allow: []string{"203.0.113.0/24"}}).Config()
	if err != nil {
		return nil, err
	}
	if err := b.forwardRates(appCfg, res); err != nil {
		return nil, err
	}
	logf("node: apply %s ms (10,000 allow entries: %s ms), pod ADD p50 %s p99 %s ms, DEL p50 %s p99 %s ms", ms(res.Apply.Median), ms(res.Apply10k.Median),
		ms(res.GatewayAdd.P50), ms(res.GatewayAdd.P99), ms(res.GatewayDel.P50), ms(res.GatewayDel.P99))
	for _, f := range res.Forward {
		logf("node: forward path, %s: %.0f conn/s", f.State, f.Rate)
	}
	for _, f := range res.UDP {
		logf("node: forward path UDP, %s: %.0f packets/s", f.State, f.Rate)
	}
	return res, nil
}

// forwardRates: pod namespace → node namespace (forwarding) → server
// namespace, new connections per second without and with the node rules,
// alternating windows.
func (b *Bench) forwardRates(cfg *node.Config, res *NodeResult) error {
	nodeNS, err := newNS()
	if err != nil {
		return err
	}
	defer delNS(nodeNS)
	pod, err := newNS()
	if err != nil {
		return err
	}
	defer delNS(pod)
	srv, err := newNS()
	if err != nil {
		return err
	}
	defer delNS(srv)
	if err := wire(nodeNS, pod, gwIfName, podAddr, podGW); err != nil {
		return err
	}
	if err := wire(nodeNS, srv, "srvbench0", srvAddr, srvGW); err != nil {
		return err
	}
	err = nodeNS.Do(func(ns.NetNS) error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
	})
	if err != nil {
		return err
	}
	if err := pod.Do(func(ns.NetNS) error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("1024 65000"), 0o644)
	}); err != nil {
		return err
	}
	l, err := listen(srv, netip.AddrPortFrom(netip.IPv4Unspecified(), srvPort))
	if err != nil {
		return err
	}
	defer l.stop()
	sink, err := listenUDP(srv, netip.AddrPortFrom(netip.IPv4Unspecified(), srvPort))
	if err != nil {
		return err
	}
	defer sink.stop()
	dst := netip.AddrPortFrom(srvAddr.Addr(), srvPort)
	states := []struct {
		name string
		set  func() error
	}{
		{"no rules (no conntrack in the node namespace)", func() error { return errors.Join(node.Remove(), ctOnly(false)) }},
		{"conntrack only (one ct state established,related accept rule)", func() error { return errors.Join(node.Remove(), ctOnly(true)) }},
		{"node rules (pkg/node, the pod registered)", func() error {
			if err := ctOnly(false); err != nil {
				return err
			}
			if err := node.Apply(cfg); err != nil {
				return err
			}
			_, err := node.RegisterPod(benchPod)
			return err
		}},
	}
	rows := make([]ForwardRow, len(states))
	udp := make([]ForwardRow, len(states))
	for range dataRounds {
		for i, st := range states {
			rows[i].State = st.name
			if err := nodeNS.Do(func(ns.NetNS) error { return st.set() }); err != nil {
				return fmt.Errorf("node state %q: %w", st.name, err)
			}
			c, d, err := connectLoop(pod, dst, b.cfg.DataWindow/dataRounds)
			if err != nil {
				return fmt.Errorf("forward path (%s): %w", st.name, err)
			}
			rows[i].Conns += c
			rows[i].window += d
			rows[i].Slices = append(rows[i].Slices, float64(c)/d.Seconds())
			udp[i].State = st.name
			c, d, err = udpLoop(pod, sink, dst, b.cfg.DataWindow/dataRounds)
			if err != nil {
				return fmt.Errorf("forward path, UDP (%s): %w", st.name, err)
			}
			udp[i].Conns += c
			udp[i].window += d
			udp[i].Slices = append(udp[i].Slices, float64(c)/d.Seconds())
		}
	}
	// The drop rules (in place after the last slice) must have let the
	// allowed traffic through and counted nothing as dropped.
	err = nodeNS.Do(func(ns.NetNS) error {
		k, err := node.ReadCounters()
		if err == nil && k.Dropped+k.Forged != 0 {
			return fmt.Errorf("node rules dropped %d packets of allowed traffic (%d forged)", k.Dropped+k.Forged, k.Forged)
		}
		return err
	})
	if err != nil {
		return err
	}
	for _, rs := range [][]ForwardRow{rows, udp} {
		for i := range rs {
			rs[i].Rate = medianF(rs[i].Slices)
			rs[i].Mean = float64(rs[i].Conns) / rs[i].window.Seconds()
		}
	}
	res.Forward, res.UDP = rows, udp
	return nil
}

// ctOnly adds (or removes) a table whose forward chain only asks
// conntrack for the state, to tell the cost of conntrack itself from the
// cost of the node rules.
func ctOnly(on bool) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	defer c.CloseLasting()
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: "egress_bench_ct"}
	// Add then delete: idempotent removal in one batch.
	c.AddTable(t)
	c.DelTable(t)
	if on {
		c.AddTable(t)
		ch := c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter})
		// ct state established,related accept
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
			&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED), Xor: []byte{0, 0, 0, 0}},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
			&expr.Verdict{Kind: expr.VerdictAccept},
		}})
	}
	return c.Flush()
}

// wire connects peer to the node with a veth pair (nscore.Link): hostIf
// in the node namespace holding gw, eth0 in peer holding addr with a
// default route via gw.
func wire(nodeNS, peer ns.NetNS, hostIf string, addr, gw netip.Prefix) error {
	if err := nscore.Link(
		nscore.LinkEnd{NS: peer, Name: "eth0", Addrs: []netip.Prefix{addr}},
		nscore.LinkEnd{NS: nodeNS, Name: hostIf, Addrs: []netip.Prefix{gw}},
	); err != nil {
		return err
	}
	return nscore.Route(peer, netip.MustParsePrefix("0.0.0.0/0"), gw.Addr())
}

// inFreshNS runs f inside a network namespace made for it and deleted
// after.
func inFreshNS(f func() error) error {
	n, err := newNS()
	if err != nil {
		return err
	}
	defer delNS(n)
	return n.Do(func(ns.NetNS) error { return f() })
}
