//go:build linux

// Package runtime_test drives egress-cni through a real container runtime:
// Debian's containerd and runc, crictl, and the reference CNI plugins,
// with egress-cni chained after bridge, exactly as on a node.
//
// containerd runs as a background process inside a network namespace of
// ours (the "node"), so the bridge and the pods' veths never touch the
// machine's root namespace. Its root, state, sockets, runc root, CNI
// config, CNI bin dir, IPAM data and the pods' network namespace mounts
// all live under one temporary directory, removed at the end.
package runtime_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

func TestMain(m *testing.M) { nstest.Main(m) }

// Addresses, all from documentation ranges.
const (
	podSubnet = "198.51.100.0/24"
	gatewayIP = "198.51.100.1"
	// internetIP stands for a destination outside the cluster; it lives
	// on the node namespace's lo and is captured.
	internetIP = "203.0.113.10"
	// excludedIP is on the node's lo too, in the range the pod's
	// excludeOutboundIPRanges annotation exempts from capture.
	excludedIP    = "192.0.2.10"
	excludedRange = "192.0.2.0/24"
	echoPort      = "8080"
	appUID        = 1000
	proxyUID      = 1337
)

// Istio's annotations, as its injector writes them on the pod.
var podAnnotations = map[string]string{
	"sidecar.istio.io/status":                          `{"initContainers":null,"containers":["istio-proxy"],"volumes":["istio-envoy"]}`,
	"traffic.sidecar.istio.io/excludeOutboundIPRanges": excludedRange,
	"traffic.sidecar.istio.io/includeInboundPorts":     "*",
}

// requiredBinaries are what the Makefile's deps-runtime target installs
// (containerd, runc) and what containerd needs from them.
var requiredBinaries = []string{"containerd", "containerd-shim-runc-v2", "ctr", "runc", "nsenter"}

// mustRun reports whether a failure to start the runtime must fail the
// test instead of skipping it: in CI, and wherever privileged tests are
// required.
func mustRun() bool {
	return os.Getenv("CI") == "true" || os.Getenv(nstest.RequirePrivilegedEnv) == "1"
}

