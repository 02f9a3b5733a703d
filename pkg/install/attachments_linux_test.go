package install

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// A pod whose namespace holds a macvlan on a device of the host (Multus
// style) is found; a pod with only its veth, and one that made a
// macvlan on its own veth (NET_ADMIN), are not: their traffic still
// crosses the host's stack.
func TestScanAttachments(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	multus := nstest.NewNS(t)
	plain := nstest.NewNS(t)
	// The "host" has an uplink-like veth; a macvlan on it moves into
	// the multus pod. The plain pod is wired by a veth to the host and
	// stacks a macvlan on its own end.
	nstest.MustExec(t, host, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
	nstest.MustExec(t, host, "ip", "link", "add", "link", "up0", "name", "net1", "type", "macvlan", "mode", "bridge")
	nstest.MustExec(t, host, "ip", "link", "set", "net1", "netns", multus.Path())
	nstest.MustExec(t, host, "ip", "link", "add", "vethp", "type", "veth", "peer", "name", "eth0", "netns", plain.Path())
	nstest.MustExec(t, plain, "ip", "link", "add", "link", "eth0", "name", "mac0", "type", "macvlan")

	// The runtime's pin directory, holding the host itself too (which
	// is skipped).
	dir := t.TempDir()
	for name, n := range map[string]ns.NetNS{"cni-multus": multus, "cni-plain": plain, "host": host} {
		if err := os.Symlink(n.Path(), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "not-a-netns"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	found, err := ScanAttachments(dir, host.Path())
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0].Iface != "net1" || found[0].Kind != "macvlan" || !strings.HasSuffix(found[0].NetNS, "cni-multus") {
		t.Fatalf("found %v, want only net1 (macvlan) in cni-multus", found)
	}
	// The installer counts them.
	e := newEnv(t, "10-flannel.conflist")
	in := e.installer(t, func(o *Options) { o.NetNSDir, o.NetNS = dir, host.Path() })
	in.scanAttachments()
	if in.Unenforceable() != 1 {
		t.Fatalf("installer counts %d unenforceable attachments, want 1", in.Unenforceable())
	}
	// The attachment goes away: the count follows.
	nstest.MustExec(t, multus, "ip", "link", "del", "net1")
	in.scanAttachments()
	if in.Unenforceable() != 0 {
		t.Fatalf("after the macvlan is gone: %d", in.Unenforceable())
	}
	if got, err := ScanAttachments(filepath.Join(dir, "missing"), ""); err != nil || got != nil {
		t.Fatalf("missing dir: %v %v", got, err)
	}
}
