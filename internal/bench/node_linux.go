//go:build linux

package bench

import (
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/egress-cni/egress-cni/pkg/node"
)

// NodeResult holds the node-layer figures. Apply and the gateway update
// are timed in-process (library calls in the node namespace): they are
// what egress-node and the plugin call.
type NodeResult struct {
	Apply          Stats // node.Apply into a fresh namespace
	Reapply        Stats // node.Apply over existing rules
	Gateway        Stats // AddGateways + RemoveGateways of one gateway
	RateWithout    float64
	RateWith       float64
	ConnsWithout   int
	ConnsWith      int
	ForwardWindows int
}

// nodeConfig allows the pod and server subnets; the pod's host-side veth
// matches the default "veth*" pod interface pattern.
func nodeConfig() (*node.Config, error) {
	f := node.File{Role: node.RoleApp, PodCIDRs: []string{"198.51.100.0/24"}, Allow: []string{"203.0.113.0/24"}}
	return f.Config()
}

var (
	podAddr  = netip.MustParsePrefix("198.51.100.2/24")
	podGW    = netip.MustParsePrefix("198.51.100.1/24")
	srvAddr  = netip.MustParsePrefix("203.0.113.2/24")
	srvGW    = netip.MustParsePrefix("203.0.113.1/24")
	srvPort  = uint16(8080)
	gwIfName = "vethbench0"
)

func (b *Bench) measureNode() (*NodeResult, error) {
	cfg, err := nodeConfig()
	if err != nil {
		return nil, err
	}
	res := &NodeResult{}
	var apply, reapply, gw []time.Duration
	for range b.cfg.NodeRuns {
		n, err := newNS()
		if err != nil {
			return nil, err
		}
		err = n.Do(func(ns.NetNS) error {
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
			g := node.Gateway{Iface: gwIfName, IP: podAddr.Addr(), ContainerID: "bench-gateway"}
			start = time.Now()
			if err := node.AddGateways(g); err != nil {
				return err
			}
			removed, err := node.RemoveGateways(func(x node.Gateway) bool { return x.ContainerID == g.ContainerID })
			if err != nil {
				return err
			}
			gw = append(gw, time.Since(start))
			if len(removed) != 1 {
				return fmt.Errorf("removed %d gateways, want 1", len(removed))
			}
			return nil
		})
		delNS(n)
		if err != nil {
			return nil, fmt.Errorf("node rules: %w", err)
		}
	}
	res.Apply, res.Reapply, res.Gateway = summarize(apply), summarize(reapply), summarize(gw)

	if err := b.forwardRates(cfg, res); err != nil {
		return nil, err
	}
	logf("node: apply %s ms, gateway update %s ms, forward %.0f/s without, %.0f/s with", ms(res.Apply.Median), ms(res.Gateway.Median), res.RateWithout, res.RateWith)
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
	dst := netip.AddrPortFrom(srvAddr.Addr(), srvPort)
	var with, without time.Duration
	for range b.cfg.ForwardRounds {
		for _, rulesOn := range []bool{false, true} {
			err := nodeNS.Do(func(ns.NetNS) error {
				if rulesOn {
					return node.Apply(cfg)
				}
				return node.Remove()
			})
			if err != nil {
				return fmt.Errorf("node rules on=%v: %w", rulesOn, err)
			}
			c, d, err := connectLoop(pod, dst, b.cfg.DataWindow)
			if err != nil {
				return fmt.Errorf("forward path (node rules %v): %w", rulesOn, err)
			}
			if rulesOn {
				res.ConnsWith += c
				with += d
			} else {
				res.ConnsWithout += c
				without += d
			}
		}
	}
	// The drop rules must have let the allowed traffic through and
	// counted nothing as dropped.
	err = nodeNS.Do(func(ns.NetNS) error {
		pk, _, err := node.DropCounter()
		if err == nil && pk != 0 {
			return fmt.Errorf("node rules dropped %d packets of allowed traffic", pk)
		}
		return err
	})
	if err != nil {
		return err
	}
	res.ForwardWindows = b.cfg.ForwardRounds
	res.RateWith = float64(res.ConnsWith) / with.Seconds()
	res.RateWithout = float64(res.ConnsWithout) / without.Seconds()
	return nil
}

// wire connects peer to the node with a veth pair: hostIf in the node
// namespace holding gw, eth0 in peer holding addr with a default route
// via gw.
func wire(nodeNS, peer ns.NetNS, hostIf string, addr, gw netip.Prefix) error {
	err := peer.Do(func(ns.NetNS) error {
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: hostIf, PeerNamespace: netlink.NsFd(int(nodeNS.Fd()))}
		if err := netlink.LinkAdd(v); err != nil {
			return fmt.Errorf("could not add veth %s: %w", hostIf, err)
		}
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		a, _ := netlink.ParseAddr(addr.String())
		if err := netlink.AddrAdd(l, a); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: gw.Addr().AsSlice()})
	})
	if err != nil {
		return err
	}
	return nodeNS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(hostIf)
		if err != nil {
			return err
		}
		a, _ := netlink.ParseAddr(gw.String())
		if err := netlink.AddrAdd(l, a); err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	})
}
