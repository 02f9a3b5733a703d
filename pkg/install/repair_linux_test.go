package install

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// While Run watches, whoever flushes or deletes our node tables (another
// agent's `nft flush ruleset`, a firewall reload, a mistake) finds them
// restored by the nftables monitor, long before the resync (an hour
// here, so that only the monitor can have done it). Each repair is
// counted; per-pod elements written meanwhile do not wake it. The
// delays are logged; make bench reports them too.
func TestRunRepairsTampering(t *testing.T) {
	host, nodeCfg, in := agentEnv(t)
	runAgent(t, in)
	check := func() error {
		cfg, err := node.Load(nodeCfg)
		if err != nil {
			return err
		}
		return netns.Do(host.Path(), func() error { return node.Check(cfg) })
	}
	waitFor := func(what string, cond func() bool) time.Duration {
		t.Helper()
		start := time.Now()
		for !cond() {
			if time.Since(start) > 10*time.Second {
				t.Fatalf("%s: not within 10s", what)
			}
			time.Sleep(time.Millisecond)
		}
		return time.Since(start)
	}
	waitFor("first apply and monitor", func() bool { return check() == nil && in.Watching() })

	// Per-pod elements come and go without a repair.
	p := node.Pod{ContainerID: "c1", Port: "veth1", L3: "cni0", IPs: []netip.Addr{netip.MustParseAddr("198.51.100.7")}}
	for range 5 {
		if err := netns.Do(host.Path(), func() error {
			if _, err := node.RegisterPod(p); err != nil {
				return err
			}
			_, err := node.UnregisterPods(func(id string) bool { return id == "c1" })
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if n := in.Repairs(); n != 0 {
		t.Fatalf("per-pod elements caused %d repairs", n)
	}

	var delays []time.Duration
	tampers := []string{
		"flush table inet egress_cni_node",
		"delete table inet egress_cni_node",
		"flush table bridge egress_cni_node",
		"delete table bridge egress_cni_node",
		"flush chain inet egress_cni_node conn",
		"flush ruleset",
	}
	for range 3 {
		for _, cmd := range tampers {
			before := in.Repairs()
			nstest.MustExec(t, host, "nft", cmd)
			// A repair is counted only when Check found drift: the
			// counter rising proves the tampering took effect.
			d := waitFor("repair after "+cmd, func() bool { return in.Repairs() > before && check() == nil })
			delays = append(delays, d)
		}
	}
	slices.Sort(delays)
	t.Logf("repair delay over %d tamperings: p50 %v, max %v", len(delays), delays[len(delays)/2], delays[len(delays)-1])
	if got, want := in.Repairs(), int64(3*len(tampers)); got != want {
		t.Errorf("%d repairs counted, want %d", got, want)
	}
}

// A pod's registration names its host veth. When that link is deleted
// or renamed (a pod with CAP_NET_ADMIN in the initial user namespace can
// do either to another pod's veth through the node's netnsid, then move
// a veth of its own in under the name), Run drops the registration at
// once, so the name no longer carries the pod's identity.
func TestRunDropsRegistrationOfVanishedLink(t *testing.T) {
	host, _, in := agentEnv(t)
	for _, name := range []string{"vethgw", "vethkeep", "vethren"} {
		nstest.MustExec(t, host, "ip", "link", "add", name, "type", "veth", "peer", "name", name+"p")
	}
	if err := in.ApplyNodeRules(); err != nil {
		t.Fatal(err)
	}
	reg := func(id, port, ip string, gw bool) {
		t.Helper()
		p := node.Pod{ContainerID: id, Port: port, L3: "cni0", IPs: []netip.Addr{netip.MustParseAddr(ip)}, Gateway: gw}
		if err := netns.Do(host.Path(), func() error { _, err := node.RegisterPod(p); return err }); err != nil {
			t.Fatal(err)
		}
	}
	reg("c-gw", "vethgw", "198.51.100.66", true)
	reg("c-keep", "vethkeep", "198.51.100.67", false)
	reg("c-ren", "vethren", "198.51.100.68", false)
	runAgent(t, in)
	registered := func() map[string]bool {
		var pods []node.Pod
		if err := netns.Do(host.Path(), func() error { var err error; pods, err = node.ListPods(); return err }); err != nil {
			t.Fatal(err)
		}
		m := map[string]bool{}
		for _, p := range pods {
			m[p.ContainerID] = true
		}
		return m
	}
	time.Sleep(200 * time.Millisecond) // Run is following the links
	nstest.MustExec(t, host, "ip", "link", "del", "vethgw")
	nstest.MustExec(t, host, "ip", "link", "set", "vethren", "name", "renamed0")
	start := time.Now()
	for {
		m := registered()
		if !m["c-gw"] && !m["c-ren"] {
			if !m["c-keep"] {
				t.Fatal("the registration of a pod whose link stayed was dropped too")
			}
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("registrations of a deleted and a renamed link still there after 5s: %v", m)
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("registrations dropped %v after the link changes", time.Since(start).Round(time.Microsecond))
}

// agentEnv is an egress node's namespace and node config, and an
// installer for them whose resync is an hour away: what happens within
// a test is the watchers' doing.
func agentEnv(t *testing.T) (ns.NetNS, string, *Installer) {
	t.Helper()
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	e := newEnv(t, "10-flannel.conflist")
	nodeCfg := filepath.Join(t.TempDir(), "node.json")
	if err := os.WriteFile(nodeCfg, []byte(`{"role":"egress","podCIDRs":["198.51.100.0/24"],"uplink":"up0"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	return host, nodeCfg, e.installer(t, func(o *Options) { o.NodeConfig, o.NetNS, o.Resync = nodeCfg, host.Path(), time.Hour })
}

// runAgent runs in.Run until the test ends.
func runAgent(t *testing.T, in *Installer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}