// cannotStart skips (or, under mustRun, fails) because containerd cannot
// start here.
func cannotStart(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := "containerd cannot start: " + fmt.Sprintf(format, args...)
	if mustRun() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// prepareRuntime checks that the runtime's binaries are installed, then
// makes the work directory first (its cleanup, unmount what is left
// under it then remove it, runs last, after containerd is gone), arranges
// for the host dirs containerd creates and the test's cgroups to go, and
// returns the directory and the cgroup parent (prefix + its name).
func prepareRuntime(t *testing.T, cgroupPrefix string) (dir, cgroupParent string) {
	t.Helper()
	for _, b := range requiredBinaries {
		if _, err := exec.LookPath(b); err != nil {
			cannotStart(t, "%s is not installed (run `make deps-runtime`): %v", b, err)
		}
	}
	dir = workDir(t)
	removeCreatedHostDirs(t)
	cgroupParent = cgroupPrefix + filepath.Base(dir)
	t.Cleanup(func() { removeCgroups(t, cgroupParent) })
	return dir, cgroupParent
}

func TestContainerdRunPodSandbox(t *testing.T) {
	nstest.RequirePrivileged(t)
	start := time.Now()
	dir, cgroupParent := prepareRuntime(t, "/egress-cni-e2e-")

	plugins := filepath.Join(dir, "plugins")
	binDir := filepath.Join(dir, "cni-bin")
	for _, d := range []string{plugins, binDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	crictlBin := buildCrictl(t)
	buildPlugins(t, plugins)
	recordFile := filepath.Join(dir, "cni-calls.jsonl")
	recorder := filepath.Join(plugins, "egress-cni-recorder")
	buildRecorder(t, recorder, filepath.Join(plugins, "egress-cni"), recordFile)
	reaper := filepath.Join(plugins, "reaper")
	buildReaper(t, reaper)
	imageTar := filepath.Join(dir, "pause.tar")
	buildPauseImage(t, imageTar)
	// containerd 1.6 takes a single CNI bin_dir: a folder of symlinks.
	for name, target := range map[string]string{
		"bridge":     filepath.Join(plugins, "bridge"),
		"host-local": filepath.Join(plugins, "host-local"),
		"loopback":   filepath.Join(plugins, "loopback"),
		"egress-cni": recorder,
	} {
		if err := os.Symlink(target, filepath.Join(binDir, name)); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("built plugins, recorder, pause image and found crictl in %s", time.Since(start).Round(time.Millisecond))

	// The node: a namespace of ours with an "internet" address and an
	// excluded address on lo, and an echo server on every address.
	node := nstest.NewNS(t)
	err := node.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		for _, a := range []string{internetIP + "/32", excludedIP + "/32"} {
			addr, err := netlink.ParseAddr(a)
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(lo, addr); err != nil {
				return fmt.Errorf("add %s to lo: %w", a, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("could not set up the node namespace: %v", err)
	}
	nstest.ServeEcho(t, node, ":"+echoPort)

	pluginLog := filepath.Join(dir, "egress-cni.log")
	writeCNIConf(t, dir, pluginLog)
	c := startContainerd(t, dir, node.Path(), reaper, crictlBin)
	t.Logf("containerd ready after %s", time.Since(start).Round(time.Millisecond))

	if out, err := c.ctr("images", "import", imageTar); err != nil {
		t.Fatalf("ctr images import: %v\n%s", err, out)
	}

	// runp: the CNI chain runs (loopback, then bridge + egress-cni).
	podID, netnsPath, podIP := c.runPod("web", podAnnotations, cgroupParent)

	// containerd called egress-cni with the pod's annotations, and the
	// plugin used them.
	add := onePluginRecord(t, pluginLog, "web", "ADD done")
	for k, want := range map[string]any{
		"decision": "captured", "backend": "nftables", "annotationsDelivered": true,
		"containerID": podID, "netns": netnsPath, "ifname": "eth0",
	} {
		if add[k] != want {
			t.Errorf("ADD log %s = %v, want %v\n%v", k, add[k], want, add)
		}
	}
	if !containsString(add["overrides"], "traffic.sidecar.istio.io/excludeOutboundIPRanges") {
		t.Errorf("ADD log overrides = %v, want the excludeOutboundIPRanges annotation", add["overrides"])
	}

	// The rules, seen from the sandbox's own namespace. podNS is held
	// open across stopp so that the namespace can be inspected after
	// containerd has unmounted it.
	podNS, err := ns.GetNS(netnsPath)
	if err != nil {
		t.Fatalf("open the sandbox netns: %v", err)
	}
	defer podNS.Close()
	dump := nstest.NFTDump(t, podNS)
	for _, want := range []string{"table inet egress_cni", "skuid 1337", "15001", excludedRange} {
		if !strings.Contains(dump, want) {
			t.Errorf("sandbox ruleset lacks %q:\n%s", want, dump)
		}
	}

	// Real traffic from the sandbox: the app's UID is redirected to the
	// proxy, which sees the original destination; the proxy's UID and the
	// annotation-excluded range go direct, from the pod's address.
	proxy := nstest.ServeProxy(t, podNS, 15001)
	target := internetIP + ":" + echoPort
	if r := dialReply(t, podNS, appUID, target); r.Kind != nstest.KindProxy || r.Orig.String() != target {
		t.Errorf("app UID %d to %s: got %+v, want the proxy on 15001 with orig=%s", appUID, target, r, target)
	}
	if r := dialReply(t, podNS, proxyUID, target); r.Kind != nstest.KindDirect || r.Src.Addr() != podIP {
		t.Errorf("proxy UID %d to %s: got %+v, want direct from %s", proxyUID, target, r, podIP)
	}
	excluded := excludedIP + ":" + echoPort
	if r := dialReply(t, podNS, appUID, excluded); r.Kind != nstest.KindDirect || r.Src.Addr() != podIP {
		t.Errorf("app UID %d to the annotation-excluded %s: got %+v, want direct from %s", appUID, excluded, r, podIP)
	}
	proxy.Close()

	// stopp: the first DEL, with the namespace still there.
	if out, err := c.crictl("stopp", podID); err != nil {
		t.Fatalf("crictl stopp: %v\n%s", err, out)
	}
	if d := nstest.DumpAll(t, podNS); regexp.MustCompile(`ISTIO_|egress_cni`).MatchString(d) {
		t.Errorf("after stopp the sandbox namespace still holds egress-cni rules:\n%s", d)
	}
	if isMountPoint(t, netnsPath) {
		t.Errorf("after stopp %s is still mounted", netnsPath)
	}
	if err := podNS.Close(); err != nil {
		t.Errorf("close the sandbox netns: %v", err)
	}

	// rmp: the second DEL, without a namespace.
	if out, err := c.crictl("rmp", podID); err != nil {
		t.Fatalf("crictl rmp: %v\n%s", err, out)
	}
	if out, err := c.crictl("pods", "-q"); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("after rmp crictl pods -q = %q (%v), want none", out, err)
	}
	if _, err := os.Stat(netnsPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after rmp %s still exists (%v)", netnsPath, err)
	}

	dels := pluginRecords(t, pluginLog, "web", "DEL done")
	if len(dels) != 2 {
		t.Fatalf("egress-cni logged %d DEL, want 2 (stopp, rmp): %v", len(dels), dels)
	}
	if dels[0]["netns"] != netnsPath || !containsString(dels[0]["backends"], "nftables") {
		t.Errorf("first DEL (stopp) = %v, want netns %s and backends [nftables]", dels[0], netnsPath)
	}
	if dels[1]["netns"] != "" || dels[1]["result"] != "no network namespace given, nothing to remove" {
		t.Errorf("second DEL (rmp) = %v, want an empty netns and nothing to remove", dels[1])
	}

	// The calls as containerd made them, from the recorder in front of
	// egress-cni.
	calls := readCalls(t, recordFile, podID)
	var seq []string
	for _, cl := range calls {
		seq = append(seq, cl.String())
	}
	t.Logf("CNI calls to egress-cni:\n  %s", strings.Join(seq, "\n  "))
	want := []struct {
		command string
		netns   string
		prev    bool
	}{{"ADD", netnsPath, true}, {"DEL", netnsPath, true}, {"DEL", "", false}}
	if len(calls) != len(want) {
		t.Fatalf("containerd called egress-cni %d times, want ADD, DEL, DEL", len(calls))
	}
	for i, w := range want {
		cl := calls[i]
		if cl.Command != w.command || cl.NetNS != w.netns || cl.HasPrevResult != w.prev || cl.ExitCode != 0 {
			t.Errorf("call %d = %s, want %s netns=%q prevResult=%v exit 0", i+1, cl, w.command, w.netns, w.prev)
		}
		got := cl.annotations()
		for k, v := range podAnnotations {
			if got[k] != v {
				t.Errorf("call %d (%s): runtimeConfig annotation %s = %q, want %q", i+1, cl.Command, k, got[k], v)
			}
		}
		args := cl.args()
		if args["K8S_POD_NAMESPACE"] != "default" || args["K8S_POD_NAME"] != "web" || args["K8S_POD_INFRA_CONTAINER_ID"] != podID {
			t.Errorf("call %d (%s): CNI_ARGS %q lack the pod's identity", i+1, cl.Command, cl.Args)
		}
	}

	// A pod without annotations: containerd still declares them
	// delivered (the key, with null), so the plugin skips the pod rather
	// than refusing it, and its traffic is not captured.
	plainID, plainPath, plainIP := c.runPod("plain", nil, cgroupParent)
	skip := onePluginRecord(t, pluginLog, "plain", "ADD done")
	for k, want := range map[string]any{
		"decision": "skipped", "reason": "no sidecar.istio.io/status annotation",
		"annotationsDelivered": true, "containerID": plainID,
	} {
		if skip[k] != want {
			t.Errorf("plain pod ADD log %s = %v, want %v\n%v", k, skip[k], want, skip)
		}
	}
	plainNS, err := ns.GetNS(plainPath)
	if err != nil {
		t.Fatalf("open the plain sandbox netns: %v", err)
	}
	defer plainNS.Close()
	if d := nstest.DumpAll(t, plainNS); regexp.MustCompile(`ISTIO_|egress_cni`).MatchString(d) {
		t.Errorf("the plain pod's namespace holds egress-cni rules:\n%s", d)
	}
	if r := dialReply(t, plainNS, appUID, target); r.Kind != nstest.KindDirect || r.Src.Addr() != plainIP {
		t.Errorf("plain pod, UID %d to %s: got %+v, want direct from %s", appUID, target, r, plainIP)
	}
	if err := plainNS.Close(); err != nil {
		t.Errorf("close the plain sandbox netns: %v", err)
	}
	for _, cmd := range []string{"stopp", "rmp"} {
		if out, err := c.crictl(cmd, plainID); err != nil {
			t.Fatalf("crictl %s plain: %v\n%s", cmd, err, out)
		}
	}
	if n := len(pluginRecords(t, pluginLog, "plain", "DEL done")); n != 2 {
		t.Errorf("egress-cni logged %d DEL for the plain pod, want 2", n)
	}
	plainCalls := readCalls(t, recordFile, plainID)
	var plainSeq []string
	for _, cl := range plainCalls {
		plainSeq = append(plainSeq, cl.String())
		// containerd 1.6.20 sends "io.kubernetes.cri.pod-annotations":
		// null for a pod without annotations.
		if _, ok := cl.RuntimeConfig["io.kubernetes.cri.pod-annotations"]; !ok || len(cl.annotations()) != 0 || cl.ExitCode != 0 {
			t.Errorf("plain pod call %s: want the annotations key, empty, and exit 0 (runtimeConfig %v)", cl, cl.RuntimeConfig)
		}
	}
	t.Logf("CNI calls to egress-cni for the plain pod:\n  %s", strings.Join(plainSeq, "\n  "))

	// Nothing of the sandboxes is left: no runc container, no shim.
	if out, err := c.runc("list", "-q"); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("after rmp runc list = %q (%v), want none", out, err)
	}
	if pids := shimPIDs(c.socket); len(pids) != 0 {
		t.Errorf("after rmp shims of our containerd are still running: %v", pids)
	}
	t.Logf("end to end in %s", time.Since(start).Round(time.Millisecond))
}

// dialReply dials addr from the namespace as uid and parses the reply.
func dialReply(t *testing.T, n ns.NetNS, uid uint32, addr string) nstest.Reply {
	t.Helper()
	line, err := nstest.Dial(t, n, uid, uid, "tcp4", addr)
	if err != nil {
		t.Errorf("dial %s as %d: %v", addr, uid, err)
		return nstest.Reply{}
	}
	r, err := nstest.ParseReply(line)
	if err != nil {
		t.Errorf("dial %s as %d: %v", addr, uid, err)
	}
	return r
}

// workDir makes the test's private directory. Its cleanup unmounts
// anything still mounted under it (deepest first, lazily, and only under
// it), then removes it, unless something could not be unmounted.
func workDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "egcni-ctrd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, m := range mountsUnder(t, dir) {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				t.Errorf("unmount %s: %v", m, err)
			}
		}
		if left := mountsUnder(t, dir); len(left) > 0 {
			t.Errorf("mounts left under %s, not removing it: %v", dir, left)
			return
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
	})
	return dir
}

