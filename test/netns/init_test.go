//go:build linux

package netns_test

import (
	"bytes"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Istio's injector passes exactly these arguments to istio-iptables.
var injectorArgs = []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
	"-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}

// buildEgressInit builds egress-init into the test's temp dir (the Go
// build cache makes the second build cheap).
func buildEgressInit(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "egress-init")
	cmd := exec.Command("go", "build", "-o", path, "./cmd/init")
	cmd.Dir = moduleRoot(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building egress-init: %v\n%s", err, out)
	}
	return path
}

func runInit(t *testing.T, bin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	code = exitCode(t, cmd)
	return o.String(), e.String(), code
}

// exitCode runs egress-init's cmd and returns its exit code; failing to
// run it at all fails the test.
func exitCode(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return ee.ExitCode()
	case err != nil:
		t.Fatalf("running egress-init: %v", err)
	}
	return 0
}

// TestEgressInitInjectorArgs runs the egress-init binary with the
// injector's arguments in a fresh pod for each backend and checks real
// traffic, --check, the dry run and cleanup.
func TestEgressInitInjectorArgs(t *testing.T) {
	nstest.RequirePrivileged(t)
	bin := buildEgressInit(t)
	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		t.Run(backend, func(t *testing.T) {
			p := nstest.NewPod(t, nstest.PodOptions{})
			nstest.ServeProxy(t, p.NS, 15001)
			nstest.ServeEcho(t, p.World, ":80")
			target := nstest.InternetIPv4.String() + ":80"
			if r := parseReply(t, nstest.MustDial(t, p.NS, 1000, 1000, "tcp", target)); r.Kind != "direct" {
				t.Fatalf("before egress-init the app must go direct, got %+v", r)
			}
			before := ownDump(t, p, rules.BackendName(backend))

			args := append(append([]string{}, injectorArgs...), "--backend", backend, "--netns", p.NS.Path())
			if _, stderr, code := runInit(t, bin, args...); code != 0 {
				t.Fatalf("egress-init %v: exit %d: %s", args, code, stderr)
			}
			if r := parseReply(t, nstest.MustDial(t, p.NS, 1000, 1000, "tcp", target)); r.Kind != "proxy" || r.Orig.String() != target {
				t.Fatalf("app uid 1000: want the proxy with orig %s, got %+v", target, r)
			}
			if r := parseReply(t, nstest.MustDial(t, p.NS, 1337, 1337, "tcp", target)); r.Kind != "direct" {
				t.Fatalf("proxy uid 1337 must go direct, got %+v", r)
			}
			// auto must now pick what we applied with, and agree with it.
			if _, stderr, code := runInit(t, bin, append(append([]string{}, injectorArgs...), "--check", "--netns", p.NS.Path())...); code != 0 {
				t.Fatalf("--check with auto after applying with %s: exit %d: %s", backend, code, stderr)
			}
			// A different config is drift: exit 1, naming a rule.
			_, stderr, code := runInit(t, bin, append(append([]string{}, injectorArgs...), "-x", "198.51.100.0/24", "--check", "--backend", backend, "--netns", p.NS.Path())...)
			if code != 1 || !strings.Contains(stderr, "198.51.100.0") {
				t.Fatalf("--check of another config: exit %d, stderr %q", code, stderr)
			}
			// Dry run: the backend's own syntax, and nothing changes.
			applied := ownDump(t, p, rules.BackendName(backend))
			out, stderr, code := runInit(t, bin, append(append([]string{}, injectorArgs...), "-x", "198.51.100.0/24", "--dry-run", "--backend", backend, "--netns", p.NS.Path())...)
			if code != 0 {
				t.Fatalf("--dry-run: exit %d: %s", code, stderr)
			}
			want := []string{"-A ISTIO_OUTPUT", "--to-ports 15001", "198.51.100.0/24", "COMMIT"}
			if backend == "nftables" {
				want = []string{"table inet egress_cni", "redirect to :15001", "198.51.100.0/24"}
			}
			for _, w := range want {
				if !strings.Contains(out, w) {
					t.Errorf("--dry-run output lacks %q:\n%s", w, out)
				}
			}
			if got := ownDump(t, p, rules.BackendName(backend)); got != applied {
				t.Fatalf("--dry-run changed the namespace")
			}
			if _, stderr, code := runInit(t, bin, "--cleanup-only", "--netns", p.NS.Path()); code != 0 {
				t.Fatalf("--cleanup-only: exit %d: %s", code, stderr)
			}
			if got := ownDump(t, p, rules.BackendName(backend)); got != before {
				t.Fatalf("--cleanup-only left rules:\n%s", got)
			}
		})
	}
}

// TestEgressInitBadFlags: bad flags exit 2 with a message naming the flag
// and the value, and nothing is applied.
func TestEgressInitBadFlags(t *testing.T) {
	nstest.RequirePrivileged(t)
	bin := buildEgressInit(t)
	p := nstest.NewPod(t, nstest.PodOptions{})
	before := nstest.DumpAll(t, p.NS)
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"-x", "10.0.0.0/33"}, `istio-service-exclude-cidr "10.0.0.0/33"`},
		{[]string{"-p", "70000"}, `envoy-port "70000"`}, // istio-iptables' long name (was proxy-port)
		{[]string{"-u", "abc"}, `proxy-uid "abc"`},
		{[]string{"-d", "15090,,15021"}, `istio-local-exclude-ports "15090,,15021"`},
		// TPROXY is built now (was refused); a bad mark is still an error.
		{[]string{"-m", "TPROXY", "-t", "1338"}, `istio-inbound-tproxy-mark "1338"`},
		{[]string{"--backend", "ebpf"}, `backend "ebpf"`},
		{[]string{"-i", "10.0.0.0/16", "-x", "10.0.0.0/8"}, "entirely covered"},
		{[]string{"--no-such-flag"}, "no-such-flag"},
	}
	for _, tc := range cases {
		args := append(append([]string{}, injectorArgs...), tc.args...)
		args = append(args, "--netns", p.NS.Path())
		_, stderr, code := runInit(t, bin, args...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit 2 naming %q", tc.args, code, stderr, tc.want)
		}
	}
	if got := nstest.DumpAll(t, p.NS); got != before {
		t.Fatalf("bad flags changed the namespace:\n%s", got)
	}
}

func parseReply(t *testing.T, s string) nstest.Reply {
	t.Helper()
	r, err := nstest.ParseReply(s)
	if err != nil {
		t.Fatalf("reply %q: %v", s, err)
	}
	return r
}
