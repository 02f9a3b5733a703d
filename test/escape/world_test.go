//go:build linux

package escape_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/sim"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// Addresses of the matrix, beyond the cluster's own (internal/sim).
var (
	inet4, inet6 = sim.InternetV4, sim.InternetV6
	// Sources on the internet that are not the internet host: what a
	// decapsulated packet claims.
	foreign4, foreign6 = netip.MustParseAddr("203.0.113.77"), netip.MustParseAddr("2001:db8:ff::77")
	// Service addresses: cluster IPs, and the external IP of the
	// Service whose endpoint is on the internet.
	webIP4, webIP6 = netip.MustParseAddr("198.51.100.140"), netip.MustParseAddr("2001:db8:5e::140")
	dnsIP4, dnsIP6 = netip.MustParseAddr("198.51.100.130"), netip.MustParseAddr("2001:db8:5e::130")
	extIP4, extIP6 = netip.MustParseAddr("198.51.100.200"), netip.MustParseAddr("2001:db8:ee::200")
	// The unregistered pod (Cilium-style lxc veth) on the egress node.
	lxcIP4, lxcIP6 = netip.MustParseAddr("198.51.100.120"), netip.MustParseAddr("2001:db8:1e::120")
	lxcName        = "lxc5e0c1d2e3f4a" // lxc + 12 hex digits, as Cilium names them
	// The unregistered port of the pod bridge (bridged topology), named
	// as Antrea names host interfaces (<pod>-<hash>).
	unregIP4, unregIP6 = netip.MustParseAddr("198.51.100.121"), netip.MustParseAddr("2001:db8:1e::121")
	unregName          = "unreg-pod-4f2a9"
)

// Ports.
const (
	echoPort     = 8080
	sinkPort     = 8081 // the internet's long-lived TCP server
	exfilNode    = 30080
	exfilPort    = 80
	webNodePort  = 30090
	peerNodePort = 30091
	webPort      = 80
	webHostPort  = 8088
	dnsPort      = 53
	appUID       = 1000
	blockedWait  = 500 * time.Millisecond
	attemptGrace = 250 * time.Millisecond
)

var egressPodCIDRs = []netip.Prefix{netip.MustParsePrefix("198.51.100.0/25"), netip.MustParsePrefix("2001:db8:1a::/64"), netip.MustParsePrefix("2001:db8:1e::/64")}

// binaries are built once per test run.
var (
	buildOnce  sync.Once
	builtBin   string
	builtPlug  string
	builtErr   error
	buildTook  time.Duration
	moduleRoot string
)

func buildBinaries(t *testing.T) (binDir, pluginsDir string) {
	t.Helper()
	buildOnce.Do(func() {
		start := time.Now()
		defer func() { buildTook = time.Since(start) }()
		out, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			builtErr = fmt.Errorf("go env GOMOD: %w", err)
			return
		}
		moduleRoot = filepath.Dir(strings.TrimSpace(string(out)))
		// Not t.TempDir: shared by both topologies' subtests.
		dir, err := os.MkdirTemp("", "egress-escape-bin-")
		if err != nil {
			builtErr = err
			return
		}
		builtBin = dir
		if builtErr = os.Chmod(dir, 0o755); builtErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		for _, c := range []struct{ out, pkg string }{
			{"egress-cni", "./cmd/egress-cni"},
			{"egress-cni-install", "./cmd/egress-cni-install"},
			{"egress-node", "./cmd/egress-node"},
		} {
			cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", filepath.Join(dir, c.out), c.pkg)
			cmd.Dir = moduleRoot
			if out, err := cmd.CombinedOutput(); err != nil {
				builtErr = fmt.Errorf("go build %s: %w\n%s", c.pkg, err, out)
				return
			}
		}
		// make demo's cache of the reference plugins, so that either run
		// fills it for the other.
		builtPlug = filepath.Join(moduleRoot, "bin", "cni-plugins")
		_, builtErr = sim.EnsureReferencePlugins(ctx, builtPlug)
	})
	if builtErr != nil {
		t.Fatal(builtErr)
	}
	return builtBin, builtPlug
}

// world is one simulated cluster with everything the matrix needs.
type world struct {
	t       *testing.T
	topo    sim.Options
	cl      *sim.Cleanups
	c       *sim.Cluster
	exe     string
	overlay *sim.Flannel
	rec     *sim.Recorder
	sink    *sim.Sink

	// app node: the attacker's pod and a web server.
	app, web *sim.Pod
	// egress node: the gateway, a root attacker next to it (also an echo
	// server), a self-declared gateway, cluster DNS, and a pod nobody
	// registered.
	gw, worker, selfgw, dns, lxc *sim.Pod
	// unreg: a hand-wired port of the egress node's pod bridge (bridged
	// topology only; nil otherwise).
	unreg *sim.Pod
	// selfRegistered: the self-declared gateway was in the gateways set.
	selfRegistered []netip.Addr

	built time.Duration
	// bin holds the binaries (egress-node for explain).
	bin string
}

