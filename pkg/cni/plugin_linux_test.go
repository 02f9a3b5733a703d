package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/rules"
)

// fakePlugin is a plugin over rules.NewFake: what ADD applies is
// recorded per network namespace, and f.Dump() shows it.
func fakePlugin() (*Plugin, *rules.Fake, *bytes.Buffer) {
	f := rules.NewFake()
	out := &bytes.Buffer{}
	return &Plugin{NewBackend: f.NewBackend, RemoveAll: f.RemoveAll, CheckNoneOurs: f.CheckNoneOurs, Stdout: out}, f, out
}

// The -update flag rewrites the golden files under testdata/.
var update = flag.Bool("update", false, "rewrite golden files under testdata/")

// golden compares got with testdata/NAME.golden.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs:\n--- want\n%s\n--- got\n%s", path, want, got)
	}
}

const podArgs = "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c1"

// stdin builds the stdin of a chained call as libcni does.
func stdin(cniVersion, extra string, ann map[string]string, withPrev bool) []byte {
	m := map[string]any{"cniVersion": cniVersion, "name": "net", "type": "egress-cni", "logFile": ""}
	if extra != "" {
		var e map[string]any
		if err := json.Unmarshal([]byte("{"+extra+"}"), &e); err != nil {
			panic(err)
		}
		for k, v := range e {
			m[k] = v
		}
	}
	if ann != nil {
		m["runtimeConfig"] = map[string]any{PodAnnotationsCapability: ann}
	}
	if withPrev {
		prev := map[string]any{
			"cniVersion": cniVersion,
			"interfaces": []any{map[string]any{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/x"}},
			"ips":        []any{map[string]any{"address": "198.51.100.5/24", "gateway": "198.51.100.1", "interface": 0}},
			"dns":        map[string]any{"nameservers": []any{"198.51.100.53"}},
		}
		if cniVersion == "0.4.0" {
			prev["ips"].([]any)[0].(map[string]any)["version"] = "4"
		}
		m["prevResult"] = prev
	}
	b, _ := json.Marshal(m)
	return b
}

func TestAddPrintsPrevResultInRequestedVersion(t *testing.T) {
	for _, v := range []string{"0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			p, f, out := fakePlugin()
			err := p.Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Args: podArgs, StdinData: stdin(v, "", injected(), true)})
			if err != nil {
				t.Fatal(err)
			}
			// Istio's defaults, in this (the test's) namespace, once.
			golden(t, "fake/add-injected", f.Dump())
			if n := f.Applies(); n != 1 {
				t.Errorf("applied %d times, want once", n)
			}
			var res map[string]any
			if err := json.Unmarshal(out.Bytes(), &res); err != nil {
				t.Fatalf("stdout is not JSON: %v: %s", err, out)
			}
			if res["cniVersion"] != v {
				t.Errorf("cniVersion = %v, want %s", res["cniVersion"], v)
			}
			ips, _ := res["ips"].([]any)
			if len(ips) != 1 || ips[0].(map[string]any)["address"] != "198.51.100.5/24" {
				t.Errorf("ips = %v", res["ips"])
			}
		})
	}
}

func TestAddSkippedPodStillPassesResultThrough(t *testing.T) {
	p, f, out := fakePlugin()
	err := p.Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Args: podArgs, StdinData: stdin("1.0.0", "", map[string]string{}, true)})
	if err != nil {
		t.Fatal(err)
	}
	if d := f.Dump(); d != "" {
		t.Errorf("skipped pod got rules:\n%s", d)
	}
	if !strings.Contains(out.String(), "198.51.100.5/24") {
		t.Errorf("stdout = %s", out)
	}
}

func TestAddErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stdin []byte
		code  uint
		msg   []string
	}{
		{"no prevResult", stdin("1.0.0", "", injected(), false), types.ErrInvalidNetworkConfig, []string{"prevResult"}},
		{"bad annotation", stdin("1.0.0", "", injected(AnnotationExcludeOutboundIPRanges, "10.0.0.0/33"), true),
			types.ErrInvalidNetworkConfig, []string{"team-a/web-0", AnnotationExcludeOutboundIPRanges, "10.0.0.0/33"}},
		{"bad config", stdin("1.0.0", `"proxyPort": "x"`, injected(), true),
			types.ErrInvalidNetworkConfig, []string{"proxyPort", `"x"`}},
		{"unknown key", stdin("1.0.0", `"proxyport2": 1`, injected(), true),
			types.ErrInvalidNetworkConfig, []string{"proxyport2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, f, out := fakePlugin()
			err := p.Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Args: podArgs, StdinData: tc.stdin})
			var te *types.Error
			if !errors.As(err, &te) {
				t.Fatalf("error %v (%T) is not a *types.Error", err, err)
			}
			if te.Code != tc.code {
				t.Errorf("code = %d, want %d: %s", te.Code, tc.code, te.Msg)
			}
			for _, s := range tc.msg {
				if !strings.Contains(te.Msg, s) {
					t.Errorf("message %q does not contain %q", te.Msg, s)
				}
			}
			if d := f.Dump(); d != "" || out.Len() != 0 {
				t.Errorf("touched the namespace (holds %q) or printed %q", d, out)
			}
		})
	}
}

