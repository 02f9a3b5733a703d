//go:build linux

package netns_test

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// benchNodeConfig is an egress node with a realistic allow list.
const benchNodeConfig = `{"role": "egress", "uplink": "uplink", "logDrops": true,
	"podCIDRs": ["10.244.0.0/16", "fd00:10:244::/56"], "serviceCIDRs": ["10.96.0.0/12", "fd00:10:96::/112"],
	"nodeCIDRs": ["192.0.2.0/24"], "allow": ["169.254.169.254/32", "198.51.100.53/32"]}`

// BenchmarkNodeGatewayUpdate times one gateway's membership change as
// the CNI plugin makes it: AddGateways (its IPv4 and IPv6, one netlink
// batch) then RemoveGateways by container ID (list + one batch), in a
// namespace holding the node rules and `others` other gateways. It
// reports add-ns/op and remove-ns/op besides the pair's ns/op.
//
//	go test -run '^$' -bench NodeGatewayUpdate -benchtime 200x ./test/netns/
func BenchmarkNodeGatewayUpdate(b *testing.B) {
	nstest.RequirePrivileged(b)
	cfg, err := node.Parse([]byte(benchNodeConfig))
	if err != nil {
		b.Fatal(err)
	}
	for _, others := range []int{0, 100} {
		b.Run(fmt.Sprintf("others=%d", others), func(b *testing.B) {
			host := nstest.NewNS(b)
			err := host.Do(func(ns.NetNS) error {
				if err := node.Apply(cfg); err != nil {
					return err
				}
				var gws []node.Gateway
				for i := range others {
					gws = append(gws, node.Gateway{Iface: fmt.Sprintf("veth%08x", i), IP: netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}), ContainerID: fmt.Sprintf("other-%d", i)})
				}
				return node.AddGateways(gws...)
			})
			if err != nil {
				b.Fatal(err)
			}
			gws := []node.Gateway{
				{Iface: "vethbench0", IP: netip.MustParseAddr("10.244.200.7"), ContainerID: "bench"},
				{Iface: "vethbench0", IP: netip.MustParseAddr("fd00:10:244::7"), ContainerID: "bench"},
			}
			var add, del int64
			b.ResetTimer()
			err = host.Do(func(ns.NetNS) error {
				for range b.N {
					t0 := nowNanos()
					if err := node.AddGateways(gws...); err != nil {
						return err
					}
					t1 := nowNanos()
					removed, err := node.RemoveGateways(func(g node.Gateway) bool { return g.ContainerID == "bench" })
					if err != nil {
						return err
					}
					if len(removed) != 2 {
						return fmt.Errorf("removed %v", removed)
					}
					add += t1 - t0
					del += nowNanos() - t1
				}
				return nil
			})
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(add)/float64(b.N), "add-ns/op")
			b.ReportMetric(float64(del)/float64(b.N), "remove-ns/op")
		})
	}
}

// BenchmarkNodeApply times node.Apply: "fresh" into a new namespace each
// time (creation not timed), "reapply" over the existing tables.
//
//	go test -run '^$' -bench NodeApply -benchtime 100x ./test/netns/
func BenchmarkNodeApply(b *testing.B) {
	nstest.RequirePrivileged(b)
	cfg, err := node.Parse([]byte(benchNodeConfig))
	if err != nil {
		b.Fatal(err)
	}
	b.Run("fresh", func(b *testing.B) {
		for range b.N {
			b.StopTimer()
			n, err := testutils.NewNS()
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			err = n.Do(func(ns.NetNS) error { return node.Apply(cfg) })
			b.StopTimer()
			_ = n.Close()
			_ = testutils.UnmountNS(n)
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	})
	b.Run("reapply", func(b *testing.B) {
		host := nstest.NewNS(b)
		if err := host.Do(func(ns.NetNS) error { return node.Apply(cfg) }); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		if err := host.Do(func(ns.NetNS) error {
			for range b.N {
				if err := node.Apply(cfg); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			b.Fatal(err)
		}
	})
}

func nowNanos() int64 { return time.Now().UnixNano() }
