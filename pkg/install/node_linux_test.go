package install

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// The installer applies the node rules of the config's role in a
// namespace of ours, repairs drift, and removes them on uninstall,
// leaving other tables alone.
func TestNodeRulesInNamespace(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	nstest.MustExec(t, host, "nft", "add table ip other; add chain ip other c { type filter hook forward priority 0; }")

	e := newEnv(t, "10-flannel.conflist")
	nodeCfg := filepath.Join(t.TempDir(), "node.json")
	if err := os.WriteFile(nodeCfg, []byte(`{"role":"egress","podCIDRs":["198.51.100.0/24"],"serviceCIDRs":["192.0.2.128/25"],"uplink":"up0"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	copyPath := filepath.Join(t.TempDir(), "var/lib/egress-cni/node.json")
	state := t.TempDir()
	in := e.installer(t, func(o *Options) {
		o.NodeConfig, o.NetNS, o.RemoveNodeRules, o.NodeConfigCopy, o.StateDir = nodeCfg, host.Path(), true, copyPath, state
	})
	if err := node.WriteIdentity(state, node.Identity{ContainerID: "c1", Namespace: "team-a", Name: "web-0"}); err != nil {
		t.Fatal(err)
	}
	if err := in.ApplyNodeRules(); err != nil {
		t.Fatal(err)
	}
	// The plugin's copy of the node config, for the first ADD after a
	// reboot, holds what was applied.
	if got, err := os.ReadFile(copyPath); err != nil || !strings.Contains(string(got), `"role":"egress"`) {
		t.Fatalf("node config copy: %q %v", got, err)
	}
	dump := nstest.NFTDump(t, host)
	for _, want := range []string{"table inet egress_cni_node", "table bridge egress_cni_node", "masquerade", "198.51.100.0/24", "table ip other"} {
		if !strings.Contains(dump, want) {
			t.Fatalf("dump lacks %q:\n%s", want, dump)
		}
	}
	if err := in.CheckNodeRules(); err != nil {
		t.Fatal(err)
	}
	// Drift: someone deletes our table; the resync check puts it back.
	nstest.MustExec(t, host, "nft", "delete table inet egress_cni_node")
	if err := in.CheckNodeRules(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(nstest.NFTDump(t, host), "table inet egress_cni_node") {
		t.Fatal("drift not repaired")
	}
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	dump = nstest.NFTDump(t, host)
	if strings.Contains(dump, "egress_cni_node") || !strings.Contains(dump, "table ip other") {
		t.Fatalf("after uninstall:\n%s", dump)
	}
	if _, err := os.Stat(copyPath); !os.IsNotExist(err) {
		t.Fatalf("uninstall left the node config copy: %v", err)
	}
	if ids, err := node.ReadIdentities(state); err != nil || len(ids) != 0 {
		t.Fatalf("uninstall left identity records: %v %v", ids, err)
	}
	// Re-install, then uninstall again: clean both ways.
	if err := in.ApplyNodeRules(); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	if err := in.CheckNodeRules(); err != nil {
		t.Fatalf("after re-install: %v", err)
	}
	if _, err := os.Stat(copyPath); err != nil {
		t.Fatalf("re-install did not write the node config copy: %v", err)
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if got := nstest.NFTDump(t, host); strings.Contains(got, "egress_cni_node") || !strings.Contains(got, "table ip other") {
		t.Fatalf("after the second uninstall:\n%s", got)
	}
}
