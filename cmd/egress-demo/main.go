// Command egress-demo is `make demo`: egress-cni's whole job in one
// command, on one machine, without a cluster. It builds a small simulated
// cluster out of network namespaces (internet host, router, app node,
// egress node; internal/sim), runs the real installer
// (egress-cni-install) on each node against the node's own CNI dirs,
// creates pods through the real CNI chain the installer edited (bridge,
// host-local, egress-cni, via libcni), sends real traffic along each path
// a pod might take to the internet, and prints what happened:
//
//	PATH | EXPECTED | SEEN | OK
//
// It exits 1 if any path did not behave as expected. Everything it makes
// (namespaces, processes, temporary directories) is removed on exit, on
// error and on Ctrl-C; nothing touches the machine's own network, and
// every address is from a documentation range.
//
// Run as root, after `make build`:
//
//	bin/egress-demo [-bin DIR] [-plugins-dir DIR] [-v]
//	bin/egress-demo -capture-backends [-egress-init bin/egress-init]   # the pod layer alone, per backend
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/egress-cni/egress-cni/internal/sim"
	"github.com/egress-cni/egress-cni/pkg/audit"
	"github.com/egress-cni/egress-cni/pkg/rules"
)

func main() {
	sim.RunChild() // clients (also -capture-backends') and the sidecar
	os.Exit(realMain())
}

func realMain() int {
	exe, _ := os.Executable()
	defBin := filepath.Dir(exe)
	binDir := flag.String("bin", defBin, "directory holding egress-cni and egress-cni-install (default: this program's)")
	pluginsDir := flag.String("plugins-dir", "", "cache of the CNI reference plugins, built on first use (default: <bin>/cni-plugins)")
	verbose := flag.Bool("v", false, "also print the installers' logs and the chains' config files")
	captureBackends := flag.Bool("capture-backends", false, "instead of the cluster, show pod capture alone for each egress-init backend")
	initBin := flag.String("egress-init", "", "with -capture-backends: the egress-init binary (default: <bin>/egress-init)")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "egress-demo: must run as root (it creates network namespaces)")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *captureBackends {
		if *initBin == "" {
			*initBin = filepath.Join(*binDir, "egress-init")
		}
		ok, err := runCaptureBackends(ctx, *initBin)
		return verdict(ctx, ok, err)
	}
	if *pluginsDir == "" {
		*pluginsDir = filepath.Join(*binDir, "cni-plugins")
	}
	d := &demo{bin: *binDir, pluginsDir: *pluginsDir, verbose: *verbose}
	ok, err := d.run(ctx)
	return verdict(ctx, ok, err)
}

func verdict(ctx context.Context, ok bool, err error) int {
	switch {
	case ctx.Err() != nil:
		fmt.Fprintln(os.Stderr, "egress-demo: interrupted; everything it made is removed")
		return 130
	case err != nil:
		fmt.Fprintf(os.Stderr, "egress-demo: %v\n", err)
		return 1
	case !ok:
		fmt.Println("\nRESULT: at least one path did not behave as expected")
		return 1
	}
	fmt.Println("\nRESULT: every path behaved as expected")
	return 0
}

type demo struct {
	bin, pluginsDir string
	verbose         bool

	cl                *sim.Cleanups
	installer, plugin string
	exe               string // this program, runnable by any UID (clients, sidecar)
	c                 *sim.Cluster
	// The pods of step 4.
	app, plain, gw, worker, selfGW *sim.Pod
	// agents are the nodes' agents (the installer's run mode), whose
	// audit lines name the pod of each blocked path.
	agents map[*sim.Node]*sim.Agent
	// audited are the audit lines of the blocked paths, in table order.
	audited []audit.Line
}

func step(format string, args ...any) { fmt.Printf(format+"\n", args...) }

func (d *demo) run(ctx context.Context) (bool, error) {
	start := time.Now()
	d.cl = &sim.Cleanups{}
	defer d.cl.Run()

	d.installer, d.plugin = filepath.Join(d.bin, "egress-cni-install"), filepath.Join(d.bin, "egress-cni")
	for _, b := range []string{d.installer, d.plugin} {
		if _, err := os.Stat(b); err != nil {
			return false, fmt.Errorf("%w (run `make build`)", err)
		}
	}
	for _, s := range []func(context.Context) error{d.referencePlugins, d.cluster, d.install, d.pods} {
		if err := s(ctx); err != nil {
			return false, err
		}
	}
	n, ok, err := d.traffic(ctx)
	if err != nil {
		return false, err
	}
	fmt.Printf("\n%d paths in %.1fs; tearing down\n", n, time.Since(start).Seconds())
	return ok, nil
}