func TestAddMissingNetns(t *testing.T) {
	p, _, _ := fakePlugin()
	err := p.Add(&skel.CmdArgs{ContainerID: "c1", Netns: "/nonexistent/egress-cni-test", IfName: "eth0", Args: podArgs,
		StdinData: stdin("1.0.0", "", injected(), true)})
	if Code(err) != types.ErrUnknownContainer || !strings.Contains(err.Error(), "team-a/web-0") {
		t.Errorf("err = %v (code %d), want code 3 naming the pod", err, Code(err))
	}
}

func TestDelIsLenient(t *testing.T) {
	for _, tc := range []struct {
		name  string
		netns string
		stdin []byte
	}{
		{"empty netns, no prevResult", "", stdin("1.0.0", "", nil, false)},
		{"namespace gone", "/nonexistent/egress-cni-test", stdin("1.1.0", "", injected(), true)},
		{"bad config", "", stdin("1.0.0", `"proxyPort": "x"`, nil, false)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, f, out := fakePlugin()
			rs, err := rules.Build(rules.DefaultConfig())
			if err != nil {
				t.Fatal(err)
			}
			if err := f.Apply(context.Background(), rs); err != nil {
				t.Fatal(err)
			}
			before := f.Dump()
			if err := p.Del(&skel.CmdArgs{ContainerID: "c1", Netns: tc.netns, IfName: "eth0", Args: podArgs, StdinData: tc.stdin}); err != nil {
				t.Fatal(err)
			}
			if after := f.Dump(); after != before || out.Len() != 0 {
				t.Errorf("removed through the backend (holds %q), stdout %q", after, out)
			}
		})
	}
}

// CHECK compares the namespace with what ADD would apply now: nothing
// there, or other rules, is drift naming the pod and the lines; what ADD
// applied is not.
func TestCheckDrift(t *testing.T) {
	p, _, _ := fakePlugin()
	args := func(ann map[string]string) *skel.CmdArgs {
		return &skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Args: podArgs, StdinData: stdin("1.0.0", "", ann, true)}
	}
	err := p.Check(args(injected()))
	if err == nil || !strings.Contains(err.Error(), "ruleset drift") || !strings.Contains(err.Error(), "missing: table inet egress_cni {") ||
		!strings.Contains(err.Error(), "team-a/web-0") || !strings.Contains(err.Error(), "capture rules differ") {
		t.Errorf("CHECK before ADD: err = %v", err)
	}
	if err := p.Add(args(injected())); err != nil {
		t.Fatal(err)
	}
	if err := p.Check(args(injected())); err != nil {
		t.Errorf("CHECK after ADD: %v", err)
	}
	// The annotations changed since ADD: the new exclusion is missing.
	err = p.Check(args(injected(AnnotationExcludeOutboundIPRanges, "192.0.2.0/24")))
	if err == nil || !strings.Contains(err.Error(), "missing, 0 extra") || !strings.Contains(err.Error(), "missing: 192.0.2.0/24") {
		t.Errorf("CHECK with a new exclusion: err = %v", err)
	}
}

// The configured backend is the one that applies, in its own syntax.
func TestAddConfiguredBackend(t *testing.T) {
	p, f, _ := fakePlugin()
	in := stdin("1.0.0", `"backend": "iptables-legacy"`, injected(AnnotationExcludeOutboundIPRanges, "192.0.2.0/24"), true)
	if err := p.Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Args: podArgs, StdinData: in}); err != nil {
		t.Fatal(err)
	}
	golden(t, "fake/add-iptables-legacy-exclusion", f.Dump())
}

func TestStatusAndGC(t *testing.T) {
	p, _, out := fakePlugin()
	if err := p.GC(&skel.CmdArgs{StdinData: stdin("1.1.0", "", nil, false)}); err != nil {
		t.Error(err)
	}
	if err := p.Status(&skel.CmdArgs{StdinData: stdin("1.1.0", `"backend": "iptables-nft"`, nil, false)}); err != nil {
		t.Logf("status with iptables-nft: %v (code %d)", err, Code(err))
		if Code(err) != types.ErrPluginNotAvailable {
			t.Error("want code 50")
		}
	}
	if out.Len() != 0 {
		t.Errorf("stdout = %q", out)
	}
}

