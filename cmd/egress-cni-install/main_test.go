package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// mainEnv makes the test binary run main() with the arguments after "--".
const mainEnv = "EGRESS_CNI_INSTALL_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(mainEnv) == "1" {
		for i, a := range os.Args {
			if a == "--" {
				os.Args = append([]string{"egress-cni-install"}, os.Args[i+1:]...)
				break
			}
		}
		main()
		return
	}
	os.Exit(m.Run())
}

type node struct{ dir, conf, bin, src, plugin string }

func newNode(t *testing.T) *node {
	t.Helper()
	d := t.TempDir()
	n := &node{dir: d, conf: filepath.Join(d, "net.d"), bin: filepath.Join(d, "bin"), src: filepath.Join(d, "egress-cni"), plugin: filepath.Join(d, "plugin.json")}
	for _, p := range []string{n.conf, n.bin} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		n.src:                                   "binary",
		n.plugin:                                `{"type":"egress-cni","capture":"all"}`,
		filepath.Join(n.conf, "10-bridge.json"): `{"cniVersion":"1.0.0","name":"mynet","type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.22.0.0/16"}}` + "\n",
	}
	for p, c := range files {
		if err := os.WriteFile(p, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// args never include node rules, and serve no metrics: these tests must
// not touch the machine's own network namespace.
func (n *node) args(cmd string, extra ...string) []string {
	return append([]string{cmd, "-cni-conf-dir=" + n.conf, "-cni-bin-dir=" + n.bin, "-binary=" + n.src,
		"-plugin-config=" + n.plugin, "-lock-file=" + filepath.Join(n.dir, "lock"), "-ready-file=" + filepath.Join(n.dir, "ready"),
		"-keep-node-rules", "-metrics-port=0", "-audit-log="}, extra...)
}

func TestInstallUninstallCommands(t *testing.T) {
	n := newNode(t)
	orig, _ := os.ReadFile(filepath.Join(n.conf, "10-bridge.json"))
	if rc := run("install", n.args("install")[1:]); rc != 0 {
		t.Fatalf("install: exit %d", rc)
	}
	b, err := os.ReadFile(filepath.Join(n.conf, "10-bridge.conflist"))
	if err != nil || !strings.Contains(string(b), `"capture": "all"`) || !strings.Contains(string(b), "io.kubernetes.cri.pod-annotations") {
		t.Fatalf("conflist: %v\n%s", err, b)
	}
	if rc := run("ready", n.args("ready")[1:]); rc != 0 {
		t.Fatal("not ready after install")
	}
	if rc := run("uninstall", n.args("uninstall")[1:]); rc != 0 {
		t.Fatalf("uninstall: exit %d", rc)
	}
	back, err := os.ReadFile(filepath.Join(n.conf, "10-bridge.json"))
	if err != nil || !bytes.Equal(back, orig) {
		t.Fatalf("not restored: %v\n%s", err, back)
	}
	if rc := run("ready", n.args("ready")[1:]); rc == 0 {
		t.Fatal("ready after uninstall")
	}
	if rc := run("bogus", nil); rc != 2 {
		t.Fatalf("unknown command: exit %d", rc)
	}
	bad := newNode(t)
	if err := os.WriteFile(bad.plugin, []byte(`{"type":"egress-cni","captrue":"all"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if rc := run("install", bad.args("install")[1:]); rc != 2 {
		t.Fatalf("typo in plugin.json: exit %d, want 2", rc)
	}
}

// SIGTERM with -uninstall-on-exit leaves the node as it was.
func TestRunUninstallOnExit(t *testing.T) {
	n := newNode(t)
	orig, _ := os.ReadFile(filepath.Join(n.conf, "10-bridge.json"))
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^$", "--"}, n.args("run", "-uninstall-on-exit")...)...)
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(n.dir, "ready")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill() // the Fatalf says what went wrong
			_ = cmd.Wait()
			t.Fatalf("never ready:\n%s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v\n%s", err, stderr.String())
	}
	back, err := os.ReadFile(filepath.Join(n.conf, "10-bridge.json"))
	if err != nil || !bytes.Equal(back, orig) {
		t.Fatalf("not restored: %v\n%s\n%s", err, back, stderr.String())
	}
	if ents, _ := os.ReadDir(n.bin); len(ents) != 0 {
		t.Fatalf("binary left: %v", ents)
	}
	if !strings.Contains(stderr.String(), "uninstalled on exit") {
		t.Fatalf("log:\n%s", stderr.String())
	}
}

func TestMetricsAddr(t *testing.T) {
	for _, tc := range []struct {
		bind    string
		port    int
		want    string
		wantErr bool
	}{
		{"", 9964, ":9964", false},
		{"192.0.2.7", 9964, "192.0.2.7:9964", false},
		{"2001:db8::7", 9964, "[2001:db8::7]:9964", false},
		{"", 0, "", false},
		{"node.example", 9964, "", true},
		{"", 70000, "", true},
		{"", -1, "", true},
	} {
		got, err := metricsAddr(tc.bind, tc.port)
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("metricsAddr(%q, %d) = %q, %v; want %q, error %v", tc.bind, tc.port, got, err, tc.want, tc.wantErr)
		}
	}
}
