package node

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/rules"
)

func TestMain(m *testing.M) { nstest.Main(m) }

const egressCfg = `{"role":"egress","podCIDRs":["198.51.100.0/24","2001:db8:10::/48"],"serviceCIDRs":["192.0.2.128/25"],
	"nodeCIDRs":["192.0.2.0/26"],"allow":["192.0.2.53/32"],"uplink":"up0","logDrops":true}`

func in(n ns.NetNS, f func() error) error { return n.Do(func(ns.NetNS) error { return f() }) }

func mustParse(t *testing.T, s string) *Config {
	t.Helper()
	cfg, err := Parse([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func mustApply(t *testing.T, host ns.NetNS, cfg *Config) {
	t.Helper()
	if err := in(host, func() error { return Apply(cfg) }); err != nil {
		t.Fatalf("apply: %v", err)
	}
}

var (
	bridgedPod = Pod{ContainerID: "c-bridged", Port: "veth1", L3: "cni0", IPs: []netip.Addr{netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("2001:db8:10::7")}}
	routedGW   = Pod{ContainerID: "c-gw", Port: "lxc42", L3: "lxc42", IPs: []netip.Addr{netip.MustParseAddr("198.51.100.9")}, Gateway: true}
)

func TestApplyRegisterCheckRemove(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	// Something that is not ours, which must survive everything.
	nstest.MustExec(t, host, "nft", "add table ip other; add chain ip other fw { type filter hook forward priority 0; }; add rule ip other fw counter accept")
	before := nstest.NFTDump(t, host)

	cfg := mustParse(t, egressCfg)
	mustApply(t, host, cfg)
	first := nstest.NFTDump(t, host)
	for _, want := range []string{"table inet egress_cni_node", "table bridge egress_cni_node", "fib saddr . iif oif missing",
		"ct label set 127", `counter name "dropped" drop`, `counter name "forged" drop`,
		"masquerade", "198.51.100.0/24", "table ip other", "egress-cni node format 2"} {
		if !strings.Contains(first, want) {
			t.Errorf("dump lacks %q:\n%s", want, first)
		}
	}
	for _, never := range []string{"iifname \"veth", "meta mark", "cni0"} {
		if strings.Contains(first, never) {
			t.Errorf("dump holds %q: coverage must not depend on names or marks:\n%s", never, first)
		}
	}
	if err := in(host, func() error { return Check(cfg) }); err != nil {
		t.Fatalf("check after apply: %v", err)
	}

	for _, p := range []Pod{bridgedPod, routedGW} {
		if _, err := in2(host, func() ([]Pod, error) { return RegisterPod(p) }); err != nil {
			t.Fatalf("register %v: %v", p, err)
		}
	}
	// Re-applying keeps registrations and changes nothing else.
	mustApply(t, host, cfg)
	pods, err := in2(host, ListPods)
	if err != nil || len(pods) != 2 {
		t.Fatalf("pods after re-apply: %v %v", pods, err)
	}
	for _, want := range []Pod{bridgedPod, routedGW} {
		if !slices.ContainsFunc(pods, func(p Pod) bool {
			return p.ContainerID == want.ContainerID && p.Port == want.Port && p.L3 == want.L3 && p.Gateway == want.Gateway && slices.Equal(p.IPs, want.IPs)
		}) {
			t.Errorf("pod %v not read back from %v", want, pods)
		}
	}
	dump := nstest.NFTDump(t, host)
	for _, want := range []string{`"veth1" . 198.51.100.7`, `"cni0" . 198.51.100.7`, `"lxc42" . 198.51.100.9`, `comment "c-gw"`} {
		if !strings.Contains(dump, want) {
			t.Errorf("dump lacks element %q:\n%s", want, dump)
		}
	}
	if gws, err := in3(host, ListGateways); err != nil || len(gws) != 1 || gws[0].Iface != "lxc42" {
		t.Fatalf("gateways: %v %v", gws, err)
	}
	if err := in(host, func() error { return Check(cfg) }); err != nil {
		t.Fatalf("check with pods: %v", err)
	}
	removed, err := in2(host, func() ([]Pod, error) { return UnregisterPods(func(string) bool { return true }) })
	if err != nil || len(removed) != 2 {
		t.Fatalf("unregister: %v %v", removed, err)
	}
	if got := nstest.NFTDump(t, host); got != first {
		t.Fatalf("apply, register, unregister, re-apply is not idempotent:\n--- first\n%s\n--- now\n%s", first, got)
	}

	// Role change: the NAT chain, the gateway sets and the conn chain go.
	app := mustParse(t, `{"role":"app","podCIDRs":["198.51.100.0/24"]}`)
	mustApply(t, host, app)
	if d := nstest.NFTDump(t, host); strings.Contains(d, "masquerade") || strings.Contains(d, "192.0.2.53") || strings.Contains(d, SetGatewaysV4) {
		t.Fatalf("app role kept egress rules:\n%s", d)
	}
	if err := in(host, func() error { return Check(app) }); err != nil {
		t.Fatalf("check app: %v", err)
	}
	if _, err := in2(host, func() ([]Pod, error) { return RegisterPod(routedGW) }); !errors.Is(err, ErrNotEgressNode) {
		t.Fatalf("gateway on an app node: %v, want ErrNotEgressNode", err)
	}
	if err := in(host, Remove); err != nil {
		t.Fatal(err)
	}
	if err := in(host, Remove); err != nil {
		t.Fatalf("second remove: %v", err)
	}
	if got := nstest.NFTDump(t, host); got != before {
		t.Fatalf("remove did not restore the namespace:\n--- before\n%s\n--- after\n%s", before, got)
	}
	if _, err := in2(host, func() ([]Pod, error) { return RegisterPod(bridgedPod) }); !errors.Is(err, ErrNotApplied) {
		t.Fatalf("register without tables: %v", err)
	}
	// Half the rules are not the rules: with only the bridge table gone,
	// a bridged node cannot tell the gateway's port from a neighbour's.
	mustApply(t, host, cfg)
	nstest.MustExec(t, host, "nft", "delete", "table", "bridge", Table)
	if _, err := in2(host, func() ([]Pod, error) { return RegisterPod(bridgedPod) }); !errors.Is(err, ErrNotApplied) {
		t.Fatalf("register with the bridge table gone: %v, want ErrNotApplied (so that ADD applies the rules)", err)
	}
	if _, err := in2(host, func() ([]Pod, error) { _, err := IsEgressNode(); return nil, err }); !errors.Is(err, ErrNotApplied) {
		t.Fatalf("IsEgressNode with the bridge table gone: %v", err)
	}
	if err := in(host, func() error { return Check(cfg) }); !rules.IsDrift(err) {
		t.Fatalf("Check with the bridge table gone: %v", err)
	}
	if err := in(host, Remove); err != nil {
		t.Fatal(err)
	}
	if _, err := in2(host, func() ([]Pod, error) { return UnregisterPods(func(string) bool { return true }) }); err != nil {
		t.Fatalf("unregister without tables: %v", err)
	}
}

func in2(n ns.NetNS, f func() ([]Pod, error)) ([]Pod, error) {
	var out []Pod
	err := in(n, func() error {
		var err error
		out, err = f()
		return err
	})
	return out, err
}

func in3(n ns.NetNS, f func() ([]Gateway, error)) ([]Gateway, error) {
	var out []Gateway
	err := in(n, func() error {
		var err error
		out, err = f()
		return err
	})
	return out, err
}

// A pod whose address or veth name was another container's (whose DEL
// never came) takes them over whole: the departed container's elements
// go, gateway exemption included.
func TestRegisterPodRemovesStale(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	mustApply(t, host, mustParse(t, egressCfg))
	if _, err := in2(host, func() ([]Pod, error) { return RegisterPod(routedGW) }); err != nil {
		t.Fatal(err)
	}
	heir := Pod{ContainerID: "c-new", Port: "veth9", L3: "cni0", IPs: routedGW.IPs}
	stale, err := in2(host, func() ([]Pod, error) { return RegisterPod(heir) })
	if err != nil || len(stale) != 1 || stale[0].ContainerID != routedGW.ContainerID {
		t.Fatalf("stale: %v %v", stale, err)
	}
	if gws, err := in3(host, ListGateways); err != nil || len(gws) != 0 {
		t.Fatalf("a departed gateway's exemption outlived its address: %v %v", gws, err)
	}
	samePort := Pod{ContainerID: "c-third", Port: "veth9", L3: "cni0", IPs: []netip.Addr{netip.MustParseAddr("198.51.100.99")}}
	if stale, err := in2(host, func() ([]Pod, error) { return RegisterPod(samePort) }); err != nil || len(stale) != 1 || stale[0].ContainerID != "c-new" {
		t.Fatalf("port reuse: %v %v", stale, err)
	}
	pods, _ := in2(host, ListPods)
	if len(pods) != 1 || pods[0].ContainerID != "c-third" {
		t.Fatalf("left: %v", pods)
	}
}

// Removers racing for the same entries (a DEL retried while the first
// runs, GC during a DEL) all succeed, and each element is removed once.
func TestUnregisterConcurrent(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	mustApply(t, host, mustParse(t, egressCfg))
	const rounds, removers = 20, 4
	for round := range rounds {
		for i, id := range []string{"c1", "c2"} {
			p := Pod{ContainerID: id, Port: fmt.Sprintf("veth%d", i), L3: "cni0",
				IPs: []netip.Addr{netip.MustParseAddr(fmt.Sprintf("198.51.100.%d", i+1)), netip.MustParseAddr(fmt.Sprintf("2001:db8:10::%d", i+1))}}
			if _, err := in2(host, func() ([]Pod, error) { return RegisterPod(p) }); err != nil {
				t.Fatal(err)
			}
		}
		var mu sync.Mutex
		var all []string
		var wg sync.WaitGroup
		for range removers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				removed, err := in2(host, func() ([]Pod, error) { return UnregisterPods(func(id string) bool { return id == "c1" }) })
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					t.Errorf("round %d: concurrent UnregisterPods: %v", round, err)
				}
				for _, p := range removed {
					all = append(all, p.ContainerID)
				}
			}()
		}
		wg.Wait()
		if !slices.Equal(all, []string{"c1"}) {
			t.Errorf("round %d: removed %v in all, want c1 once", round, all)
		}
		left, err := in2(host, ListPods)
		if err != nil || len(left) != 1 || left[0].ContainerID != "c2" {
			t.Fatalf("round %d: left %v %v", round, left, err)
		}
		if _, err := in2(host, func() ([]Pod, error) { return UnregisterPods(func(string) bool { return true }) }); err != nil {
			t.Fatal(err)
		}
	}
}