// mountsUnder lists the mount points strictly under dir, deepest first.
func mountsUnder(t testing.TB, dir string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatalf("read mountinfo: %v", err)
	}
	var ms []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if strings.HasPrefix(mp, dir+"/") {
			ms = append(ms, mp)
		}
	}
	sort.Slice(ms, func(i, j int) bool { return len(ms[i]) > len(ms[j]) })
	return ms
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space…).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isMountPoint(t testing.TB, path string) bool {
	t.Helper()
	for _, m := range mountsUnder(t, filepath.Dir(path)) {
		if m == path {
			return true
		}
	}
	return false
}

// hostDirs are the only paths outside the work dir that containerd 1.6
// writes to with this config: its shims' sockets (/run/containerd/s,
// fixed in containerd) and libcni's result cache (/var/lib/cni, the
// go-cni default). Both are empty once the sandbox is removed.
var hostDirs = []string{"/run/containerd", "/run/containerd/s", "/var/lib/cni", "/var/lib/cni/results"}

// removeCreatedHostDirs registers the removal of the hostDirs that do not
// exist now, deepest first, and only if they are empty by then.
func removeCreatedHostDirs(t *testing.T) {
	var created []string
	for _, d := range hostDirs {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			created = append(created, d)
		}
	}
	t.Cleanup(func() {
		for i := len(created) - 1; i >= 0; i-- {
			// Our own leftovers are gone (containerd.stop); a directory
			// still in use belongs to another containerd started meanwhile.
			if err := os.Remove(created[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Logf("leaving %s, created during the test and now in use: %v", created[i], err)
			}
		}
	})
}

