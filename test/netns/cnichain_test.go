//go:build linux

package netns_test

// The harness of the CNI chain tests: it builds the real reference
// plugins (bridge, host-local, loopback) from the module cache at the
// version go.mod pins, and egress-cni itself, and runs them through libcni
// the way containerd does. The "node" is a network namespace of ours:
// libcni is called from a goroutine locked inside it, so the plugins run
// there and the bridge is created there, never in the root namespace.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/internal/sim"
)

// TestMain (nstest.Main, which Dial needs) is in capture_test.go, the
// package's other test file.

// Addresses of the chain tests, all from documentation ranges.
const (
	podSubnet = "198.51.100.0/24"
	gatewayIP = "198.51.100.1"
	// internetIP stands for a destination outside the cluster. It lives
	// on the node namespace's lo; pods reach it through their default
	// route via the bridge gateway.
	internetIP  = "203.0.113.10"
	echoPort    = "8080"
	cniAppUID   = 1000
	cniProxyUID = 1337
)

// podAnnotation is what Istio's injector puts on a pod it injected.
const statusAnnotation = `{"initContainers":null,"containers":["istio-proxy"],"volumes":["istio-envoy"]}`

// moduleRoot is the egress-cni module's root (the tests run in test/netns).
func moduleRoot(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// goBuild runs go build in dir with a bounded time.
func goBuild(t testing.TB, dir string, env []string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", append([]string{"build"}, args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// buildEgressCNI builds our plugin into dir.
func buildEgressCNI(t testing.TB, dir string) {
	t.Helper()
	goBuild(t, moduleRoot(t), nil, "-o", filepath.Join(dir, "egress-cni"), "./cmd/egress-cni")
}

// buildReferencePlugins builds bridge, host-local and loopback into dir,
// at the version of containernetworking/plugins that our go.mod pins.
// Our go.sum does not cover those commands' extra dependencies
// (knftables, ethtool…), so they are built in a throwaway module that
// requires the same versions of plugins and cni as ours.
func buildReferencePlugins(t testing.TB, dir string) {
	t.Helper()
	root := moduleRoot(t)
	version := func(mod string) string {
		cmd := exec.Command("go", "list", "-m", "-f", "{{.Version}}", mod)
		cmd.Dir = root
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("go list -m %s: %v", mod, err)
		}
		return strings.TrimSpace(string(out))
	}
	pluginsV, cniV := version("github.com/containernetworking/plugins"), version("github.com/containernetworking/cni")
	mod := t.TempDir()
	gomod := fmt.Sprintf("module egress-cni.test/refplugins\n\ngo 1.24\n\nrequire (\n\tgithub.com/containernetworking/plugins %s\n\tgithub.com/containernetworking/cni %s\n)\n", pluginsV, cniV)
	if err := os.WriteFile(filepath.Join(mod, "go.mod"), []byte(gomod), 0o644); err != nil {
		t.Fatal(err)
	}
	const p = "github.com/containernetworking/plugins/plugins/"
	// -mod=mod lets go record the extra modules' sums in the throwaway
	// go.sum (fetched through the module proxy if not cached).
	goflags := strings.TrimSpace(os.Getenv("GOFLAGS") + " -mod=mod -buildvcs=false")
	goBuild(t, mod, []string{"GOFLAGS=" + goflags, "GOWORK=off"}, "-o", dir+"/",
		p+"main/bridge", p+"ipam/host-local", p+"main/loopback")
	for _, b := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			t.Fatalf("plugin %s was not built: %v", b, err)
		}
	}
}

// chain is one node: its network namespace, a conflist, and libcni with
// its own cache directory.
type chain struct {
	t          *testing.T
	binDir     string
	node       ns.NetNS
	dir        string // temp dir: ipam data, cache, log
	cniVersion string
	list       *libcni.NetworkConfigList
	loopback   *libcni.NetworkConfig
	cni        *libcni.CNIConfig
	logFile    string
}

// chainOptions tunes newChain.
type chainOptions struct {
	cniVersion string
	// egress holds extra keys of the egress-cni entry, as JSON members
	// (`"backend": "iptables-nft"`).
	egress string
	// noCapability leaves the pod-annotations capability out of the
	// egress-cni entry, as on a node whose conflist forgot it.
	noCapability bool
}

