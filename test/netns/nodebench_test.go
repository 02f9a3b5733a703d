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

// BenchmarkNodeGatewayUpdate times one gateway pod's registration as
// the CNI plugin makes it (node format 2): RegisterPod at ADD (its port,
// bridge, IPv4 and IPv6, gateway entries: one read of the per-pod sets,
// one netlink batch) then UnregisterPods by container ID at DEL (one
// read, one batch), in a namespace holding the node rules and `others`
// other registered pods, every tenth of them a gateway. It reports
// add-ns/op and remove-ns/op besides the pair's ns/op.
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
				for i := range others {
					if _, err := node.RegisterPod(node.Pod{ContainerID: fmt.Sprintf("other-%d", i), Port: fmt.Sprintf("veth%08x", i), L3: "cni0",
						IPs:     []netip.Addr{netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}), netip.AddrFrom16([16]byte{0: 0xfd, 5: 0x10, 6: 0x02, 7: 0x44, 14: byte(i >> 8), 15: byte(i)})},
						Gateway: i%10 == 0}); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			gw := node.Pod{ContainerID: "bench", Port: "vethbench0", L3: "cni0", Gateway: true,
				IPs: []netip.Addr{netip.MustParseAddr("10.244.200.7"), netip.MustParseAddr("fd00:10:244::c8:7")}}
			var add, del int64
			b.ResetTimer()
			err = host.Do(func(ns.NetNS) error {
				for range b.N {
					t0 := nowNanos()
					if stale, err := node.RegisterPod(gw); err != nil || len(stale) != 0 {
						return fmt.Errorf("register: %w (stale %v)", err, stale)
					}
					t1 := nowNanos()
					removed, err := node.UnregisterPods(func(id string) bool { return id == "bench" })
					if err != nil {
						return err
					}
					if len(removed) != 1 || !removed[0].Gateway || len(removed[0].IPs) != 2 {
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