// Regression (issue 10): a 2,000-entry allow list lost 1,639 entries
// silently and 10,000 failed. Now 10,000 entries are applied, read back
// and checked.
func TestLargeAllowList(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	var allow []string
	for i := range 10000 {
		// 10,000 disjoint /32s in 100.64.0.0/10 (not merged into ranges).
		allow = append(allow, fmt.Sprintf(`"100.%d.%d.%d/32"`, 64+i/(256*128), (i/128)%256, (i%128)*2))
	}
	cfg := mustParse(t, `{"role":"app","podCIDRs":["198.51.100.0/24"],"allow":[`+strings.Join(allow, ",")+`]}`)
	mustApply(t, host, cfg)
	if err := in(host, func() error { return Check(cfg) }); err != nil {
		t.Fatalf("check of 10,000 entries: %v", err)
	}
	out := nstest.MustExec(t, host, "nft", "list", "set", "inet", Table, SetAllowV4)
	if n := len(regexp.MustCompile(`(^|[^.0-9])100\.`).FindAllString(out, -1)); n != 10000 {
		t.Fatalf("kernel holds %d of 10,000 allow entries", n)
	}
	// Drift in a big set is named.
	nstest.MustExec(t, host, "nft", "delete", "element", "inet", Table, SetAllowV4, "{ 100.64.0.2 }")
	if err := in(host, func() error { return Check(cfg) }); !rules.IsDrift(err) || !strings.Contains(err.Error(), "100.64.0.2") {
		t.Fatalf("check after deleting one element: %v", err)
	}
}

