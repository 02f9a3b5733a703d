package node

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/rules"
)

func TestMain(m *testing.M) { nstest.Main(m) }

const egressCfg = `{"role":"egress","podCIDRs":["198.51.100.0/24","2001:db8:10::/48"],"serviceCIDRs":["192.0.2.128/25"],
	"nodeCIDRs":["192.0.2.0/26"],"allow":["192.0.2.53/32"],"uplink":"up0","logDrops":true}`

func in(n ns.NetNS, f func() error) error { return n.Do(func(ns.NetNS) error { return f() }) }

func TestApplyCheckRemoveGateways(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	// Something that is not ours, which must survive everything.
	nstest.MustExec(t, host, "nft", "add table ip other; add chain ip other fw { type filter hook forward priority 0; }; add rule ip other fw counter accept")
	before := nstest.NFTDump(t, host)

	cfg, err := Parse([]byte(egressCfg))
	if err != nil {
		t.Fatal(err)
	}
	if err := in(host, func() error { return Apply(cfg) }); err != nil {
		t.Fatalf("apply: %v", err)
	}
	first := nstest.NFTDump(t, host)
	for _, want := range []string{"table inet egress_cni_node", "table bridge egress_cni_node", `iifname "cni0" jump from_pods`,
		`counter name "dropped" drop`, "masquerade", "198.51.100.0/24", "table ip other"} {
		if !strings.Contains(first, want) {
			t.Errorf("dump lacks %q:\n%s", want, first)
		}
	}
	if err := in(host, func() error { return Check(cfg) }); err != nil {
		t.Fatalf("check after apply: %v", err)
	}

	gw := Gateway{Iface: "vethgw", IP: netip.MustParseAddr("198.51.100.7"), ContainerID: "c0ffee"}
	gw6 := Gateway{Iface: "vethgw", IP: netip.MustParseAddr("2001:db8:10::7"), ContainerID: "c0ffee"}
	if err := in(host, func() error { return AddGateways(gw, gw6) }); err != nil {
		t.Fatalf("add gateway: %v", err)
	}
	// Re-applying keeps gateways and changes nothing else.
	if err := in(host, func() error { return Apply(cfg) }); err != nil {
		t.Fatalf("second apply: %v", err)
	}
	var gws []Gateway
	if err := in(host, func() error { gws, err = ListGateways(); return err }); err != nil || len(gws) != 2 {
		t.Fatalf("gateways after re-apply: %v %v", gws, err)
	}
	if gws[0].ContainerID != "c0ffee" {
		t.Fatalf("container ID not kept as comment: %+v", gws[0])
	}
	var removed []Gateway
	if err := in(host, func() error {
		removed, err = RemoveGateways(func(g Gateway) bool { return g.ContainerID == "c0ffee" })
		return err
	}); err != nil || len(removed) != 2 {
		t.Fatalf("remove gateways: %v %v", removed, err)
	}
	if got := nstest.NFTDump(t, host); got != first {
		t.Fatalf("apply, gateway add+remove, re-apply is not idempotent:\n--- first\n%s\n--- now\n%s", first, got)
	}
	// Removing nothing succeeds.
	if err := in(host, func() error { _, err := RemoveGateways(func(Gateway) bool { return true }); return err }); err != nil {
		t.Fatal(err)
	}

	// Drift: delete the drop rule by hand.
	out := nstest.MustExec(t, host, "nft", "-a", "list", "chain", "inet", Table, ChainFromPods)
	var handle string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "drop") {
			handle = l[strings.LastIndex(l, " ")+1:]
		}
	}
	nstest.MustExec(t, host, "nft", "delete", "rule", "inet", Table, ChainFromPods, "handle", handle)
	err = in(host, func() error { return Check(cfg) })
	if !rules.IsDrift(err) || !strings.Contains(err.Error(), `counter name "dropped" drop`) {
		t.Fatalf("check after tampering: %v", err)
	}

	// Role change: the NAT chain goes away.
	app, _ := Parse([]byte(`{"role":"app","podCIDRs":["198.51.100.0/24"]}`))
	if err := in(host, func() error { return Apply(app) }); err != nil {
		t.Fatal(err)
	}
	if d := nstest.NFTDump(t, host); strings.Contains(d, "masquerade") || strings.Contains(d, "192.0.2.53") {
		t.Fatalf("app role kept egress rules:\n%s", d)
	}
	if err := in(host, func() error { return Check(app) }); err != nil {
		t.Fatalf("check app: %v", err)
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
	if err := in(host, func() error { return AddGateways(gw) }); err != ErrNotApplied {
		t.Fatalf("gateway add without tables: %v", err)
	}
}

func TestRenderIsValidNft(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	cfg, err := Parse([]byte(egressCfg))
	if err != nil {
		t.Fatal(err)
	}
	if out, err := nstest.Exec(host, "sh", "-c", "nft -c -f - <<'EOF'\n"+Render(cfg)+"EOF\n"); err != nil {
		t.Fatalf("nft -c rejects Render output: %v\n%s\n%s", err, out, Render(cfg))
	}
}