// referencePlugins is step 1: the primary CNI's plugins (ours are built
// by make), and the copy of this program its clients and the sidecar run
// as.
func (d *demo) referencePlugins(ctx context.Context) error {
	built, err := sim.EnsureReferencePlugins(ctx, d.pluginsDir)
	if err != nil {
		return err
	}
	how := "cached"
	if built {
		how = "built from the Go module cache"
	}
	step("[1/5] CNI reference plugins (bridge, host-local, loopback): %s in %s", how, d.pluginsDir)
	d.exe, err = sim.Executable(d.cl)
	return err
}

// cluster is step 2: the cluster's namespaces.
func (d *demo) cluster(ctx context.Context) error {
	c, err := sim.NewCluster(d.cl, d.pluginsDir)
	if err != nil {
		return err
	}
	d.c = c
	step("[2/5] cluster in network namespaces: internet %s/%s, router, app node %s, egress node %s",
		sim.InternetV4, sim.InternetV6, c.App.Uplink4, c.Egress.Uplink4)
	return ctx.Err()
}

// install is step 3: the installer, on each node, as the DaemonSet runs
// it, then the agents.
func (d *demo) install(ctx context.Context) error {
	c := d.c
	step("[3/5] %s install, inside each node's namespace, with the node's own CNI dirs:", d.installer)
	for _, n := range []*sim.Node{c.App, c.Egress} {
		out, err := n.Install(ctx, d.installer, d.plugin)
		if err != nil {
			return err
		}
		if err := n.LoadChain(); err != nil {
			return err
		}
		action := "?"
		if m := installAction.FindStringSubmatch(out); m != nil {
			action = m[1]
		}
		step("      %-6s node: node rules for role %q applied; our entry %s: %s now chains %s",
			n.Name, n.Role, action, filepath.Base(n.ConfFile), strings.Join(n.Plugins(), " -> "))
		if d.verbose {
			conf, _ := os.ReadFile(n.ConfFile)
			fmt.Printf("%s%s\n", indent(out), indent(string(conf)))
		}
	}

	// The agent, as the DaemonSet runs it after the install: the drop
	// audit (NFLOG) and the metrics. A short dedup window: two rows may
	// try the same destination from one pod.
	d.agents = map[*sim.Node]*sim.Agent{}
	for _, n := range []*sim.Node{c.App, c.Egress} {
		a, err := n.StartAgent(d.cl, d.installer, d.plugin, "-audit-dedup", "500ms")
		if err != nil {
			return err
		}
		d.agents[n] = a
	}
	step("      agents (%s run) on both nodes: reading the drops from NFLOG, metrics on :%d/metrics", filepath.Base(d.installer), sim.AgentMetricsPort)
	return nil
}