// Regression (issue 10): the IPv6 allow rule replaced by a plain accept
// under the same comment passed Check.
func TestCheckCatchesSwappedExpression(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	cfg := mustParse(t, egressCfg)
	mustApply(t, host, cfg)
	out := nstest.MustExec(t, host, "nft", "-a", "list", "chain", "inet", Table, ChainForward)
	var handle, comment string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "@"+SetAllowV6) {
			handle = l[strings.LastIndex(l, " ")+1:]
			_, rest, ok := strings.Cut(l, `comment "`)
			if !ok {
				t.Fatalf("IPv6 allow rule without a comment: %s", l)
			}
			comment, _, _ = strings.Cut(rest, `"`)
		}
	}
	if handle == "" {
		t.Fatalf("no IPv6 allow rule:\n%s", out)
	}
	nstest.MustExec(t, host, "nft", "replace", "rule", "inet", Table, ChainForward, "handle", handle, "accept", "comment", `"`+comment+`"`)
	err := in(host, func() error { return Check(cfg) })
	if !rules.IsDrift(err) || !strings.Contains(err.Error(), "expressions differ") {
		t.Fatalf("check after swapping the IPv6 allow rule for a plain accept: %v", err)
	}
	// Apply repairs it.
	mustApply(t, host, cfg)
	if err := in(host, func() error { return Check(cfg) }); err != nil {
		t.Fatalf("check after re-apply: %v", err)
	}
}

