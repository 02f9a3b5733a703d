package main

import (
	"errors"
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
// namespace: it applies the node rules from the host's copy (exit 0),
// finds them in place the second time (exit 0, nothing applied), exits 3
// with a message when there is no copy, and 1 on a copy that does not
// parse, applying nothing in either case.
func TestBootApply(t *testing.T) {
	nstest.RequirePrivileged(t)
	dir := t.TempDir()
	copyPath := filepath.Join(dir, "node.json")
	if err := os.WriteFile(copyPath, []byte(`{"role":"app","podCIDRs":["10.244.0.0/16"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	applied := func(n ns.NetNS) bool {
		var err error
		if e := n.Do(func(ns.NetNS) error { _, err = node.IsEgressNode(); return nil }); e != nil {
			t.Fatal(e)
		}
		if err != nil && !errors.Is(err, node.ErrNotApplied) {
			t.Fatal(err)
		}
		return err == nil
	}

	host := nstest.NewNS(t)
	if code, msg := runPlugin(t, host, "boot-apply", copyPath); code != 0 || !strings.Contains(msg, "node rules applied from "+copyPath) || !applied(host) {
		t.Fatalf("first boot-apply: exit %d, %q, applied %v", code, msg, applied(host))
	}
	if code, msg := runPlugin(t, host, "boot-apply", copyPath); code != 0 || !strings.Contains(msg, "already in place") {
		t.Errorf("second boot-apply: exit %d, %q", code, msg)
	}

	empty := nstest.NewNS(t)
	missing := filepath.Join(dir, "absent.json")
	if code, msg := runPlugin(t, empty, "boot-apply", missing); code != 3 || !strings.Contains(msg, "forwards unjudged") || applied(empty) {
		t.Errorf("boot-apply without a copy: exit %d, %q, applied %v", code, msg, applied(empty))
	}
	bad := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(bad, []byte(`{"role":"app","podCIDRs":["10.244.0.0/33"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, msg := runPlugin(t, empty, "boot-apply", bad); code != 1 || !strings.Contains(msg, "could not apply") || applied(empty) {
		t.Errorf("boot-apply of a bad copy: exit %d, %q, applied %v", code, msg, applied(empty))
	}
	if code, _ := runPlugin(t, empty, "boot-apply"); code != 2 {
		t.Errorf("boot-apply without a path: exit %d, want 2", code)
	}
}