func (w *world) ctx() context.Context { return context.Background() }

// newWorld builds the cluster for topo, installs egress-cni on both
// nodes, and adds the overlay, kube-proxy stand-ins, pods and servers.
func newWorld(t *testing.T, topo sim.Options) *world {
	t.Helper()
	binDir, pluginsDir := buildBinaries(t)
	start := time.Now()
	cl := &sim.Cleanups{}
	t.Cleanup(cl.Run)
	w := &world{t: t, topo: topo, cl: cl, bin: binDir}
	var err error
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	w.exe, err = sim.Executable(cl)
	must(err)
	w.c, err = sim.NewClusterWith(cl, pluginsDir, topo)
	must(err)
	w.rec, err = sim.Record(cl, w.c.Internet, "eth0")
	must(err)
	w.sink, err = sim.ServeSink(cl, w.c.Internet, netip.AddrPortFrom(inet4, sinkPort), netip.AddrPortFrom(inet6, sinkPort))
	must(err)
	for _, n := range []*sim.Node{w.c.App, w.c.Egress} {
		if out, err := n.Install(w.ctx(), filepath.Join(binDir, "egress-cni-install"), filepath.Join(binDir, "egress-cni")); err != nil {
			t.Fatalf("install on the %s node: %v\n%s", n.Name, err, out)
		}
		must(n.LoadChain())
	}
	// flannel's default manifest runs it with --ip-masq.
	w.overlay, err = sim.InstallFlannelWith(w.c, sim.FlannelOptions{IPMasq: true})
	must(err)

	pod := func(n *sim.Node, namespace, name string, ann map[string]string) *sim.Pod {
		t.Helper()
		p, err := n.NewPod(cl, namespace, name, ann)
		must(err)
		must(n.AddPod(w.ctx(), cl, p))
		return p
	}
	w.app = pod(w.c.App, "team-a", "app-6f7d8", nil)
	w.web = pod(w.c.App, "team-a", "web-5c4b3", nil)
	w.gw = pod(w.c.Egress, "istio-system", "istio-egressgateway-5d8f9-abcde", nil)
	w.worker = pod(w.c.Egress, "team-c", "worker-9a8b7", nil)
	w.selfgw = pod(w.c.Egress, "team-x", "self-declared-gw", map[string]string{"egress-cni.io/gateway": "true"})
	w.dns = pod(w.c.Egress, "kube-system", "coredns-7db6d", nil)
	w.lxc, err = w.c.Egress.NewUnregisteredPod(cl, "unregistered", lxcName, lxcIP4, lxcIP6)
	must(err)
	if topo.Topology == sim.Bridged {
		w.unreg, err = w.c.Egress.NewUnregisteredBridgePod(cl, "unreg-bridge", unregName, topo.Bridge, unregIP4, unregIP6)
		must(err)
	}

	for _, p := range []*sim.Pod{w.web, w.worker} {
		must(sim.ServeEcho(cl, p.NS, netip.AddrPortFrom(p.IP4, echoPort), netip.AddrPortFrom(p.IP6, echoPort)))
	}
	must(sim.ServeEcho(cl, w.dns.NS, netip.AddrPortFrom(w.dns.IP4, dnsPort), netip.AddrPortFrom(w.dns.IP6, dnsPort)))

	// kube-proxy on every node: the web and DNS Services, and "exfil", a
	// Service without selector whose hand-made EndpointSlice points at
	// the internet host (NodePort and externalIP). The portmap plugin's
	// hostPort for the web pod on the app node.
	kp := sim.KubeProxy{
		ClusterCIDRs: egressPodCIDRs,
		Services: []sim.Service{
			{Name: "team-a/web", Protocols: []string{"tcp"}, ClusterIPs: []netip.Addr{webIP4, webIP6}, Port: webPort, NodePort: webNodePort,
				Endpoints: []netip.AddrPort{netip.AddrPortFrom(w.web.IP4, echoPort), netip.AddrPortFrom(w.web.IP6, echoPort)}},
			{Name: "team-c/worker", NodePort: peerNodePort,
				Endpoints: []netip.AddrPort{netip.AddrPortFrom(w.worker.IP4, echoPort), netip.AddrPortFrom(w.worker.IP6, echoPort)}},
			{Name: "kube-system/kube-dns", ClusterIPs: []netip.Addr{dnsIP4, dnsIP6}, Port: dnsPort,
				Endpoints: []netip.AddrPort{netip.AddrPortFrom(w.dns.IP4, dnsPort), netip.AddrPortFrom(w.dns.IP6, dnsPort)}},
			{Name: "team-a/exfil", NodePort: exfilNode, ExternalIPs: []netip.Addr{extIP4, extIP6}, Port: exfilPort,
				Endpoints: []netip.AddrPort{netip.AddrPortFrom(inet4, echoPort), netip.AddrPortFrom(inet6, echoPort)}},
		},
	}
	must(sim.InstallKubeProxy(w.c.Egress.NS, kp))
	kp.HostPorts = []sim.HostPort{
		{Protocol: "tcp", Port: webHostPort, Pod: netip.AddrPortFrom(w.web.IP4, echoPort)},
		{Protocol: "tcp", Port: webHostPort, Pod: netip.AddrPortFrom(w.web.IP6, echoPort)},
	}
	must(sim.InstallKubeProxy(w.c.App.NS, kp))

	for _, p := range []*sim.Pod{w.app, w.web, w.gw, w.worker, w.selfgw, w.dns, w.lxc, w.unreg} {
		if p != nil {
			p.ResolveNeighbours()
		}
	}
	w.built = time.Since(start)
	t.Logf("%s cluster (%s) built in %s: app node %s, egress node %s; pods app %s web %s | gateway %s worker %s self-declared %s dns %s unregistered %s on %s",
		topo.Topology, bridgeName(topo), w.built.Round(time.Millisecond), w.c.App.Uplink4, w.c.Egress.Uplink4,
		w.app.IP4, w.web.IP4, w.gw.IP4, w.worker.IP4, w.selfgw.IP4, w.dns.IP4, w.lxc.IP4, lxcName)
	return w
}