// Regression (issue 10): `nft list table` output of the node tables
// could not be loaded back (quotes in comments). Both layers' output
// round-trips through `nft -f`, and the pod layer's too.
func TestNftListLoadsBack(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	mustApply(t, host, mustParse(t, egressCfg))
	if _, err := in2(host, func() ([]Pod, error) { return RegisterPod(routedGW) }); err != nil {
		t.Fatal(err)
	}
	// The pod layer in the same namespace, with its defaults.
	rs, err := rules.Build(rules.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	b, err := rules.NewBackend(rules.BackendNFTables, rules.BackendOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := in(host, func() error { return b.Apply(context.Background(), rs) }); err != nil {
		t.Fatal(err)
	}
	dump := nstest.NFTDump(t, host)
	f := filepath.Join(t.TempDir(), "ruleset.nft")
	if err := os.WriteFile(f, []byte(dump), 0o644); err != nil {
		t.Fatal(err)
	}
	nstest.MustExec(t, host, "nft", "flush", "ruleset")
	if out, err := nstest.Exec(host, "nft", "-f", f); err != nil {
		t.Fatalf("nft -f rejects nft list output: %v\n%s\n%s", err, out, dump)
	}
	if again := nstest.NFTDump(t, host); again != dump {
		t.Fatalf("reloaded ruleset differs:\n--- listed\n%s\n--- reloaded\n%s", dump, again)
	}
}

// A namespace holding the format-1 layout (interface patterns, a packet
// mark, gateway sets in the bridge table) is taken over by Apply: the
// old chains and sets go in the same batch.
func TestApplyReplacesFormat1(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	nstest.MustExec(t, host, "nft", `add table inet egress_cni_node
add set inet egress_cni_node gateways_v4 { type ifname . ipv4_addr; }
add chain inet egress_cni_node from_pods
add chain inet egress_cni_node forward { type filter hook forward priority -5; policy accept; }
add rule inet egress_cni_node forward iifname "veth*" jump from_pods
add rule inet egress_cni_node from_pods meta mark & 0x4000 == 0x4000 accept
add rule inet egress_cni_node from_pods iifname . ip saddr @gateways_v4 accept
add table bridge egress_cni_node
add set bridge egress_cni_node gateways_v4 { type ifname . ipv4_addr; }
add chain bridge egress_cni_node prerouting { type filter hook prerouting priority -200; policy accept; }
add rule bridge egress_cni_node prerouting iifname . ip saddr @gateways_v4 meta mark set meta mark | 0x4000`)
	cfg := mustParse(t, egressCfg)
	mustApply(t, host, cfg)
	d := nstest.NFTDump(t, host)
	for _, gone := range []string{"from_pods", "meta mark", `"veth*"`} {
		if strings.Contains(d, gone) {
			t.Errorf("format-1 %q survived Apply:\n%s", gone, d)
		}
	}
	if err := in(host, func() error { return Check(cfg) }); err != nil {
		t.Fatalf("check after taking over format 1: %v", err)
	}
}

func TestRenderIsValidNft(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	for _, c := range []string{egressCfg, `{"role":"app","podCIDRs":["198.51.100.0/24"]}`} {
		cfg := mustParse(t, c)
		if out, err := nstest.Exec(host, "sh", "-c", "nft -c -f - <<'EOF'\n"+Render(cfg)+"EOF\n"); err != nil {
			t.Fatalf("nft -c rejects Render output: %v\n%s\n%s", err, out, Render(cfg))
		}
	}
}

// A node upgraded from format 2 before the drop chains (every drop a
// "counter name dropped|forged drop" in place) is taken over by Apply
// in place: the drop chains and reason counters are added, the pods'
// registrations are kept, and Check then passes. The old layout is made
// from Apply's own tables (nft -f of Render makes objects Apply cannot
// re-add, a separate matter): the base chains' rules rewritten, the drop
// chains and reason counters deleted.
func TestApplyAddsDropChains(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	cfg := mustParse(t, egressCfg)
	mustApply(t, host, cfg)
	if _, err := in2(host, func() ([]Pod, error) { return RegisterPod(bridgedPod) }); err != nil {
		t.Fatal(err)
	}
	p := newProgram(cfg)
	var script []string
	for _, c := range p.chains {
		if c.hook == nil || c.typ != "filter" {
			continue
		}
		fam := familyName(c.family)
		script = append(script, fmt.Sprintf("flush chain %s %s %s", fam, Table, c.name))
		for _, r := range c.rules {
			text := r.String()
			for _, a := range auditSpecs {
				text = strings.ReplaceAll(text, "goto "+AuditChain(a.reason), "counter name "+a.kind+" drop")
			}
			script = append(script, fmt.Sprintf("add rule %s %s %s %s", fam, Table, c.name, text))
		}
	}
	for _, a := range auditSpecs {
		fam := familyName(a.family)
		script = append(script, fmt.Sprintf("delete chain %s %s %s", fam, Table, AuditChain(a.reason)))
		for _, f := range a.families {
			script = append(script, fmt.Sprintf("delete counter %s %s %s", fam, Table, ReasonCounter(a.reason, f)))
		}
	}
	if out, err := nstest.Exec(host, "sh", "-c", "nft -f - <<'EOF'\n"+strings.Join(script, "\n")+"\nEOF\n"); err != nil {
		t.Fatalf("making the old layout: %v\n%s\n%s", err, out, strings.Join(script, "\n"))
	}
	if d := nstest.NFTDump(t, host); strings.Contains(d, "drop_") || !strings.Contains(d, `counter name "dropped" drop`) {
		t.Fatalf("not the old layout:\n%s", d)
	}
	if err := in(host, func() error { return Check(cfg) }); err == nil {
		t.Fatal("Check passed on the layout without drop chains")
	}
	mustApply(t, host, cfg)
	if err := in(host, func() error { return Check(cfg) }); err != nil {
		t.Fatalf("check after Apply over the old layout: %v", err)
	}
	pods, err := in2(host, ListPods)
	if err != nil || len(pods) != 1 || pods[0].ContainerID != bridgedPod.ContainerID {
		t.Fatalf("registration after the upgrade: %v %v", pods, err)
	}
	var k Counters
	err = in(host, func() error {
		var err error
		k, err = ReadCounters()
		return err
	})
	if err != nil || len(k.ByReason) != len(Reasons()) {
		t.Fatalf("reason counters after the upgrade: %+v %v", k, err)
	}
}