func TestAddLogs(t *testing.T) {
	logFile := filepath.Join(t.TempDir(), "sub", "egress-cni.log")
	p, _, _ := fakePlugin()
	in := stdin("1.0.0", `"logFile": "`+logFile+`"`, injected(), true)
	if err := p.Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Args: podArgs, StdinData: in}); err != nil {
		t.Fatal(err)
	}
	in = stdin("1.0.0", `"logFile": "`+logFile+`"`, map[string]string{}, true)
	if err := p.Add(&skel.CmdArgs{ContainerID: "c2", IfName: "eth0", Args: podArgs, StdinData: in}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 2 {
		t.Fatalf("want 2 records, got:\n%s", b)
	}
	for i, want := range []string{"captured", "skipped"} {
		var rec map[string]any
		if err := json.Unmarshal([]byte(lines[i]), &rec); err != nil {
			t.Fatal(err)
		}
		if rec["pod"] != "team-a/web-0" || rec["decision"] != want || rec["cmd"] != "ADD" || rec["duration"] == nil {
			t.Errorf("record %d = %v", i, rec)
		}
		if want == "captured" && rec["backend"] != "nftables" {
			t.Errorf("backend = %v", rec["backend"])
		}
	}
}

// The fake backend records per network namespace, as the real ones
// act: two pods' ADDs into their own namespaces are two records, each
// with its own pod's rules, and CHECK compares each pod with its own.
func TestAddRecordsPerNamespace(t *testing.T) {
	nstest.RequirePrivileged(t)
	a, b := nstest.NewNS(t), nstest.NewNS(t)
	p, f, _ := fakePlugin()
	args := func(n ns.NetNS, ann map[string]string) *skel.CmdArgs {
		return &skel.CmdArgs{ContainerID: "c1", Netns: n.Path(), IfName: "eth0", Args: podArgs, StdinData: stdin("1.0.0", "", ann, true)}
	}
	plain, excl := injected(), injected(AnnotationExcludeOutboundIPRanges, "192.0.2.0/24")
	if err := p.Add(args(a, plain)); err != nil {
		t.Fatal(err)
	}
	if err := p.Add(args(b, excl)); err != nil {
		t.Fatal(err)
	}
	name := func(n ns.NetNS) string {
		var st syscall.Stat_t
		if err := syscall.Stat(n.Path(), &st); err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("net:[%d]", st.Ino)
	}
	dump := f.Dump()
	sections := map[string]string{}
	for _, s := range strings.Split(dump, "# netns ")[1:] {
		head, body, _ := strings.Cut(s, "\n")
		sections[head] = body
	}
	sa, sb := sections[name(a)+": nftables"], sections[name(b)+": nftables"]
	if len(sections) != 2 || sa == "" || sb == "" {
		t.Fatalf("want one record in each of %s and %s, got:\n%s", name(a), name(b), dump)
	}
	if strings.Contains(sa, "192.0.2.0/24") || !strings.Contains(sb, "192.0.2.0/24") {
		t.Errorf("the exclusion is not (only) in the second pod's namespace:\n%s", dump)
	}
	if err := p.Check(args(a, plain)); err != nil {
		t.Errorf("CHECK of the first pod: %v", err)
	}
	if err := p.Check(args(b, plain)); err == nil || !strings.Contains(err.Error(), "extra: 192.0.2.0/24") {
		t.Errorf("CHECK of the second pod against the first pod's annotations: %v", err)
	}

	// A pod we do not capture: CHECK finds the first pod's rules as ours
	// (every backend is looked at); after DEL its namespace holds
	// nothing, and the second pod's record is untouched.
	opted := injected(AnnotationInject, "false")
	if err := p.Check(args(a, opted)); err == nil || !strings.Contains(err.Error(), "nftables: table inet egress_cni {") {
		t.Errorf("CHECK of an uncaptured pod whose namespace holds our rules: %v", err)
	}
	if err := p.Del(args(a, plain)); err != nil {
		t.Fatal(err)
	}
	if err := p.Check(args(a, opted)); err != nil {
		t.Errorf("CHECK of an uncaptured pod after DEL: %v", err)
	}
	after := f.Dump()
	if strings.Contains(after, name(a)) || !strings.Contains(after, name(b)+": nftables\n"+sb) {
		t.Errorf("DEL of the first pod: want only the second pod's record, unchanged; got:\n%s", after)
	}
}