// removeCgroups removes the (empty) cgroup parent runc created for the
// sandbox, in every hierarchy.
func removeCgroups(t *testing.T, parent string) {
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", parent))
	dirs = append(dirs, filepath.Join("/sys/fs/cgroup", parent))
	for _, d := range dirs {
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("remove cgroup %s: %v", d, err)
		}
	}
}

func writeJSON(t testing.TB, path string, v any) {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeCNIConf writes the node's conflist: bridge with host-local IPAM,
// then egress-cni with the pod-annotations capability.
func writeCNIConf(t *testing.T, dir, pluginLog string) {
	t.Helper()
	confDir := filepath.Join(dir, "cni-conf")
	if err := os.MkdirAll(confDir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeJSON(t, filepath.Join(confDir, "10-egress-e2e.conflist"), map[string]any{
		"cniVersion": "1.0.0",
		"name":       "egress-e2e",
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
				"ipam": map[string]any{
					"type":    "host-local",
					"dataDir": filepath.Join(dir, "ipam"),
					"ranges":  [][]map[string]string{{{"subnet": podSubnet, "gateway": gatewayIP}}},
					"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				},
			},
			map[string]any{
				"type":         "egress-cni",
				"capabilities": map[string]bool{"io.kubernetes.cri.pod-annotations": true},
				"logFile":      pluginLog,
				"logLevel":     "debug",
			},
		},
	})
}

// containerdConfig is containerd 1.6's config (version 2), everything
// under the work dir. restrict_oom_score_adj: root here lacks
// CAP_SYS_RESOURCE and runc fails without it. AppArmor is disabled so
// that no profile is loaded into the host's kernel. The opt plugin and
// the snapshotters we do not use are disabled.
const containerdConfig = `version = 2
root = "{{dir}}/root"
state = "{{state}}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{{dir}}/containerd.sock"

[ttrpc]
  address = "{{dir}}/containerd.sock.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{{image}}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{{cnibin}}"
    conf_dir = "{{cniconf}}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{{dir}}/runc"
        SystemdCgroup = false
`

// containerd is the running daemon.
type containerd struct {
	t         *testing.T
	dir       string
	socket    string
	crictlBin string
	log       string
	cmd       *exec.Cmd
	exited    chan struct{}
}

// startContainerd starts containerd, under the reaper, inside the node
// namespace (nsenter --net, which keeps the mount namespace and /sys as
// they are; `ip netns exec` remounts /sys and runc then finds no cgroup
// mount) and waits until its CRI service answers. Its cleanup removes every sandbox, stops
// containerd, and kills whatever shim or container it left.
func startContainerd(t *testing.T, dir, nodePath, reaper, crictlBin string) *containerd {
	t.Helper()
	return startContainerdWith(t, dir, nodePath, reaper, crictlBin, containerdPaths{
		State: filepath.Join(dir, "state"), CNIBin: filepath.Join(dir, "cni-bin"), CNIConf: filepath.Join(dir, "cni-conf"),
	})
}

// containerdPaths are where containerd keeps its state (and under it the
// pods' network namespace mounts, in io.containerd.grpc.v1.cri/netns)
// and where it finds the CNI plugins and config.
type containerdPaths struct{ State, CNIBin, CNIConf string }

// netnsDir is where this containerd pins the pods' network namespaces
// (netns_mounts_under_state_dir; /run/netns on a node).
func (p containerdPaths) netnsDir() string {
	return filepath.Join(p.State, "io.containerd.grpc.v1.cri", "netns")
}

func startContainerdWith(t *testing.T, dir, nodePath, reaper, crictlBin string, p containerdPaths) *containerd {
	t.Helper()
	cfg := strings.NewReplacer("{{dir}}", dir, "{{image}}", pauseImage, "{{state}}", p.State,
		"{{cnibin}}", p.CNIBin, "{{cniconf}}", p.CNIConf).Replace(containerdConfig)
	cfgPath := filepath.Join(dir, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	c := &containerd{t: t, dir: dir, socket: filepath.Join(dir, "containerd.sock"), crictlBin: crictlBin,
		log: filepath.Join(dir, "containerd.log"), exited: make(chan struct{})}
	if err := os.WriteFile(filepath.Join(dir, "crictl.yaml"), []byte(fmt.Sprintf(
		"runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 30\n", c.socket, c.socket)), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(c.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	c.cmd = exec.Command("nsenter", "--net="+nodePath, reaper, "containerd", "--config", cfgPath)
	c.cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + dir, "TMPDIR=" + dir}
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	c.cmd.Dir = dir
	// Its own process group, so that a terminal's Ctrl-C reaches the test
	// (which then cleans up) rather than containerd directly.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.cmd.Start(); err != nil {
		cannotStart(t, "nsenter containerd: %v", err)
	}
	go func() { _ = c.cmd.Wait(); close(c.exited) }()
	t.Cleanup(c.stop)

	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := c.crictl("info")
		if err == nil && strings.Contains(out, `"NetworkReady"`) {
			var info struct {
				Status struct {
					Conditions []struct {
						Type   string
						Status bool
						Reason string
					}
				}
			}
			ready := json.Unmarshal([]byte(out), &info) == nil
			for _, cond := range info.Status.Conditions {
				ready = ready && cond.Status
			}
			if ready {
				return c
			}
		}
		select {
		case <-c.exited:
			cannotStart(t, "it exited (%v); log:\n%s", c.cmd.ProcessState, c.logTail())
		default:
		}
		if time.Now().After(deadline) {
			cannotStart(t, "not ready after 30s (crictl info: %v, %.2000s); log:\n%s", err, out, c.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// run runs a command with a bounded time and returns its combined output.
func run(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := cmd.Run()
	return b.String(), err
}

func (c *containerd) crictl(args ...string) (string, error) {
	return run(45*time.Second, c.crictlBin, append([]string{"--config", filepath.Join(c.dir, "crictl.yaml"),
		"--runtime-endpoint", "unix://" + c.socket, "--image-endpoint", "unix://" + c.socket}, args...)...)
}

func (c *containerd) ctr(args ...string) (string, error) {
	return run(45*time.Second, "ctr", append([]string{"--address", c.socket, "--namespace", "k8s.io"}, args...)...)
}

func (c *containerd) runc(args ...string) (string, error) {
	return run(15*time.Second, "runc", append([]string{"--root", filepath.Join(c.dir, "runc", "k8s.io")}, args...)...)
}

// logTail is the end of containerd's log.
func (c *containerd) logTail() string {
	b, _ := os.ReadFile(c.log)
	if len(b) > 6000 {
		b = b[len(b)-6000:]
	}
	return string(b)
}

// stop removes every sandbox while containerd still runs, kills any
// container or shim left (while the reaper still runs, so that it reaps
// them), then stops containerd (SIGTERM, SIGKILL after 10s) and removes
// what a killed shim or an unremoved sandbox leaves outside the work dir.
func (c *containerd) stop() {
	t := c.t
	select {
	case <-c.exited:
		c.killLeftovers()
	default:
		if t.Failed() {
			t.Logf("containerd log (tail):\n%s", c.logTail())
		}
		if out, err := c.crictl("rmp", "--force", "--all"); err != nil {
			t.Errorf("cleanup: crictl rmp --force --all: %v\n%s", err, out)
		}
		c.killLeftovers()
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("cleanup: containerd ignored SIGTERM for 10s; killing it")
			// The reaper and containerd share their own process group
			// (shims make groups of their own).
			_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
			<-c.exited
		}
		c.killLeftovers()
	}
	// libcni's cached results of sandboxes that were never removed: they
	// name our work dir (the netns path, the IPAM dir).
	cached, _ := filepath.Glob("/var/lib/cni/results/*")
	for _, f := range cached {
		if b, err := os.ReadFile(f); err == nil && bytes.Contains(b, []byte(c.dir+"/")) {
			t.Logf("cleanup: removing libcni cache %s of a sandbox never removed", f)
			_ = os.Remove(f)
		}
	}
}

// killLeftovers deletes every container runc still knows under our runc
// root, kills every shim of our containerd, and removes their sockets.
func (c *containerd) killLeftovers() {
	t := c.t
	if out, err := c.runc("list", "-q"); err == nil {
		for _, id := range strings.Fields(out) {
			t.Errorf("cleanup: runc container %s left; deleting it", id)
			if out, err := c.runc("delete", "--force", id); err != nil {
				t.Errorf("cleanup: runc delete --force %s: %v\n%s", id, err, out)
			}
			// A shim killed below leaves its socket, named as containerd
			// 1.6 names it (shim.SocketAddress).
			sum := sha256.Sum256([]byte(filepath.Join(c.socket, "k8s.io", id)))
			_ = os.Remove(filepath.Join("/run/containerd/s", hex.EncodeToString(sum[:])))
		}
	}
	for _, pid := range shimPIDs(c.socket) {
		t.Errorf("cleanup: shim %d of our containerd left; killing it", pid)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// shimPIDs lists the containerd-shim processes started by the containerd
// listening on socket (their command line names its address).
func shimPIDs(socket string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		argv := strings.Split(string(b), "\x00")
		if !strings.Contains(filepath.Base(argv[0]), "containerd-shim") {
			continue
		}
		for _, a := range argv {
			if a == socket {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// runPod runs `crictl runp` for a pod default/name (or namespace/name)
// with the annotations,
// checks that its sandbox is ready with a namespace under our state dir
// and an address from the pod subnet, and returns its ID, namespace path
// and address.
func (c *containerd) runPod(name string, annotations map[string]string, cgroupParent string) (string, string, netip.Addr) {
	t := c.t
	t.Helper()
	// name is "name" (in default) or "namespace/name".
	namespace := "default"
	if n, pod, ok := strings.Cut(name, "/"); ok {
		namespace, name = n, pod
	}
	podConfig := filepath.Join(c.dir, namespace+"_"+name+"-pod.json")
	writeJSON(t, podConfig, map[string]any{
		"metadata":    map[string]any{"name": name, "namespace": namespace, "uid": "uid-" + name + "-e2e", "attempt": 0},
		"hostname":    name,
		"annotations": annotations,
		"labels":      map[string]string{"app": name},
		"linux":       map[string]any{"cgroup_parent": cgroupParent},
	})
	start := time.Now()
	out, err := c.crictl("runp", podConfig)
	if err != nil {
		t.Fatalf("crictl runp %s: %v\n%s\ncontainerd log:\n%s", name, err, out, c.logTail())
	}
	id := strings.TrimSpace(out)
	took := time.Since(start)
	sb := c.inspect(id)
	if sb.Status.State != "SANDBOX_READY" {
		t.Fatalf("sandbox %s state %q, want SANDBOX_READY", name, sb.Status.State)
	}
	netnsPath := sb.netnsPath()
	if netnsPath == "" {
		t.Fatalf("crictl inspectp %s shows no network namespace path", name)
	}
	if !strings.HasPrefix(netnsPath, c.dir+"/") {
		t.Fatalf("sandbox %s netns %s is not under our state dir %s", name, netnsPath, c.dir)
	}
	ip, err := netip.ParseAddr(sb.Status.Network.IP)
	if err != nil || !netip.MustParsePrefix(podSubnet).Contains(ip) {
		t.Fatalf("pod %s IP %q is not in %s (%v)", name, sb.Status.Network.IP, podSubnet, err)
	}
	t.Logf("crictl runp %s: sandbox %.12s in %s, netns %s, IP %s", name, id, took.Round(time.Millisecond), netnsPath, ip)
	return id, netnsPath, ip
}

// sandbox is the part of `crictl inspectp -o json` the test reads.
type sandbox struct {
	Status struct {
		State   string
		Network struct{ IP string }
	}
	Info struct {
		RuntimeSpec struct {
			Linux struct {
				Namespaces []struct{ Type, Path string }
			}
		}
	}
}

func (s *sandbox) netnsPath() string {
	for _, n := range s.Info.RuntimeSpec.Linux.Namespaces {
		if n.Type == "network" {
			return n.Path
		}
	}
	return ""
}

func (c *containerd) inspect(id string) *sandbox {
	c.t.Helper()
	out, err := c.crictl("inspectp", "-o", "json", id)
	if err != nil {
		c.t.Fatalf("crictl inspectp: %v\n%s", err, out)
	}
	var s sandbox
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		c.t.Fatalf("crictl inspectp output: %v\n%.3000s", err, out)
	}
	return &s
}

// pluginRecords returns egress-cni's log records of the pod default/name
// with the given message, in order.
func pluginRecords(t *testing.T, logFile, name, msg string) []map[string]any {
	t.Helper()
	f, err := os.Open(logFile)
	if err != nil {
		t.Fatalf("egress-cni log: %v", err)
	}
	defer f.Close()
	full := name
	if !strings.Contains(name, "/") {
		full = "default/" + name
	}
	var recs []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r map[string]any
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("egress-cni log line is not JSON: %q: %v", sc.Text(), err)
		}
		if r["level"] == "ERROR" {
			t.Errorf("egress-cni logged an error: %v", r)
		}
		if r["pod"] == full && r["msg"] == msg {
			recs = append(recs, r)
		}
	}
	return recs
}

func onePluginRecord(t *testing.T, logFile, name, msg string) map[string]any {
	t.Helper()
	recs := pluginRecords(t, logFile, name, msg)
	if len(recs) != 1 {
		b, _ := os.ReadFile(logFile)
		t.Fatalf("egress-cni logged %q %d times for default/%s, want once; log:\n%s", msg, len(recs), name, b)
	}
	return recs[0]
}

func containsString(v any, s string) bool {
	l, _ := v.([]any)
	for _, e := range l {
		if e == s {
			return true
		}
	}
	return false
}

// call is one egress-cni invocation as the recorder saw it.
type call struct {
	Command       string         `json:"command"`
	ContainerID   string         `json:"containerID"`
	NetNS         string         `json:"netns"`
	Args          string         `json:"args"`
	HasPrevResult bool           `json:"hasPrevResult"`
	RuntimeConfig map[string]any `json:"runtimeConfig"`
	ExitCode      int            `json:"exitCode"`
}

func (c call) String() string {
	return fmt.Sprintf("%s netns=%q prevResult=%v annotations=%d exit=%d", c.Command, c.NetNS, c.HasPrevResult, len(c.annotations()), c.ExitCode)
}

func (c call) annotations() map[string]string {
	m := map[string]string{}
	a, _ := c.RuntimeConfig["io.kubernetes.cri.pod-annotations"].(map[string]any)
	for k, v := range a {
		m[k], _ = v.(string)
	}
	return m
}

func (c call) args() map[string]string {
	m := map[string]string{}
	for _, kv := range strings.Split(c.Args, ";") {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

// readCalls returns the recorded ADD/DEL/CHECK calls for the sandbox.
func readCalls(t *testing.T, file, id string) []call {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("recorder file: %v", err)
	}
	var calls []call
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var c call
		if err := json.Unmarshal([]byte(l), &c); err != nil {
			t.Fatalf("recorder line %q: %v", l, err)
		}
		if c.ContainerID == id && (c.Command == "ADD" || c.Command == "DEL" || c.Command == "CHECK") {
			calls = append(calls, c)
		}
	}
	return calls
}
