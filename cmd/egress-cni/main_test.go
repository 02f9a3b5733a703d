package main

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// The test binary is the plugin when this is set (see runPlugin).
const mainEnv = "EGRESS_CNI_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(mainEnv) == "1" {
		os.Args = append([]string{"egress-cni"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runPlugin runs `egress-cni ARGS` (this test binary as the plugin's
// main) in n and returns its exit code and stderr.
func runPlugin(t *testing.T, n ns.NetNS, args ...string) (int, string) {
	t.Helper()
	var code int
	var stderr strings.Builder
	if err := n.Do(func(ns.NetNS) error {
		cmd := exec.Command(os.Args[0], args...)
		cmd.Env = append(os.Environ(), mainEnv+"=1")
		cmd.Stderr = &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
			return nil
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return code, stderr.String()
}

// boot-apply, as the boot unit runs it in a rebooted node's host
// namespace. From a good copy it applies the node rules (exit 0), also
// over a stale snapshot of other rules of ours, and drops the
// registrations it finds (none survives a reboot). Without a copy (exit
// 3), with a copy that does not parse or that others could have written
// (exit 1), it leaves the fail-closed table: nothing is forwarded. A
// later boot-apply from a good copy replaces that table.
func TestBootApply(t *testing.T) {
	nstest.RequirePrivileged(t)
	dir := t.TempDir()
	write := func(name, body string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("node.json", `{"role":"app","podCIDRs":["10.244.0.0/16"]}`, 0o644)
	// state says what the namespace holds: "rules" (the node rules of
	// the good copy, and how many pods are registered), "fail-closed"
	// (no sets; source, output and a forward chain with policy drop) or
	// "none".
	state := func(n ns.NetNS) (string, int) {
		var st string
		var pods int
		if err := n.Do(func(ns.NetNS) error {
			if err := node.Check(mustLoad(t, good)); err == nil {
				st = "rules"
				ps, err := node.ListPods()
				pods = len(ps)
				return err
			}
			out, err := exec.Command("nft", "list", "table", "inet", node.Table).CombinedOutput()
			switch {
			case err != nil && strings.Contains(string(out), "No such file"):
				st = "none"
			case err != nil:
				return fmt.Errorf("nft: %w: %s", err, out)
			case strings.Contains(string(out), "hook forward priority filter - 5; policy drop;") && strings.Count(string(out), "chain ") == 3 &&
				!strings.Contains(string(out), "set "):
				st = "fail-closed"
			default:
				st = "other:\n" + string(out)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return st, pods
	}

	host := nstest.NewNS(t)
	// A stale snapshot: rules of another config, with a registration.
	if err := host.Do(func(ns.NetNS) error {
		if err := node.Apply(mustParseCfg(t, `{"role":"app","podCIDRs":["10.244.0.0/16"],"allow":["0.0.0.0/1","128.0.0.0/1"]}`)); err != nil {
			return err
		}
		_, err := node.RegisterPod(node.Pod{ContainerID: "before-reboot", Port: "veth1", L3: "veth1", IPs: []netip.Addr{netip.MustParseAddr("10.244.0.9")}})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if code, msg := runPlugin(t, host, "boot-apply", good); code != 0 || !strings.Contains(msg, "node rules applied from "+good) {
		t.Fatalf("boot-apply over a stale snapshot: exit %d, %q", code, msg)
	}
	if st, pods := state(host); st != "rules" || pods != 0 {
		t.Errorf("after boot-apply over a stale snapshot: %s with %d pods, want the copy's rules and no registration", st, pods)
	}

	bad := write("bad.json", `{"role":"app","podCIDRs":["10.244.0.0/33"]}`, 0o644)
	open := write("open.json", `{"role":"app","podCIDRs":["10.244.0.0/16"]}`, 0o666)
	// A link to a file that is root's and safe is refused as a link: what
	// it points at can change under it.
	link := filepath.Join(dir, "link.json")
	if err := os.Symlink(good, link); err != nil {
		t.Fatal(err)
	}
	// So is a copy whose directory is a link (into a container image's
	// root-owned files, say).
	target := filepath.Join(dir, "elsewhere")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "node.json"), []byte(`{"role":"app","podCIDRs":["10.244.0.0/16"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, filepath.Join(dir, "linkdir")); err != nil {
		t.Fatal(err)
	}
	linkDir := filepath.Join(dir, "linkdir", "node.json")
	for _, tc := range []struct {
		name, path, msg string
		code            int
	}{
		{"no copy", filepath.Join(dir, "absent.json"), "no node config copy", 3},
		{"a copy that does not parse", bad, "could not apply", 1},
		{"a copy others could write", open, "writable by root only", 1},
		{"a symbolic link", link, "symbolic link", 1},
		{"a copy in a linked directory", linkDir, "symbolic link", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := nstest.NewNS(t)
			code, msg := runPlugin(t, n, "boot-apply", tc.path)
			if code != tc.code || !strings.Contains(msg, tc.msg) || !strings.Contains(msg, "forwards nothing") {
				t.Errorf("exit %d, %q: want %d, naming %q and the fail-closed table", code, msg, tc.code, tc.msg)
			}
			if st, _ := state(n); st != "fail-closed" {
				t.Errorf("left %s, want the fail-closed table", st)
			}
			// The next boot-apply from a good copy replaces it.
			if code, msg := runPlugin(t, n, "boot-apply", good); code != 0 {
				t.Errorf("boot-apply from a good copy after: exit %d, %q", code, msg)
			}
			if st, _ := state(n); st != "rules" {
				t.Errorf("after a good boot-apply: %s, want the rules", st)
			}
		})
	}
	if code, _ := runPlugin(t, host, "boot-apply"); code != 2 {
		t.Errorf("boot-apply without a path: exit %d, want 2", code)
	}
}

func mustLoad(t *testing.T, path string) *node.Config {
	t.Helper()
	cfg, err := node.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func mustParseCfg(t *testing.T, s string) *node.Config {
	t.Helper()
	cfg, err := node.Parse([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}