func bridgeName(o sim.Options) string {
	if o.Topology == sim.Routed {
		return "ptp veths"
	}
	if o.Bridge == "" {
		return "bridge cni0"
	}
	return "bridge " + o.Bridge
}

// removeNodeRules deletes the node rules on both nodes (node.Remove,
// inside each node's namespace): the controls' state.
func (w *world) removeNodeRules() {
	w.t.Helper()
	for _, n := range []*sim.Node{w.c.App, w.c.Egress} {
		if err := n.NS.Do(func(ns.NetNS) error { return node.Remove() }); err != nil {
			w.t.Fatalf("remove the node rules on the %s node: %v", n.Name, err)
		}
	}
}

// counters reads both nodes' counters of our tables.
func (w *world) counters() map[string]uint64 {
	w.t.Helper()
	all := map[string]uint64{}
	for _, n := range []*sim.Node{w.c.App, w.c.Egress} {
		m, err := n.Counters()
		if err != nil {
			w.t.Fatalf("counters of the %s node: %v", n.Name, err)
		}
		for k, v := range m {
			if strings.Contains(k, " "+node.Table+" ") {
				all[n.Name+" "+strings.Replace(k, " "+node.Table, "", 1)] = v
			}
		}
	}
	return all
}

// counterDelta names the counters that rose: "egress inet forged +1".
func counterDelta(before, after map[string]uint64) string {
	var parts []string
	for _, k := range sortedKeys(after) {
		if d := after[k] - before[k]; d > 0 {
			parts = append(parts, fmt.Sprintf("%s +%d", k, d))
		}
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}

// gatewaySetHas says whether the egress node's gateways sets (either
// family) list addr (false when the sets do not exist).
func (w *world) gatewaySetHas(addr netip.Addr) bool {
	for _, set := range []string{"gateways_v4", "gateways_v6"} {
		out, err := sim.Exec(w.c.Egress.NS, "nft", "-j", "list", "set", "inet", node.Table, set)
		if err != nil {
			continue
		}
		var doc any
		if json.Unmarshal([]byte(out), &doc) == nil && hasString(doc, addr.String()) {
			return true
		}
	}
	return false
}

// hasString says whether a decoded JSON document holds the string s.
func hasString(v any, s string) bool {
	switch x := v.(type) {
	case string:
		return x == s
	case []any:
		for _, e := range x {
			if hasString(e, s) {
				return true
			}
		}
	case map[string]any:
		for _, e := range x {
			if hasString(e, s) {
				return true
			}
		}
	}
	return false
}
