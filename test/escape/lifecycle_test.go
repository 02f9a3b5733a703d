//go:build linux

package escape_test

// The node's whole life (issue 12): a reboot (the tables gone, the
// conflist, binary and node config still on disk, the installer not yet
// running again), many ADDs racing at boot, connections opened while the
// node was unenforced, an upgrade from the format-1 tables, and the
// agent killed while pods come and go. Each step is probed with traffic
// and has a control that shows the path open without the rules.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/internal/sim"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// life is a plain simulated cluster (bridge cni0) with the installer run
// once on each node, as `egress-cni-install install` leaves it.
type life struct {
	t        *testing.T
	cl       *sim.Cleanups
	c        *sim.Cluster
	exe      string
	bin      string
	nextPort atomic.Uint32
}

func newLife(t *testing.T) *life { t.Helper(); return newLifeWith(t, nil) }

// newLifeWith is newLife on a cluster of the given topology (nil: the
// plain bridged one).
func newLifeWith(t *testing.T, opts *sim.Options) *life {
	t.Helper()
	nstest.RequirePrivileged(t)
	bin, plugins := buildBinaries(t)
	l := &life{t: t, cl: &sim.Cleanups{}, bin: bin}
	l.nextPort.Store(40000)
	t.Cleanup(l.cl.Run)
	var err error
	if l.exe, err = sim.Executable(l.cl); err != nil {
		t.Fatal(err)
	}
	if opts == nil {
		l.c, err = sim.NewCluster(l.cl, plugins)
	} else {
		l.c, err = sim.NewClusterWith(l.cl, plugins, *opts)
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []*sim.Node{l.c.App, l.c.Egress} {
		if out, err := n.Install(context.Background(), filepath.Join(bin, "egress-cni-install"), filepath.Join(bin, "egress-cni")); err != nil {
			t.Fatalf("install on %s: %v\n%s", n.Name, err, out)
		}
		if err := n.LoadChain(); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

func (l *life) pod(n *sim.Node, namespace, name string) *sim.Pod {
	l.t.Helper()
	p, err := n.NewPod(l.cl, namespace, name, nil)
	if err != nil {
		l.t.Fatal(err)
	}
	if err := n.AddPod(context.Background(), l.cl, p); err != nil {
		l.t.Fatalf("ADD %s/%s: %v", namespace, name, err)
	}
	p.ResolveNeighbours()
	return p
}

// out probes the internet from p (from a fixed source port when port is
// not 0) and says whether it answered.
func (l *life) out(p *sim.Pod, network string, port uint16) bool {
	l.t.Helper()
	dst := netip.AddrPortFrom(sim.InternetV4, sim.EchoPort)
	if strings.HasSuffix(network, "6") {
		dst = netip.AddrPortFrom(sim.InternetV6, sim.EchoPort)
	}
	_, err := sim.RunProbe(context.Background(), l.exe, p.NS, appUID, sim.Probe{Network: network, Addr: dst, LocalPort: port,
		Payload: []byte("x\n"), Timeout: blockedWait})
	var de *sim.DialError
	if err != nil && !errors.As(err, &de) {
		l.t.Fatal(err)
	}
	return err == nil
}

func in(n *sim.Node, f func() error) error { return n.NS.Do(func(ns.NetNS) error { return f() }) }

func nodeCheck(n *sim.Node) error {
	cfg, err := node.Load(n.NodeConfig)
	if err != nil {
		return err
	}
	return in(n, func() error { return node.Check(cfg) })
}

// logCount counts the plugin's log records on n whose message has msg.
func logCount(t *testing.T, n *sim.Node, msg string) int {
	t.Helper()
	f, err := os.Open(n.LogFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	count := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r struct {
			Msg string `json:"msg"`
		}
		if json.Unmarshal(sc.Bytes(), &r) == nil && strings.Contains(r.Msg, msg) {
			count++
		}
	}
	return count
}

const appliedAtADD = "node rules were missing"

// After a reboot the first ADD applies the node rules itself, before the
// installer runs again: the new pod is enforced from its first packet.
// A gateway started in the same window gets out once it is registered.
func TestLifeBootWindow(t *testing.T) {
	l := newLife(t)
	app, egress := l.c.App, l.c.Egress
	before := l.pod(app, "team-a", "before-boot")
	// The reboot: the kernel's tables are gone, the files stay.
	for _, n := range []*sim.Node{app, egress} {
		if err := in(n, node.Remove); err != nil {
			t.Fatal(err)
		}
	}
	// Control: in that window the node is open.
	if !l.out(before, "udp4", 0) || !l.out(before, "tcp6", 0) {
		t.Fatal("control: with the tables gone, a pod did not reach the internet; the test could not fail")
	}
	after := l.pod(app, "team-b", "after-boot")
	if err := nodeCheck(app); err != nil {
		t.Fatalf("the first ADD after boot did not leave complete node rules: %v", err)
	}
	if n := logCount(t, app, appliedAtADD); n != 1 {
		t.Errorf("%d ADDs applied the node rules, want 1", n)
	}
	for _, network := range []string{"tcp4", "udp4", "tcp6", "udp6"} {
		if l.out(after, network, 0) {
			t.Errorf("pod started after the reboot reached the internet over %s", network)
		}
		if l.out(before, network, 0) {
			t.Errorf("pod from before the reboot still reaches the internet over %s once the node rules are back", network)
		}
	}
	gw := l.pod(egress, "istio-system", "istio-egressgateway-after-boot")
	if err := nodeCheck(egress); err != nil {
		t.Fatalf("egress node: %v", err)
	}
	if !l.out(gw, "tcp4", 0) || !l.out(gw, "udp6", 0) {
		t.Error("the gateway started after the reboot does not reach the internet")
	}
}

// 20 ADDs racing on a node without its rules: none fails, exactly one
// applies the rules, every pod is registered and blocked.
func TestLifeRacingBootADDs(t *testing.T) {
	l := newLife(t)
	app := l.c.App
	if err := in(app, node.Remove); err != nil {
		t.Fatal(err)
	}
	const n = 20
	pods := make([]*sim.Pod, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		p, err := app.NewPod(l.cl, "team-r", fmt.Sprintf("race-%02d", i), nil)
		if err != nil {
			t.Fatal(err)
		}
		pods[i] = p
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = app.AddPod(context.Background(), l.cl, p)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("racing ADD %d: %v", i, err)
		}
	}
	if err := nodeCheck(app); err != nil {
		t.Fatalf("after the race: %v", err)
	}
	if got := logCount(t, app, appliedAtADD); got != 1 {
		t.Errorf("%d racing ADDs applied the node rules, want exactly 1", got)
	}
	var reg []node.Pod
	if err := in(app, func() error { var err error; reg, err = node.ListPods(); return err }); err != nil {
		t.Fatal(err)
	}
	if len(reg) != n {
		t.Errorf("%d pods registered after the race, want %d", len(reg), n)
	}
	for _, i := range []int{0, n / 2, n - 1} {
		pods[i].ResolveNeighbours()
		if l.out(pods[i], "udp4", 0) {
			t.Errorf("racing pod %d reached the internet", i)
		}
	}
}

// A flow that started while the node had no rules does not survive
// their arrival: its next packet toward the internet carries no
// gateway label and is dropped, although conntrack knows it.
func TestLifeUnenforcedConnectionsAreCut(t *testing.T) {
	l := newLife(t)
	app := l.c.App
	p := l.pod(app, "team-a", "early")
	if err := in(app, node.Remove); err != nil {
		t.Fatal(err)
	}
	port := uint16(l.nextPort.Add(1))
	// Two packets of one flow: the first makes the entry, the second
	// rides it.
	first, second := l.out(p, "udp4", port), l.out(p, "udp4", port)
	if !first || !second {
		t.Fatal("control: without rules the flow did not reach the internet")
	}
	cfg, err := node.Load(app.NodeConfig)
	if err != nil {
		t.Fatal(err)
	}
	if err := in(app, func() error { return node.Apply(cfg) }); err != nil {
		t.Fatal(err)
	}
	// The same 5-tuple, an established conntrack entry.
	if l.out(p, "udp4", port) {
		t.Error("a flow opened while the node was unenforced still reaches the internet after the rules were applied")
	}
}

// The upgrade from the format-1 tables replaces them in one
// transaction: a watcher listing tables in a tight loop never sees the
// node without one, and the pods are enforced after.
func TestLifeUpgradeFromFormat1(t *testing.T) {
	l := newLife(t)
	app := l.c.App
	p := l.pod(app, "team-a", "upgrade")
	// Replace our tables by a format-1 layout.
	if err := in(app, node.Remove); err != nil {
		t.Fatal(err)
	}
	if _, err := sim.Exec(app.NS, "nft", `add table inet egress_cni_node
add set inet egress_cni_node gateways_v4 { type ifname . ipv4_addr; }
add chain inet egress_cni_node from_pods
add chain inet egress_cni_node forward { type filter hook forward priority -5; policy accept; }
add rule inet egress_cni_node forward iifname "veth*" jump from_pods
add rule inet egress_cni_node from_pods meta mark & 0x4000 == 0x4000 accept
add table bridge egress_cni_node
add chain bridge egress_cni_node prerouting { type filter hook prerouting priority -200; policy accept; }`); err != nil {
		t.Fatal(err)
	}
	// Control: format 1 lets this pod out (its veth matches, but the
	// rule set has no drop; the point is that the path is open).
	if !l.out(p, "udp4", 0) {
		t.Fatal("control: the pod did not reach the internet under the format-1 stand-in")
	}
	stop := make(chan struct{})
	var missing, polls atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = in(app, func() error {
			c, err := nftables.New()
			if err != nil {
				return err
			}
			for {
				select {
				case <-stop:
					return nil
				default:
				}
				if _, err := c.ListTableOfFamily(node.Table, nftables.TableFamilyINet); err != nil {
					missing.Add(1)
				}
				polls.Add(1)
			}
		})
	}()
	out, err := app.Install(context.Background(), filepath.Join(l.bin, "egress-cni-install"), filepath.Join(l.bin, "egress-cni"))
	close(stop)
	<-done
	if err != nil {
		t.Fatalf("upgrade install: %v\n%s", err, out)
	}
	if missing.Load() != 0 || polls.Load() == 0 {
		t.Errorf("during the upgrade the table was missing in %d of %d polls", missing.Load(), polls.Load())
	}
	t.Logf("upgrade watched by %d table listings, none missed the table", polls.Load())
	if err := nodeCheck(app); err != nil {
		t.Fatalf("after the upgrade: %v", err)
	}
	if l.out(p, "udp4", 0) {
		t.Error("after the upgrade the pod reaches the internet")
	}
}

// The agent (the installer's run mode) killed with SIGKILL, then
// SIGTERM, while pods come and go: the node stays enforced (the rules
// are the kernel's, not the agent's), a new agent takes over with an
// atomic re-apply, and pods added between two agents are registered.
func TestLifeAgentKilledDuringChurn(t *testing.T) {
	l := newLife(t)
	app := l.c.App
	probe := l.pod(app, "team-a", "probe")
	start := func() *exec.Cmd {
		args := []string{"run", "-cni-conf-dir", app.ConfDir, "-cni-bin-dir", app.BinDir, "-binary", filepath.Join(l.bin, "egress-cni"),
			"-plugin-config", app.PluginConfig, "-node-config", app.NodeConfig, "-netns", app.NS.Path(),
			"-lock-file", filepath.Join(app.Dir, "run/agent.lock"), "-ready-file", app.ReadyFile, "-resync", "1h", "-netns-dir", "",
			// It runs in the test's own namespace: no metrics port there.
			"-metrics-port", "0", "-state-dir", app.StateDir}
		cmd := exec.Command(filepath.Join(l.bin, "egress-cni-install"), args...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		l.cl.Push(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		return cmd
	}
	var churned atomic.Int64
	stop := make(chan struct{})
	churnDone := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				churnDone <- nil
				return
			default:
			}
			p, err := app.NewPod(l.cl, "team-c", fmt.Sprintf("churn-%03d", i), nil)
			if err == nil {
				err = app.AddPod(context.Background(), l.cl, p)
			}
			if err == nil {
				err = app.DelPod(p)
			}
			if err != nil {
				churnDone <- err
				return
			}
			churned.Add(1)
		}
	}()
	for round, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
		agent := start()
		time.Sleep(300 * time.Millisecond)
		if err := agent.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		_ = agent.Wait()
		if err := nodeCheck(app); err != nil {
			t.Errorf("round %d: after %v the node rules drifted: %v", round, sig, err)
		}
		if l.out(probe, "udp4", 0) {
			t.Errorf("round %d: with the agent gone (%v) a pod reached the internet", round, sig)
		}
	}
	close(stop)
	if err := <-churnDone; err != nil {
		t.Fatalf("pod churn: %v", err)
	}
	if churned.Load() == 0 {
		t.Fatal("no pod churned during the agent restarts")
	}
	t.Logf("%d pods added and deleted while two agents were killed", churned.Load())
	if err := nodeCheck(app); err != nil {
		t.Fatal(err)
	}
}

// Half the node rules are not the rules: with only the bridge table gone
// (the inet one cannot tell the gateway's port from a neighbour's on a
// bridge), the next ADD applies them again before its pod starts.
func TestLifeBridgeTableGone(t *testing.T) {
	l := newLife(t)
	egress := l.c.Egress
	if _, err := sim.Exec(egress.NS, "nft", "delete", "table", "bridge", node.Table); err != nil {
		t.Fatal(err)
	}
	if nodeCheck(egress) == nil {
		t.Fatal("control: Check passes with the bridge table gone")
	}
	p := l.pod(egress, "team-c", "after-half")
	if err := nodeCheck(egress); err != nil {
		t.Fatalf("the ADD did not restore the node rules: %v", err)
	}
	if n := logCount(t, egress, appliedAtADD); n != 1 {
		t.Errorf("%d ADDs applied the node rules, want 1", n)
	}
	if l.out(p, "udp4", 0) {
		t.Error("the new pod reached the internet")
	}
}