// newChain makes a node namespace with a target for pod traffic
// (internetIP on its lo, and an echo server on every address) and a
// conflist: bridge (gateway on, masquerade off) with host-local IPAM,
// then egress-cni with the pod-annotations capability.
func newChain(t *testing.T, binDir string, o chainOptions) *chain {
	t.Helper()
	if o.cniVersion == "" {
		o.cniVersion = "1.0.0"
	}
	c := &chain{t: t, binDir: binDir, dir: t.TempDir(), cniVersion: o.cniVersion}
	c.node = nstest.NewNS(t)
	err := c.node.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		addr, err := netlink.ParseAddr(internetIP + "/32")
		if err != nil {
			return err
		}
		return netlink.AddrAdd(lo, addr)
	})
	if err != nil {
		t.Fatalf("could not add %s to the node's lo: %v", internetIP, err)
	}
	nstest.ServeEcho(t, c.node, ":"+echoPort)

	c.logFile = filepath.Join(c.dir, "egress-cni.log")
	capability := `"capabilities": {"io.kubernetes.cri.pod-annotations": true}, `
	if o.noCapability {
		capability = ""
	}
	egress := fmt.Sprintf(`{"type": "egress-cni", %s"logFile": %q, "logLevel": "debug"%s}`,
		capability, c.logFile, prefixComma(o.egress))
	conflist := fmt.Sprintf(`{
  "cniVersion": %q,
  "name": "egress-test",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": false,
     "ipam": {"type": "host-local", "dataDir": %q,
              "ranges": [[{"subnet": %q, "gateway": %q}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    %s
  ]
}`, o.cniVersion, filepath.Join(c.dir, "ipam"), podSubnet, gatewayIP, egress)
	c.list, err = libcni.ConfListFromBytes([]byte(conflist))
	if err != nil {
		t.Fatalf("bad conflist: %v\n%s", err, conflist)
	}
	// containerd runs loopback as a network of its own, first.
	c.loopback, err = libcni.ConfFromBytes([]byte(fmt.Sprintf(`{"cniVersion": %q, "name": "cni-loopback", "type": "loopback"}`, o.cniVersion)))
	if err != nil {
		t.Fatal(err)
	}
	c.cni = libcni.NewCNIConfigWithCacheDir([]string{binDir}, filepath.Join(c.dir, "cache"), nil)
	return c
}

func prefixComma(s string) string {
	if strings.TrimSpace(s) == "" {
		return ""
	}
	return ", " + s
}

// pod is one sandbox.
type pod struct {
	namespace, name, id string
	annotations         map[string]string
	netns               ns.NetNS
	// path is the namespace path given to the plugins; it can outlive
	// netns (DEL after the namespace is gone).
	path string
}

// newPod makes a pod with its own network namespace (removed in cleanup).
func newPod(t *testing.T, namespace, name string, annotations map[string]string) *pod {
	t.Helper()
	n := nstest.NewNS(t)
	return &pod{namespace: namespace, name: name, id: "c-" + name, annotations: annotations, netns: n, path: n.Path()}
}

// injectedPod is a pod that Istio's injector has seen.
func injectedPod(t *testing.T, name string, more ...string) *pod {
	ann := map[string]string{"sidecar.istio.io/status": statusAnnotation}
	for i := 0; i+1 < len(more); i += 2 {
		ann[more[i]] = more[i+1]
	}
	return newPod(t, "team-a", name, ann)
}

// rt is the RuntimeConf containerd builds for the pod.
func (c *chain) rt(p *pod, netnsPath string) *libcni.RuntimeConf {
	return sim.RuntimeConf(p.id, netnsPath, p.namespace, p.name, p.annotations)
}

// inNode runs fn on a goroutine locked inside the node namespace, so
// that every plugin process it starts runs there.
func (c *chain) inNode(fn func() error) error {
	return c.node.Do(func(ns.NetNS) error { return fn() })
}

// add runs the loopback network and the chain, as containerd's
// RunPodSandbox does.
func (c *chain) add(p *pod) (types.Result, error) {
	var res types.Result
	err := c.inNode(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := c.cni.AddNetwork(ctx, c.loopback, c.rt(p, p.path)); err != nil {
			return fmt.Errorf("loopback: %w", err)
		}
		var err error
		res, err = c.cni.AddNetworkList(ctx, c.list, c.rt(p, p.path))
		return err
	})
	return res, err
}

func (c *chain) mustAdd(p *pod) types.Result {
	c.t.Helper()
	res, err := c.add(p)
	if err != nil {
		c.t.Fatalf("ADD %s/%s: %v", p.namespace, p.name, err)
	}
	return res
}

func (c *chain) check(p *pod) error {
	return c.inNode(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		return c.cni.CheckNetworkList(ctx, c.list, c.rt(p, p.path))
	})
}

