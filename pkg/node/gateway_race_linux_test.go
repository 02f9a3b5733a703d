package node

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// Removers racing for the same entries (a DEL retried while the first
// runs, GC during a DEL) all succeed, and each entry is removed exactly
// once. Before RemoveGateways retried, about a quarter of them failed
// with "no such file or directory": the kernel refuses a batch that
// deletes an element another batch deleted first.
func TestRemoveGatewaysConcurrent(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	cfg, err := Parse([]byte(egressCfg))
	if err != nil {
		t.Fatal(err)
	}
	if err := in(host, func() error { return Apply(cfg) }); err != nil {
		t.Fatal(err)
	}
	const rounds, removers = 30, 4
	failed := 0
	for round := range rounds {
		var gws []Gateway
		for i := range 3 {
			gws = append(gws, Gateway{Iface: "vethgw", IP: netip.MustParseAddr(fmt.Sprintf("198.51.100.%d", i+1)), ContainerID: "c1"})
		}
		gws = append(gws, Gateway{Iface: "vethgw", IP: netip.MustParseAddr("2001:db8:10::1"), ContainerID: "c1"},
			Gateway{Iface: "vethkeep", IP: netip.MustParseAddr("198.51.100.9"), ContainerID: "c2"})
		if err := in(host, func() error { return AddGateways(gws...) }); err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		var all []string
		var wg sync.WaitGroup
		for range removers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var removed []Gateway
				err := in(host, func() error {
					var err error
					removed, err = RemoveGateways(func(g Gateway) bool { return g.ContainerID == "c1" })
					return err
				})
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					failed++
					t.Errorf("round %d: concurrent RemoveGateways: %v", round, err)
				}
				for _, g := range removed {
					all = append(all, g.IP.String())
				}
			}()
		}
		wg.Wait()
		slices.Sort(all)
		if want := []string{"198.51.100.1", "198.51.100.2", "198.51.100.3", "2001:db8:10::1"}; !slices.Equal(all, want) {
			t.Errorf("round %d: removed %v in all, want each of %v once", round, all, want)
		}
		var left []Gateway
		if err := in(host, func() error { left, err = ListGateways(); return err }); err != nil {
			t.Fatal(err)
		}
		if len(left) != 1 || left[0].ContainerID != "c2" {
			t.Fatalf("round %d: left %v, want only c2's entry", round, left)
		}
		if err := in(host, func() error {
			_, err := RemoveGateways(func(g Gateway) bool { return g.ContainerID == "c2" })
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%d rounds of %d concurrent removers: %d failed", rounds, removers, failed)
}
