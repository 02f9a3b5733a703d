//go:build linux

package netns_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// The CNI form of Istio's injector argv: the istio-validation container
// runs this as UID/GID 1337 with no capabilities once the CNI plugin set
// up the pod (istio master, injection-template.yaml).
var injectorCNIArgs = []string{"istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
	"-i", "*", "-x", "", "-b", "*", "-d", "15090,15021", "--log_output_level=default:info",
	"--run-validation", "--skip-rule-apply"}

// worldExecutable builds egress-init into a 0755 directory, so that an
// unprivileged UID can run it (t.TempDir is 0700).
func worldExecutable(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "egress-init-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "egress-init")
	goBuild(t, moduleRoot(t), nil, "-o", bin, "./cmd/init")
	return bin
}

// runInitAs runs egress-init inside n as uid:gid, with no supplementary
// groups: setuid from root to a non-zero UID clears every capability.
func runInitAs(t *testing.T, n ns.NetNS, uid, gid uint32, bin string, args ...string) (stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}}}
	var e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &e, &e
	if err := n.Do(func(ns.NetNS) error { return cmd.Start() }); err != nil {
		t.Fatalf("starting egress-init as %d in %s: %v", uid, n.Path(), err)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("egress-init: %v", err)
	}
	return e.String(), code
}

// TestEgressInitValidationAfterCNI: Istio's CNI-mode validation, run as
// the proxy with no capabilities, accepts the rules the egress-cni plugin
// set up (exit 0) and fails with Istio's 126 when they are missing, and
// applies nothing either way. For each backend.
func TestEgressInitValidationAfterCNI(t *testing.T) {
	nstest.RequirePrivileged(t)
	binDir := t.TempDir()
	buildReferencePlugins(t, binDir)
	buildEgressCNI(t, binDir)
	bin := worldExecutable(t)
	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		t.Run(backend, func(t *testing.T) {
			c := newChain(t, binDir, chainOptions{egress: backendKey(backend)})
			web := injectedPod(t, "web")
			c.mustAdd(web)
			before := nstest.DumpAll(t, web.netns)
			start := time.Now()
			out, code := runInitAs(t, web.netns, cniProxyUID, cniProxyUID, bin, injectorCNIArgs...)
			if code != 0 {
				t.Fatalf("validation after the CNI ADD: exit %d:\n%s", code, out)
			}
			if !strings.Contains(out, "validation passed") {
				t.Errorf("validation output lacks the verdict:\n%s", out)
			}
			if d := time.Since(start); d > 4*time.Second {
				t.Errorf("validation took %s with the rules in place", d)
			}
			if after := nstest.DumpAll(t, web.netns); after != before {
				t.Errorf("--skip-rule-apply changed the rules:\nbefore:\n%s\nafter:\n%s", before, after)
			}

			// The app's UID is not the proxy: its loopback connection to
			// 127.0.0.6 is not redirected, so validation as the app fails.
			args := append(slices.Clone(injectorCNIArgs), "--probe-timeout", "2s")
			if out, code := runInitAs(t, web.netns, cniAppUID, cniAppUID, bin, args...); code != 126 {
				t.Errorf("validation as the app UID: exit %d, want 126:\n%s", code, out)
			}

			// Rules missing: 126, Istio's code for the repair controller.
			if _, stderr, code := runInit(t, bin, "--cleanup-only", "--netns", web.path); code != 0 {
				t.Fatalf("--cleanup-only: exit %d: %s", code, stderr)
			}
			missing := nstest.DumpAll(t, web.netns)
			out, code = runInitAs(t, web.netns, cniProxyUID, cniProxyUID, bin, args...)
			if code != 126 || !strings.Contains(out, "validation failed") {
				t.Errorf("validation without rules: exit %d, want 126:\n%s", code, out)
			}
			if after := nstest.DumpAll(t, web.netns); after != missing {
				t.Errorf("validation without rules applied some:\n%s", after)
			}
			if err := c.del(web, web.path); err != nil {
				t.Errorf("DEL: %v", err)
			}
		})
	}
}

// TestEgressInitValidationIPv6: on a pod whose only address is IPv6, the
// validation listens on ::1 and dials ::6, as Istio's does, and tells
// rules in place (0) from rules missing (126). For each backend.
func TestEgressInitValidationIPv6(t *testing.T) {
	nstest.RequirePrivileged(t)
	bin := worldExecutable(t)
	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		t.Run(backend, func(t *testing.T) {
			p := nstest.NewPod(t, nstest.PodOptions{})
			nstest.MustExec(t, p.NS, "ip", "-4", "addr", "flush", "dev", p.IfName)
			args := append(slices.Clone(injectorArgs), "--backend", backend, "--netns", p.NS.Path())
			if _, stderr, code := runInit(t, bin, args...); code != 0 {
				t.Fatalf("apply: exit %d: %s", code, stderr)
			}
			probe := append(slices.Clone(injectorCNIArgs), "--probe-timeout", "2s")
			out, code := runInitAs(t, p.NS, cniProxyUID, cniProxyUID, bin, probe...)
			if code != 0 || !strings.Contains(out, "[::1]:15001") || !strings.Contains(out, "[::6]:15002") {
				t.Fatalf("IPv6 validation with the rules: exit %d, want 0 listening on [::1] and probing [::6]:15002:\n%s", code, out)
			}
			if _, stderr, code := runInit(t, bin, "--cleanup-only", "--netns", p.NS.Path()); code != 0 {
				t.Fatalf("--cleanup-only: exit %d: %s", code, stderr)
			}
			if out, code := runInitAs(t, p.NS, cniProxyUID, cniProxyUID, bin, probe...); code != 126 {
				t.Errorf("IPv6 validation without rules: exit %d, want 126:\n%s", code, out)
			}
		})
	}
}
