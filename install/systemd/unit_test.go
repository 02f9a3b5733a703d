// Package systemd holds the boot unit that loads the node rules before
// the network (egress-cni-node.service); this test keeps it in step with
// the manifests.
package systemd

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// The unit runs the plugin where the DaemonSets install it, on the copy
// the agent keeps and the plugin's "nodeConfig" names, before the network
// and the kubelet, as a oneshot that stays active.
func TestUnitMatchesManifests(t *testing.T) {
	unit := read(t, "egress-cni-node.service")
	m := regexp.MustCompile(`(?m)^ExecStart=(\S+) boot-apply (\S+)$`).FindStringSubmatch(unit)
	if m == nil {
		t.Fatalf("no ExecStart=PLUGIN boot-apply COPY line:\n%s", unit)
	}
	plugin, copyPath := m[1], m[2]
	for _, ds := range []string{"../kubernetes/daemonset.yaml", "../kubernetes/daemonset-egress.yaml"} {
		d := read(t, ds)
		bin := regexp.MustCompile(`-cni-bin-dir=/host(\S+)`).FindStringSubmatch(d)
		if bin == nil || bin[1]+"/egress-cni" != plugin {
			t.Errorf("%s installs the plugin in %v, the unit runs %s", ds, bin, plugin)
		}
		if !strings.Contains(d, "-node-config-copy=/host"+copyPath) {
			t.Errorf("%s keeps no node config copy at %s, which the unit reads", ds, copyPath)
		}
	}
	if cm := read(t, "../kubernetes/configmap.yaml"); !strings.Contains(cm, `"nodeConfig": "`+copyPath+`"`) {
		t.Errorf("the plugin's nodeConfig is not %s", copyPath)
	}
	for _, want := range []string{"DefaultDependencies=no", "After=local-fs.target nftables.service firewalld.service",
		"Before=network-pre.target kubelet.service", "Wants=network-pre.target",
		"Type=oneshot", "RemainAfterExit=yes", "TimeoutStartSec=", "WantedBy=sysinit.target"} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q", want)
		}
	}
}
