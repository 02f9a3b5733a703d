//go:build linux

// Package demo_test runs `make demo`'s program end to end: it builds
// egress-demo, egress-cni and egress-cni-install, runs the demo as root,
// and checks that every path of its table holds and that it leaves no
// network namespace behind, also when interrupted.
package demo_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// wantRows is how many paths the demo's table has.
const wantRows = 16

// moduleRoot is the egress-cni module's root.
func moduleRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// build builds the demo and the two binaries it runs into one directory,
// as `make build` does into bin/.
func build(t *testing.T) (binDir, pluginsDir string) {
	t.Helper()
	root := moduleRoot(t)
	binDir = t.TempDir()
	if err := os.Chmod(binDir, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for _, c := range []struct{ out, pkg string }{
		{"egress-demo", "./cmd/egress-demo"},
		{"egress-cni", "./cmd/egress-cni"},
		{"egress-cni-install", "./cmd/egress-cni-install"},
	} {
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", filepath.Join(binDir, c.out), c.pkg)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", c.pkg, err, out)
		}
	}
	// The reference plugins' cache is make demo's, so that either run
	// fills it for the other.
	return binDir, filepath.Join(root, "bin", "cni-plugins")
}

// leftNamespaces lists the namespaces the demo with that PID left.
func leftNamespaces(t *testing.T, pid int) []string {
	t.Helper()
	entries, err := os.ReadDir("/run/netns")
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var left []string
	prefix := fmt.Sprintf("egress-sim-%d-", pid)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			left = append(left, e.Name())
		}
	}
	return left
}

func TestDemo(t *testing.T) {
	nstest.RequirePrivileged(t)
	binDir, pluginsDir := build(t)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "egress-demo"), "-bin", binDir, "-plugins-dir", pluginsDir)
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	t.Logf("egress-demo (%s):\n%s", took.Round(time.Millisecond), out.String())
	if err != nil {
		t.Fatalf("egress-demo: %v", err)
	}
	if left := leftNamespaces(t, cmd.Process.Pid); len(left) > 0 {
		t.Errorf("egress-demo left network namespaces: %v", left)
	}

	// The table: a header, then one row per path, each ending in "ok".
	var rows []string
	inTable := false
	sc := bufio.NewScanner(bytes.NewReader(out.Bytes()))
	for sc.Scan() {
		l := sc.Text()
		switch {
		case strings.HasPrefix(l, "PATH") && strings.Contains(l, "EXPECTED") && strings.Contains(l, "SEEN") && strings.HasSuffix(l, "OK"):
			inTable = true
		case inTable && strings.TrimSpace(l) == "":
			inTable = false
		case inTable:
			rows = append(rows, l)
		}
	}
	if len(rows) != wantRows {
		t.Errorf("table has %d rows, want %d", len(rows), wantRows)
	}
	for _, r := range rows {
		if !strings.HasSuffix(r, "  ok") {
			t.Errorf("path did not hold: %s", r)
		}
	}
	for _, want := range []string{
		"allowed via gateway, internet saw 192.0.2.6",
		"blocked at node (drop counter +",
		// The agents' audit names the pod of each blocked path.
		"audit: not-a-gateway team-b/no-sidecar 198.51.100.3 -> 203.0.113.10:8080/tcp",
		"audit: forged-source team-c/worker 198.51.100.66 -> 203.0.113.10:8080/udp",
		`"namespace":"team-x","pod":"self-declared-gw"`,
		"RESULT: every path behaved as expected",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
	// Under a minute once the reference plugins are built.
	if strings.Contains(out.String(), "): cached in") && took > time.Minute {
		t.Errorf("egress-demo took %s, want under a minute", took)
	}
}

// TestDemoInterrupted sends SIGINT while the pods exist: the demo must
// exit 130 and remove everything it made.
func TestDemoInterrupted(t *testing.T) {
	nstest.RequirePrivileged(t)
	binDir, pluginsDir := build(t)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "egress-demo"), "-bin", binDir, "-plugins-dir", pluginsDir)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var seen strings.Builder
	sc := bufio.NewScanner(stdout)
	interrupted := false
	var children []string
	for sc.Scan() {
		seen.WriteString(sc.Text() + "\n")
		if !interrupted && strings.HasPrefix(sc.Text(), "[5/5]") {
			if left := leftNamespaces(t, cmd.Process.Pid); len(left) < 8 {
				t.Errorf("before the interrupt: namespaces %v, want the cluster's 8", left)
			}
			// The sidecar stand-in is running by now.
			out, _ := exec.Command("pgrep", "-P", fmt.Sprint(cmd.Process.Pid)).Output()
			children = strings.Fields(string(out))
			if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
				t.Fatal(err)
			}
			interrupted = true
		}
	}
	err = cmd.Wait()
	t.Logf("egress-demo, interrupted:\n%s%s", seen.String(), stderr.String())
	if !interrupted {
		t.Fatalf("the demo ended before its traffic step: %v", err)
	}
	if code := cmd.ProcessState.ExitCode(); code != 130 {
		t.Errorf("exit code %d after SIGINT, want 130", code)
	}
	if left := leftNamespaces(t, cmd.Process.Pid); len(left) > 0 {
		t.Errorf("interrupted egress-demo left network namespaces: %v", left)
	}
	if len(children) == 0 {
		t.Errorf("no child process (sidecar stand-in) seen before the interrupt")
	}
	for _, pid := range children {
		if _, err := os.Stat("/proc/" + pid); err == nil {
			t.Errorf("interrupted egress-demo left its child process %s running", pid)
		}
	}
}
