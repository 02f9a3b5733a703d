package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/google/go-cmp/cmp"

	"github.com/egress-cni/egress-cni/pkg/cni"
)

var update = flag.Bool("update", false, "rewrite testdata/golden/*")

// helperEnv makes the test binary act as one installer process (for the
// cross-process race test) instead of running tests.
const helperEnv = "EGRESS_CNI_INSTALL_HELPER"

func TestMain(m *testing.M) {
	if spec := os.Getenv(helperEnv); spec != "" {
		os.Exit(helperMain(spec))
	}
	os.Exit(m.Run())
}

// helperMain runs Install a few times against the directories in spec
// ("confdir|bindir|lockfile|binary").
func helperMain(spec string) int {
	p := strings.Split(spec, "|")
	in, err := New(Options{ConfDir: p[0], BinDir: p[1], LockFile: p[2], BinarySource: p[3]})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	for range 20 {
		if _, err := in.Install(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	return 0
}

// line returns the caller's line, so that a failure names its case.
func line() string {
	_, f, l, _ := runtime.Caller(1)
	return fmt.Sprintf("%s:%d", filepath.Base(f), l)
}

// env is a node's CNI directories in a temp dir.
type env struct {
	confDir, binDir, lockFile, readyFile, binary string
}

func newEnv(t *testing.T, fixtures ...string) *env {
	t.Helper()
	root := t.TempDir()
	e := &env{
		confDir:   filepath.Join(root, "etc/cni/net.d"),
		binDir:    filepath.Join(root, "opt/cni/bin"),
		lockFile:  filepath.Join(root, "run/egress-cni/install.lock"),
		readyFile: filepath.Join(root, "run/egress-cni/ready"),
		binary:    filepath.Join(root, "image/egress-cni"),
	}
	for _, d := range []string{e.confDir, e.binDir, filepath.Dir(e.binary)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(e.binary, []byte("#!/bin/sh\necho egress-cni\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range fixtures {
		e.copyFixture(t, f)
	}
	return e
}

func (e *env) copyFixture(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata/primary", name))
	if err != nil {
		t.Fatal(err)
	}
	e.write(t, name, b)
	return b
}

func (e *env) write(t *testing.T, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(e.confDir, name), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func (e *env) read(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.confDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (e *env) names(t *testing.T) []string {
	t.Helper()
	des, err := os.ReadDir(e.confDir)
	if err != nil {
		t.Fatal(err)
	}
	var ns []string
	for _, d := range des {
		ns = append(ns, d.Name())
	}
	return ns
}

func (e *env) installer(t *testing.T, mod ...func(*Options)) *Installer {
	t.Helper()
	o := Options{ConfDir: e.confDir, BinDir: e.binDir, LockFile: e.lockFile, ReadyFile: e.readyFile, BinarySource: e.binary}
	for _, m := range mod {
		m(&o)
	}
	in, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// plugins returns the raw plugin entries of a conflist.
func plugins(t *testing.T, b []byte) [][]byte {
	t.Helper()
	c, err := parseChain(b)
	if err != nil {
		t.Fatalf("parse: %v\n%s", err, b)
	}
	var out [][]byte
	for _, e := range c.elems {
		out = append(out, c.doc.raw(e))
	}
	return out
}

// semantic decodes JSON for a comparison that ignores layout.
func semantic(t *testing.T, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata/golden", name+".golden")
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update)", err)
	}
	if d := cmp.Diff(string(want), string(got)); d != "" {
		t.Errorf("%s differs from golden (-want +got):\n%s", path, d)
	}
}

// checkEntry asserts that the conflist is valid for libcni and ends with
// exactly one entry of ours, which declares the annotations capability.
func checkEntry(t *testing.T, path string) {
	t.Helper()
	l, err := libcni.ConfListFromFile(path)
	if err != nil {
		t.Fatalf("libcni rejects %s: %v", path, err)
	}
	n := 0
	for _, p := range l.Plugins {
		if p.Network.Type == cni.PluginType {
			n++
		}
	}
	last := l.Plugins[len(l.Plugins)-1].Network
	if n != 1 || last.Type != cni.PluginType {
		t.Fatalf("%s: want exactly one %s entry, last; got %d, last %q", path, cni.PluginType, n, last.Type)
	}
	if !last.Capabilities[cni.PodAnnotationsCapability] {
		t.Fatalf("%s: entry lacks capability %s", path, cni.PodAnnotationsCapability)
	}
}

// The golden cycle for every primary CNI: install, install again (no
// write), uninstall (original bytes back), binary in and out.
func TestPrimaryCNIs(t *testing.T) {
	for _, tc := range []struct {
		fixture, result string
	}{
		{"10-bridge.conf", "10-bridge.conflist"},
		{"10-containerd-net.conflist", ""},
		{"10-calico.conflist", ""},
		{"05-cilium.conflist", ""},
		{"10-flannel.conflist", ""},
		{"10-kindnet.conflist", ""},
		{"10-aws-v1.11.conflist", ""},
		{"compact.conflist", ""},
	} {
		t.Run(tc.fixture, func(t *testing.T) {
			e := newEnv(t)
			orig := e.copyFixture(t, tc.fixture)
			result := tc.result
			if result == "" {
				result = tc.fixture
			}
			in := e.installer(t)
			res, err := in.Install()
			if err != nil {
				t.Fatal(err)
			}
			wantAction := ActionInserted
			if result != tc.fixture {
				wantAction = ActionConverted
			}
			if res.Action != wantAction || !res.Binary || filepath.Base(res.File) != result {
				t.Fatalf("result %+v, want %s of %s and the binary", res, wantAction, result)
			}
			got := e.read(t, result)
			golden(t, tc.fixture, got)
			checkEntry(t, filepath.Join(e.confDir, result))
			if want := []string{result}; !slices.Equal(e.names(t), want) {
				t.Fatalf("files %v, want %v (old .conf removed, no temp files)", e.names(t), want)
			}
			// Every other plugin is byte-equal to the original.
			gotPlugins := plugins(t, got)
			var origPlugins [][]byte
			if result == tc.fixture {
				origPlugins = plugins(t, orig)
			} else {
				origPlugins = [][]byte{indentLines(bytes.TrimSpace(orig), embedIndent)}
			}
			if len(gotPlugins) != len(origPlugins)+1 {
				t.Fatalf("%d plugins, want %d", len(gotPlugins), len(origPlugins)+1)
			}
			for i := range origPlugins {
				if !bytes.Equal(gotPlugins[i], origPlugins[i]) {
					t.Errorf("plugin %d changed:\n%s\nwant\n%s", i, gotPlugins[i], origPlugins[i])
				}
			}
			if !in.Ready() || !in.InPlace() {
				t.Fatal("not ready after install")
			}
			if _, err := os.Stat(e.readyFile); err != nil {
				t.Fatalf("ready file: %v", err)
			}
			bin, err := os.Stat(filepath.Join(e.binDir, "egress-cni"))
			if err != nil || bin.Mode().Perm() != 0o755 {
				t.Fatalf("binary: %v %v", bin, err)
			}

			// Idempotent: nothing is written, not even the same bytes.
			fi1, _ := os.Stat(filepath.Join(e.confDir, result))
			time.Sleep(10 * time.Millisecond)
			res, err = e.installer(t).Install()
			if err != nil || res.Changed() {
				t.Fatalf("second install: %+v %v", res, err)
			}
			fi2, _ := os.Stat(filepath.Join(e.confDir, result))
			if !fi1.ModTime().Equal(fi2.ModTime()) || !bytes.Equal(got, e.read(t, result)) {
				t.Fatal("second install rewrote the file")
			}

			// Uninstall gives back the original, byte for byte.
			if err := in.Uninstall(); err != nil {
				t.Fatal(err)
			}
			if want := []string{tc.fixture}; !slices.Equal(e.names(t), want) {
				t.Fatalf("files after uninstall %v, want %v", e.names(t), want)
			}
			if back := e.read(t, tc.fixture); !bytes.Equal(back, orig) {
				t.Errorf("uninstall did not restore the original:\n%s", cmp.Diff(string(orig), string(back)))
			}
			if _, err := os.Stat(filepath.Join(e.binDir, "egress-cni")); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("binary left after uninstall: %v", err)
			}
			if _, err := os.Stat(e.readyFile); !errors.Is(err, fs.ErrNotExist) || in.Ready() {
				t.Fatalf("still ready after uninstall: %v", err)
			}
		})
	}
}

// The AWS VPC CNI ships a plugin of its own with type "egress-cni" (and
// binary /opt/cni/bin/egress-cni). We must refuse, and touch neither.
func TestAWSVPCCNIForeignEgressCNI(t *testing.T) {
	e := newEnv(t)
	orig := e.copyFixture(t, "10-aws.conflist")
	awsBin := []byte("aws egress-cni binary")
	binPath := filepath.Join(e.binDir, "egress-cni")
	if err := os.WriteFile(binPath, awsBin, 0o755); err != nil {
		t.Fatal(err)
	}
	in := e.installer(t)
	_, err := in.Install()
	var fe *ForeignEntryError
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), filepath.Join(e.confDir, "10-aws.conflist")) {
		t.Fatalf("want a ForeignEntryError naming the file, got %v", err)
	}
	if !bytes.Equal(e.read(t, "10-aws.conflist"), orig) {
		t.Fatal("AWS config changed")
	}
	if b, _ := os.ReadFile(binPath); !bytes.Equal(b, awsBin) {
		t.Fatal("AWS egress-cni binary overwritten")
	}
	if in.Ready() {
		t.Fatal("ready although refused")
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(binPath); !bytes.Equal(b, awsBin) || !bytes.Equal(e.read(t, "10-aws.conflist"), orig) {
		t.Fatal("uninstall touched the AWS plugin or its binary")
	}
}

func TestMalformedJSON(t *testing.T) {
	bad := []byte("{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"k8s-pod-network\",\n  \"plugins\": [\n    {\"type\": \"calico\",}\n  ]\n}\n")
	t.Run("named", func(t *testing.T) {
		e := newEnv(t)
		e.write(t, "10-calico.conflist", bad)
		_, err := e.installer(t, func(o *Options) { o.ConfFile = "10-calico.conflist" }).Install()
		path := filepath.Join(e.confDir, "10-calico.conflist")
		if err == nil || !strings.Contains(err.Error(), path) {
			t.Fatalf("want an error naming %s, got %v", path, err)
		}
		if !bytes.Equal(e.read(t, "10-calico.conflist"), bad) || len(e.names(t)) != 1 {
			t.Fatalf("file touched: %v", e.names(t))
		}
		if _, err := os.Stat(filepath.Join(e.binDir, "egress-cni")); err == nil {
			// The binary may be installed; what matters is the config.
			t.Log("binary installed before the config error")
		}
	})
	t.Run("only file", func(t *testing.T) {
		e := newEnv(t)
		e.write(t, "10-calico.conflist", bad)
		_, err := e.installer(t).Install()
		if !IsNoConfig(err) || !strings.Contains(err.Error(), "10-calico.conflist") {
			t.Fatalf("want NoConfigError naming the file, got %v", err)
		}
		if !bytes.Equal(e.read(t, "10-calico.conflist"), bad) {
			t.Fatal("file touched")
		}
	})
	t.Run("skipped like the runtime", func(t *testing.T) {
		e := newEnv(t, "10-flannel.conflist")
		e.write(t, "00-broken.conflist", bad)
		res, err := e.installer(t).Install()
		if err != nil || filepath.Base(res.File) != "10-flannel.conflist" {
			t.Fatalf("%+v %v", res, err)
		}
		if !bytes.Equal(e.read(t, "00-broken.conflist"), bad) {
			t.Fatal("broken file touched")
		}
	})
	t.Run("duplicate keys", func(t *testing.T) {
		e := newEnv(t)
		dup := []byte(`{"cniVersion":"0.3.1","name":"x","plugins":[{"type":"bridge"}],"plugins":[{"type":"ptp"}]}`)
		e.write(t, "10-x.conflist", dup)
		_, err := e.installer(t).Install()
		if err == nil || !strings.Contains(err.Error(), "duplicate key") || !strings.Contains(err.Error(), "10-x.conflist") {
			t.Fatalf("got %v", err)
		}
		if !bytes.Equal(e.read(t, "10-x.conflist"), dup) {
			t.Fatal("file touched")
		}
	})
}

func TestSelection(t *testing.T) {
	e := newEnv(t, "05-cilium.conflist", "10-calico.conflist")
	e.write(t, "00-notype.conf", []byte(`{"cniVersion":"0.3.1","name":"x"}`))
	e.write(t, "01-empty.conflist", []byte(`{"cniVersion":"0.3.1","name":"x","plugins":[]}`))
	e.write(t, "02-ignored.yaml", []byte(`not a config`))
	if err := os.Mkdir(filepath.Join(e.confDir, "03-dir.conf"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		line, confFile, want string
	}{
		{line(), "", "05-cilium.conflist"},
		{line(), "10-calico.conflist", "10-calico.conflist"},
	} {
		in := e.installer(t, func(o *Options) { o.ConfFile = tc.confFile })
		got, err := in.FindConfig()
		if err != nil || filepath.Base(got) != tc.want {
			t.Errorf("%s: got %s %v, want %s", tc.line, got, err, tc.want)
		}
	}
	if _, err := New(Options{ConfFile: "../x.conflist"}); err == nil {
		t.Error("a path as conf file was accepted")
	}
}

func TestFileModeKept(t *testing.T) {
	for _, f := range []string{"10-flannel.conflist", "10-bridge.conf"} {
		e := newEnv(t, f)
		if err := os.Chmod(filepath.Join(e.confDir, f), 0o600); err != nil {
			t.Fatal(err)
		}
		res, err := e.installer(t).Install()
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(res.File)
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: mode %v %v, want 0600", f, fi.Mode(), err)
		}
	}
}

func TestEntryReplacedAndMoved(t *testing.T) {
	e := newEnv(t, "10-flannel.conflist")
	orig := e.read(t, "10-flannel.conflist")
	if _, err := e.installer(t).Install(); err != nil {
		t.Fatal(err)
	}
	// A new plugin.json: replaced in place.
	newEntry := []byte(`{"type":"egress-cni","capture":"all","logLevel":"debug"}`)
	in := e.installer(t, func(o *Options) { o.Entry = newEntry })
	res, err := in.Install()
	if err != nil || res.Action != ActionReplaced {
		t.Fatalf("%+v %v", res, err)
	}
	got := e.read(t, "10-flannel.conflist")
	golden(t, "replaced", got)
	checkEntry(t, filepath.Join(e.confDir, "10-flannel.conflist"))

	// Someone appends a plugin after ours: ours moves back to the end.
	c, _ := parseChain(got)
	withTail := appendElement(got, c.plugins, c.elems, []byte(`{"type":"bandwidth","capabilities":{"bandwidth":true}}`))
	e.write(t, "10-flannel.conflist", withTail)
	if res, err = in.Install(); err != nil || res.Action != ActionMoved {
		t.Fatalf("%+v %v", res, err)
	}
	checkEntry(t, filepath.Join(e.confDir, "10-flannel.conflist"))
	ps := plugins(t, e.read(t, "10-flannel.conflist"))
	if len(ps) != 4 || pluginType(ps[2]) != "bandwidth" {
		t.Fatalf("plugins %q", ps)
	}
	// Duplicates (two installers' worth) collapse to one.
	b := e.read(t, "10-flannel.conflist")
	c, _ = parseChain(b)
	e.write(t, "10-flannel.conflist", appendElement(b, c.plugins, c.elems, in.Entry()))
	if res, err = in.Install(); err != nil || res.Action != ActionMoved {
		t.Fatalf("%+v %v", res, err)
	}
	checkEntry(t, filepath.Join(e.confDir, "10-flannel.conflist"))
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	// The bandwidth plugin someone added stays; the rest is the original.
	got = e.read(t, "10-flannel.conflist")
	c, _ = parseChain(got)
	if d := cmp.Diff(semantic(t, orig), semantic(t, removeElement(got, c.elems, 2))); d != "" {
		t.Fatalf("after uninstall (-want +got):\n%s", d)
	}
}

func TestNormalizeEntry(t *testing.T) {
	for _, tc := range []struct {
		line, in, want, err string
	}{
		{line(), `{"type":"egress-cni"}`, `{"type":"egress-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true}}`, ""},
		{line(), `{}`, `{"type":"egress-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true}}`, ""},
		{line(), "{\n \"capture\": \"all\",\n \"type\": \"egress-cni\"\n}", `{"capture":"all","type":"egress-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true}}`, ""},
		{line(), `{"type":"egress-cni","capabilities":{"portMappings":true}}`, `{"type":"egress-cni","capabilities":{"portMappings":true,"io.kubernetes.cri.pod-annotations":true}}`, ""},
		{line(), `{"type":"egress-cni","capabilities":{"io.kubernetes.cri.pod-annotations":false}}`, `{"type":"egress-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true}}`, ""},
		{line(), `{"type":"egress-cni","capabilities":{}}`, `{"type":"egress-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true}}`, ""},
		{line(), `{"type":"bridge"}`, "", `"type" is "bridge"`},
		{line(), `{"type":"egress-cni","proxyPortt":15001}`, "", "proxyPortt"},
		{line(), `{"type":"egress-cni","proxyPort":"70000"}`, "", "proxyPort"},
		{line(), `{"type":`, "", "invalid JSON"},
		{line(), `[]`, "", "not a JSON object"},
	} {
		got, err := NormalizeEntry([]byte(tc.in))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: error %v, want %q", tc.line, err, tc.err)
			}
			continue
		}
		if err != nil || string(got) != tc.want {
			t.Errorf("%s: got %s %v, want %s", tc.line, got, err, tc.want)
		}
	}
}

// Splicing keeps odd layouts: compact, tabs, a comma on its own line.
func TestSpliceRoundTrip(t *testing.T) {
	entry := []byte(`{"type":"egress-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true}}`)
	for _, tc := range []struct{ line, in string }{
		{line(), `{"name":"n","plugins":[{"type":"a"}]}`},
		{line(), `{"name":"n","plugins":[ {"type":"a"} , {"type":"b"} ]}`},
		{line(), "{\"name\":\"n\",\"plugins\":[\n\t{\"type\":\"a\"}\n\t,\n\t{\"type\":\"b\"}\n]}"},
		{line(), "{\r\n  \"name\": \"n\",\r\n  \"plugins\": [\r\n    {\r\n      \"type\": \"a\"\r\n    }\r\n  ]\r\n}\r\n"},
		{line(), `{"plugins":[{"type":"a","x":[1,2,{"y":"]"}]}],"name":"n","z":1e3}`},
	} {
		out, action, err := ensureEntry([]byte(tc.in), entry)
		if err != nil || action != ActionInserted {
			t.Errorf("%s: %s %v", tc.line, action, err)
			continue
		}
		if !json.Valid(out) {
			t.Errorf("%s: invalid output %s", tc.line, out)
		}
		if again, action, _ := ensureEntry(out, entry); action != ActionNone || !bytes.Equal(again, out) {
			t.Errorf("%s: not idempotent: %s", tc.line, action)
		}
		back, err := removeOurEntries(out)
		if err != nil || string(back) != tc.in {
			t.Errorf("%s: round trip gave %q, %v", tc.line, back, err)
		}
	}
}

// Many installers at once, in one process and in several, converge on
// exactly one entry, and a .conf is converted once.
func TestRacingInstallers(t *testing.T) {
	for _, f := range []string{"10-calico.conflist", "10-bridge.conf"} {
		t.Run("goroutines/"+f, func(t *testing.T) {
			e := newEnv(t, f)
			var wg sync.WaitGroup
			errs := make(chan error, 64)
			for i := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					in := e.installer(t, func(o *Options) {
						if i%2 == 1 {
							o.Entry = []byte(`{"type":"egress-cni","logLevel":"info"}`)
						}
					})
					for range 10 {
						if _, err := in.Install(); err != nil {
							errs <- err
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			names := e.names(t)
			if len(names) != 1 || filepath.Ext(names[0]) != ".conflist" {
				t.Fatalf("files %v", names)
			}
			checkEntry(t, filepath.Join(e.confDir, names[0]))
		})
		t.Run("processes/"+f, func(t *testing.T) {
			e := newEnv(t, f)
			spec := strings.Join([]string{e.confDir, e.binDir, e.lockFile, e.binary}, "|")
			var cmds []*exec.Cmd
			for range 4 {
				cmd := exec.Command(os.Args[0], "-test.run=^$")
				cmd.Env = append(os.Environ(), helperEnv+"="+spec)
				cmd.Stderr = os.Stderr
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				cmds = append(cmds, cmd)
			}
			for _, c := range cmds {
				if err := c.Wait(); err != nil {
					t.Errorf("installer process: %v", err)
				}
			}
			names := e.names(t)
			if len(names) != 1 {
				t.Fatalf("files %v", names)
			}
			checkEntry(t, filepath.Join(e.confDir, names[0]))
		})
	}
}

// Without the lock, a primary CNI that rewrites the file between our read
// and our rename wins; we notice and redo the edit.
func TestConcurrentRewriteDetected(t *testing.T) {
	e := newEnv(t, "10-flannel.conflist")
	path := filepath.Join(e.confDir, "10-flannel.conflist")
	old := e.read(t, "10-flannel.conflist")
	out, _, err := ensureEntry(old, []byte(DefaultEntry))
	if err != nil {
		t.Fatal(err)
	}
	rewritten := append(slices.Clone(old), '\n')
	if err := os.WriteFile(path, rewritten, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writeAtomic(path, out, 0o644, nil, old); !errors.Is(err, errChanged) {
		t.Fatalf("got %v, want errChanged", err)
	}
	if !bytes.Equal(e.read(t, "10-flannel.conflist"), rewritten) || len(e.names(t)) != 1 {
		t.Fatal("the primary's newer file was overwritten, or a temp file left")
	}
}

// When the primary moves (a new CNI sorts first), uninstall still cleans
// every file that holds our entry.
func TestUninstallEveryFile(t *testing.T) {
	e := newEnv(t, "10-flannel.conflist")
	flannel := e.read(t, "10-flannel.conflist")
	in := e.installer(t)
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	cilium := e.copyFixture(t, "05-cilium.conflist")
	if res, err := in.Install(); err != nil || filepath.Base(res.File) != "05-cilium.conflist" {
		t.Fatalf("%+v %v", res, err)
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(e.read(t, "10-flannel.conflist"), flannel) || !bytes.Equal(e.read(t, "05-cilium.conflist"), cilium) {
		t.Fatal("uninstall left an entry")
	}
}

// The primary rewrites its .conf after we converted it: the next install
// converts again over our own conflist, and uninstall restores the newest.
func TestConfRewrittenAfterConversion(t *testing.T) {
	e := newEnv(t, "10-bridge.conf")
	in := e.installer(t)
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	newer := bytes.Replace(e.copyFixture(t, "10-bridge.conf"), []byte("10.22.0.0/16"), []byte("10.23.0.0/16"), 1)
	e.write(t, "10-bridge.conf", newer)
	res, err := in.Install()
	if err != nil || res.Action != ActionConverted {
		t.Fatalf("%+v %v", res, err)
	}
	if !bytes.Contains(e.read(t, "10-bridge.conflist"), []byte("10.23.0.0/16")) || len(e.names(t)) != 1 {
		t.Fatalf("files %v", e.names(t))
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(e.read(t, "10-bridge.conf"), newer) || len(e.names(t)) != 1 {
		t.Fatalf("files %v", e.names(t))
	}
	// A conflist of that name that is not ours blocks the conversion.
	e2 := newEnv(t, "10-bridge.conf")
	e2.write(t, "10-bridge.conflist", []byte(`{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"ptp"}]}`))
	e2.write(t, "00-first.conf", e2.read(t, "10-bridge.conf"))
	if _, err := e2.installer(t, func(o *Options) { o.ConfFile = "10-bridge.conf" }).Install(); err == nil || !strings.Contains(err.Error(), "was not made by") {
		t.Fatalf("got %v", err)
	}
}