// del runs DEL for the chain and loopback. netnsPath is what the runtime
// passes: the path, or "" (containerd on a sandbox whose netns is gone).
func (c *chain) del(p *pod, netnsPath string) error {
	return c.inNode(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		return errors.Join(
			c.cni.DelNetworkList(ctx, c.list, c.rt(p, netnsPath)),
			c.cni.DelNetwork(ctx, c.loopback, c.rt(p, netnsPath)),
		)
	})
}

// execEgress runs egress-cni alone, as the chain's last plugin: the
// stdin is built as libcni builds it (name, cniVersion, prevResult and
// the capability's runtimeConfig injected into the entry).
func (c *chain) execEgress(p *pod, command string, prevResult types.Result) (types.Result, error) {
	return c.execEgressWith(p, command, prevResult, nil)
}

// execEgressWith is execEgress with extra keys set in the entry (for
// example another backend).
func (c *chain) execEgressWith(p *pod, command string, prevResult types.Result, keys map[string]interface{}) (types.Result, error) {
	entry := c.list.Plugins[len(c.list.Plugins)-1]
	inject := map[string]interface{}{"name": c.list.Name, "cniVersion": c.cniVersion}
	for k, v := range keys {
		inject[k] = v
	}
	if prevResult != nil {
		inject["prevResult"] = prevResult
	}
	conf, err := libcni.InjectConf(entry, inject)
	if err != nil {
		return nil, err
	}
	conf, err = libcni.InjectConf(conf, map[string]interface{}{
		"runtimeConfig": map[string]interface{}{"io.kubernetes.cri.pod-annotations": p.annotations},
	})
	if err != nil {
		return nil, err
	}
	rt := c.rt(p, p.path)
	args := &invoke.Args{Command: command, ContainerID: rt.ContainerID, NetNS: rt.NetNS, IfName: rt.IfName,
		PluginArgs: rt.Args, Path: c.binDir}
	var res types.Result
	err = c.inNode(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		path := filepath.Join(c.binDir, "egress-cni")
		if command == "ADD" {
			res, err = invoke.ExecPluginWithResult(ctx, path, conf.Bytes, args, nil)
			return err
		}
		return invoke.ExecPluginWithoutResult(ctx, path, conf.Bytes, args, nil)
	})
	return res, err
}

// cachedResult is the chain's result libcni cached at ADD.
func (c *chain) cachedResult(p *pod) types.Result {
	c.t.Helper()
	res, err := c.cni.GetNetworkListCachedResult(c.list, c.rt(p, p.path))
	if err != nil || res == nil {
		c.t.Fatalf("no cached result for %s: %v", p.name, err)
	}
	return res
}

// logRecords returns the egress-cni log records that mention pod.
func (c *chain) logRecords(p *pod) []map[string]any {
	c.t.Helper()
	b, err := os.ReadFile(c.logFile)
	if err != nil {
		c.t.Fatalf("could not read the plugin log: %v", err)
	}
	var recs []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var r map[string]any
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			c.t.Fatalf("log line is not JSON: %q: %v", l, err)
		}
		if r["pod"] == p.namespace+"/"+p.name {
			recs = append(recs, r)
		}
	}
	return recs
}

// cniError returns err as a *types.Error, failing the test otherwise.
func cniError(t *testing.T, err error) *types.Error {
	t.Helper()
	var te *types.Error
	if !errors.As(err, &te) {
		t.Fatalf("error %v (%T) is not a CNI error", err, err)
	}
	return te
}

// ourRules matches anything of ours in a dump.
var ourRules = regexp.MustCompile(`ISTIO_|egress[-_]cni`)

// assertNoneOurs fails if the namespace holds anything of ours. Empty
// nat tables may remain: an iptables flavour that ran once leaves its
// (empty) built-in chains, which belong to nobody.
func assertNoneOurs(t *testing.T, p *pod) {
	t.Helper()
	if d := nstest.DumpAll(t, p.netns); ourRules.MatchString(d) {
		t.Errorf("pod %s holds egress-cni rules:\n%s", p.name, d)
	}
}

// emptyDump is the firewall dump of a namespace nobody touched.
var (
	emptyDumpOnce sync.Once
	emptyDump     string
)

func pristineDump(t *testing.T) string {
	t.Helper()
	emptyDumpOnce.Do(func() {
		n, err := testutils.NewNS()
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = n.Close(); _ = testutils.UnmountNS(n) }()
		emptyDump = nstest.DumpAll(t, n)
	})
	return emptyDump
}