// pods is step 4: the pods, through the chain, and what runs in them (the
// worker's and the plain pod's echo servers, the gateway's forwarder,
// the app's sidecar stand-in), and a kube-proxy stand-in.
func (d *demo) pods(ctx context.Context) error {
	c := d.c
	step("[4/5] pods, through each node's CNI chain (loopback; %s):", strings.Join(c.App.Plugins(), ", "))
	injected := map[string]string{"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`}
	type podSpec struct {
		n        *sim.Node
		ns, name string
		ann      map[string]string
		p        **sim.Pod
		role     string
	}
	for _, s := range []podSpec{
		{c.Egress, "istio-system", "istio-egressgateway-5d8f9-abcde", nil, &d.gw, "egress gateway"},
		{c.Egress, "team-c", "worker", nil, &d.worker, "no sidecar; echo server on 8080"},
		{c.Egress, "team-x", "self-declared-gw", map[string]string{"egress-cni.io/gateway": "true"}, &d.selfGW, "annotated egress-cni.io/gateway: true (not a gateway: team-x is not allowed)"},
		{c.App, "team-a", "app", injected, &d.app, "sidecar injected; sidecar stand-in on 15001 as UID 1337"},
		{c.App, "team-b", "no-sidecar", nil, &d.plain, "no sidecar"},
	} {
		p, err := s.n.NewPod(d.cl, s.ns, s.name, s.ann)
		if err != nil {
			return err
		}
		if err := s.n.AddPod(ctx, d.cl, p); err != nil {
			return err
		}
		*s.p = p
		step("      %-6s node: %-45s %-15s %s", s.n.Name, p.Namespace+"/"+p.Name, p.IP4, s.role)
	}
	gws, err := c.Egress.Gateways()
	if err != nil {
		return err
	}
	var entries []string
	for _, g := range gws {
		entries = append(entries, g.Iface+" . "+g.IP.String())
	}
	step("      egress node: gateways registered by the plugin: %s", strings.Join(entries, ", "))
	return d.podServers(ctx)
}

// podServers starts what runs in the pods, and the kube-proxy stand-in.
func (d *demo) podServers(ctx context.Context) error {
	c, worker, plain, gw := d.c, d.worker, d.plain, d.gw
	if err := sim.ServeEcho(d.cl, worker.NS, netip.AddrPortFrom(worker.IP4, sim.EchoPort), netip.AddrPortFrom(worker.IP6, sim.EchoPort)); err != nil {
		return err
	}
	if err := sim.ServeEcho(d.cl, plain.NS, netip.AddrPortFrom(plain.IP6, sim.EchoPort)); err != nil {
		return err
	}
	if err := sim.ServeForwarder(d.cl, gw.NS, gw.IP4, sim.ForwardPort); err != nil {
		return err
	}
	// A kube-proxy stand-in on the egress node: a NodePort whose Service
	// has an internet endpoint (no selector, a hand-made EndpointSlice),
	// marked with KUBE-MARK-MASQ's real bit 0x4000, as kube-proxy does.
	kp := sim.KubeProxy{ClusterCIDRs: sim.ClusterCIDRs[:3], Services: []sim.Service{{
		Name: "exfil", Protocols: []string{"tcp"}, Port: sim.EchoPort, NodePort: demoNodePort,
		Endpoints: []netip.AddrPort{netip.AddrPortFrom(sim.InternetV4, sim.EchoPort)},
	}}}
	if err := sim.InstallKubeProxy(c.Egress.NS, kp); err != nil {
		return err
	}
	_, err := sim.StartSidecar(ctx, d.cl, d.exe, d.app.NS, proxyUID, 15001, netip.AddrPortFrom(gw.IP4, sim.ForwardPort), sim.ClusterCIDRs)
	return err
}

// traffic is step 5: once the pods' own link-local chatter is over (it
// is counted by the node rules too, see ResolveNeighbours), every row of
// scenarios, as a table, and the audit lines of the blocked ones. It
// returns how many rows ran and whether all held.
func (d *demo) traffic(ctx context.Context) (int, bool, error) {
	for _, p := range []*sim.Pod{d.gw, d.worker, d.selfGW, d.app, d.plain} {
		p.ResolveNeighbours()
	}
	if err := settle(ctx, d.c.App, d.c.Egress); err != nil {
		return 0, false, err
	}
	step("[5/5] traffic (blocked paths wait %s for a reply)", blockedWait)
	rows := d.scenarios()
	fmt.Println()
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "PATH\tEXPECTED\tSEEN\tOK")
	allOK := true
	for _, s := range rows {
		seen, ok, err := d.probe(ctx, s)
		if err != nil {
			w.Flush()
			return 0, false, err
		}
		mark := "ok"
		if !ok {
			mark, allOK = "FAIL", false
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", s.path, s.expect, seen, mark)
	}
	w.Flush()
	fmt.Printf("\nThe agents' audit lines of the blocked paths (stdout of %s run, one per connection attempt):\n", filepath.Base(d.installer))
	for _, ln := range d.audited {
		b, _ := json.Marshal(ln)
		fmt.Printf("  %s\n", b)
	}
	return len(rows), allOK, nil
}

// scenarios are the rows of step 5, in table order.
func (d *demo) scenarios() []scenario {
	c, app, plain, gw, worker, selfGW := d.c, d.app, d.plain, d.gw, d.worker, d.selfGW
	inet4 := netip.AddrPortFrom(sim.InternetV4, sim.EchoPort).String()
	inet6 := netip.AddrPortFrom(sim.InternetV6, sim.EchoPort).String()
	workerAddr := netip.AddrPortFrom(worker.IP4, sim.EchoPort).String()
	viaGateway := func(src netip.Addr) string {
		return "redirected to proxy, allowed via gateway, internet saw " + src.String()
	}
	blocked := "blocked at node"
	rows := []scenario{
		{"app pod (UID 1000) tcp4 -> internet", viaGateway(c.Egress.Uplink4), app, appUID, "tcp4", inet4, "", nil},
		{"app pod (UID 1000) tcp6 -> internet", viaGateway(c.Egress.Uplink6), app, appUID, "tcp6", inet6, "", nil},
		{"app pod (UID 1000) tcp4 -> worker pod", "redirected to proxy, allowed, pod saw " + app.IP4.String(), app, appUID, "tcp4", workerAddr, "", nil},
		{"app pod as UID 1337 tcp4 -> internet", blocked, app, proxyUID, "tcp4", inet4, "", nil},
		{"app pod as UID 1337 tcp6 -> internet", blocked, app, proxyUID, "tcp6", inet6, "", nil},
		{"app pod (UID 1000) udp4 -> internet", blocked, app, appUID, "udp4", inet4, "", nil},
		// Same node over IPv6: needs neighbour discovery across the
		// bridge, which the node rules must let through.
		{"app pod as UID 1337 tcp6 -> pod on same node", "allowed, pod saw " + app.IP6.String(), app, proxyUID, "tcp6", netip.AddrPortFrom(plain.IP6, sim.EchoPort).String(), "", nil},
		{"pod without sidecar tcp4 -> internet", blocked, plain, appUID, "tcp4", inet4, "", nil},
		{"pod without sidecar tcp4 -> worker pod", "allowed, pod saw " + plain.IP4.String(), plain, appUID, "tcp4", workerAddr, "", nil},
		{"gateway pod tcp4 -> internet", "allowed, internet saw " + c.Egress.Uplink4.String(), gw, appUID, "tcp4", inet4, "", nil},
		{"gateway pod tcp6 -> internet", "allowed, internet saw " + c.Egress.Uplink6.String(), gw, appUID, "tcp6", inet6, "", nil},
		{"worker pod tcp4 -> internet", blocked, worker, appUID, "tcp4", inet4, "", nil},
		{"worker pod spoofing gateway IP udp4 -> internet", blocked, worker, 0, "udp4", inet4, gw.IP4.String(), nil},
		{"self-declared gateway (annotation) tcp4 -> internet", blocked, selfGW, appUID, "tcp4", inet4, "", nil},
		{fmt.Sprintf("worker pod tcp4 -> NodePort %d (kube-proxy mark 0x4000, internet endpoint)", demoNodePort), blocked, worker, appUID, "tcp4",
			netip.AddrPortFrom(c.Egress.Uplink4, demoNodePort).String(), "", nil},
		// Last: a container with NET_ADMIN deletes its pod's capture.
		{"app pod, capture deleted (NET_ADMIN), tcp4 -> internet", blocked, app, appUID, "tcp4", inet4, "", func() error {
			_, err := sim.Exec(app.NS, "nft", "delete", "table", "inet", rules.NFTTable)
			return err
		}},
	}
	step("      internet = %s and %s; worker pod = team-c/worker %s on the egress node; gateway IP = %s",
		inet4, inet6, workerAddr, gw.IP4)
	return rows
}

const (
	// demoNodePort is the kube-proxy stand-in's NodePort.
	demoNodePort = 30080
	appUID       = 1000
	proxyUID     = 1337
	// blockedWait is how long a blocked connection waits for a reply;
	// TCP's first SYN retransmission (1s) comes after it, so a dropped
	// connection counts one drop.
	blockedWait = 800 * time.Millisecond
)

// scenario is one row: a connection from a pod, and what should happen.
type scenario struct {
	path, expect string
	from         *sim.Pod
	uid          uint32
	network      string
	addr, source string
	// before runs first (tampering by the pod itself).
	before func() error
}

// probe makes the connection and describes it in the vocabulary of the
// expectations: "redirected to proxy", "allowed [via gateway]", "<who>
// saw <source>", or "blocked at node (drop counter +N)".
func (d *demo) probe(ctx context.Context, s scenario) (seen string, ok bool, err error) {
	blockedRow := strings.HasPrefix(s.expect, "blocked")
	wait := 2 * time.Second
	if blockedRow {
		wait = blockedWait
	}
	if s.before != nil {
		if err := s.before(); err != nil {
			return "", false, err
		}
	}
	d0, err := s.from.Node.Drops()
	if err != nil {
		return "", false, err
	}
	ag := d.agents[s.from.Node]
	lines0 := len(ag.Lines())
	i0, err := d.c.InternetSeen()
	if err != nil {
		return "", false, err
	}
	r, derr := sim.Dial(ctx, d.exe, s.from.NS, s.uid, s.network, s.addr, s.source, wait)
	if ctx.Err() != nil {
		return "", false, ctx.Err()
	}
	d1, err := s.from.Node.Drops()
	if err != nil {
		return "", false, err
	}
	i1, err := d.c.InternetSeen()
	if err != nil {
		return "", false, err
	}
	drops, reached := d1-d0, i1-i0
	var de *sim.DialError
	if derr != nil && !errors.As(derr, &de) {
		return "", false, derr
	}
	var parts []string
	switch {
	case derr == nil:
		if r.Sidecar.IsValid() {
			parts = append(parts, "redirected to proxy")
		}
		if r.Gateway.IsValid() {
			parts = append(parts, "allowed via gateway")
		} else {
			parts = append(parts, "allowed")
		}
		who := "internet"
		if !(netip.MustParseAddrPort(s.addr).Addr() == sim.InternetV4 || netip.MustParseAddrPort(s.addr).Addr() == sim.InternetV6) {
			who = "pod"
		}
		if r.Src.IsValid() {
			parts = append(parts, who+" saw "+r.Src.String())
		} else {
			parts = append(parts, "reply: "+strings.Join(r.Lines, " | "))
		}
		seen = strings.Join(parts, ", ")
		return seen, seen == s.expect, nil
	case drops > 0 && reached == 0:
		// The agent's line naming the pod: NFLOG delivers it
		// asynchronously, so wait for it (at most 2 s).
		ln, ok := ag.WaitLine(ctx, lines0, 2*time.Second, func(ln audit.Line) bool {
			return ln.Pod == s.from.Name && ln.Namespace == s.from.Namespace
		})
		if !ok {
			return fmt.Sprintf("blocked at node (drop counter +%d), but the agent logged no line naming %s/%s", drops, s.from.Namespace, s.from.Name), false, nil
		}
		d.audited = append(d.audited, ln)
		dst := ln.Destination
		if a, err := netip.ParseAddr(dst); err == nil && ln.DPort != 0 {
			dst = netip.AddrPortFrom(a, ln.DPort).String()
		}
		seen = fmt.Sprintf("blocked at node (drop counter +%d; audit: %s %s/%s %s -> %s/%s)", drops, ln.Reason, ln.Namespace, ln.Pod,
			ln.Source, dst, ln.Protocol)
	case reached > 0:
		seen = fmt.Sprintf("reached the internet (%d pkt), no reply (%s), drop counter +%d", reached, de.Kind, drops)
	default:
		seen = fmt.Sprintf("no reply (%s), drop counter +%d", de.Kind, drops)
	}
	return seen, blockedRow && strings.HasPrefix(seen, "blocked at node ("), nil
}

// settle waits (at most 3s) until the nodes' drop counters have not
// moved for 300ms.
func settle(ctx context.Context, nodes ...*sim.Node) error {
	read := func() (uint64, error) {
		var sum uint64
		for _, n := range nodes {
			d, err := n.Drops()
			if err != nil {
				return 0, err
			}
			sum += d
		}
		return sum, nil
	}
	last, err := read()
	if err != nil {
		return err
	}
	stable := time.Now()
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		now, err := read()
		if err != nil {
			return err
		}
		if now != last {
			last, stable = now, time.Now()
		} else if time.Since(stable) >= 300*time.Millisecond {
			return nil
		}
	}
	return nil
}

// installAction is the installer's log of what it did to the config.
var installAction = regexp.MustCompile(`msg=installed .*action=(\S+)`)

var lineStart = regexp.MustCompile(`(?m)^`)

func indent(s string) string {
	return lineStart.ReplaceAllString(strings.TrimRight(s, "\n"), "        ") + "\n"
}
