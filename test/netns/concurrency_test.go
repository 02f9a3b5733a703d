//go:build linux

package netns_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// Issue 7's concurrency faults, in the simulated cluster with the real
// chain: ADD and DEL racing for the same container (and runtime retries),
// and a node under load while its node rules are re-applied.

// nodeState is what a node holds for its pods: host-side veths, host-local
// allocations (file name -> owner), libcni cache files, pod
// registrations with the node rules and gateway entries.
type nodeState struct {
	veths    []string
	ipam     map[string]string
	cache    []string
	pods     []node.Pod
	gateways []node.Gateway
}

func (n *clusterNode) state(t *testing.T) nodeState {
	t.Helper()
	var s nodeState
	if err := n.in(func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			if l.Type() == "veth" {
				s.veths = append(s.veths, l.Attrs().Name)
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("%s: list links: %v", n.name, err)
	}
	s.ipam = map[string]string{}
	dir := filepath.Join(n.chain.dir, "ipam", n.chain.list.Name)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if _, err := netip.ParseAddr(e.Name()); err != nil {
			continue // lock, last_reserved_ip.N
		}
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		s.ipam[e.Name()] = strings.TrimSpace(strings.Split(string(b), "\n")[0])
	}
	ents, _ = os.ReadDir(filepath.Join(n.chain.dir, "cache", "results"))
	for _, e := range ents {
		s.cache = append(s.cache, e.Name())
	}
	s.pods = n.pods(t)
	s.gateways = n.gateways(t)
	return s
}

// leaksOf lists what the node holds for container id.
func (s nodeState) leaksOf(id string) []string {
	var out []string
	for ip, owner := range s.ipam {
		if owner == id {
			out = append(out, "host-local allocation "+ip)
		}
	}
	for _, f := range s.cache {
		if strings.Contains(f, id) {
			out = append(out, "libcni cache "+f)
		}
	}
	for _, p := range s.pods {
		if p.ContainerID == id {
			out = append(out, "registration "+p.String())
		}
	}
	for _, g := range s.gateways {
		if g.ContainerID == id {
			out = append(out, "gateway entry "+g.String())
		}
	}
	return out
}

// diff lists what s holds beyond base.
func (s nodeState) diff(base nodeState) []string {
	var out []string
	for _, v := range s.veths {
		if !slices.Contains(base.veths, v) {
			out = append(out, "veth "+v)
		}
	}
	for ip, owner := range s.ipam {
		if _, ok := base.ipam[ip]; !ok {
			out = append(out, fmt.Sprintf("host-local allocation %s (%s)", ip, owner))
		}
	}
	for _, f := range s.cache {
		if !slices.Contains(base.cache, f) {
			out = append(out, "libcni cache "+f)
		}
	}
	for _, p := range s.pods {
		if !slices.ContainsFunc(base.pods, func(b node.Pod) bool { return b.String() == p.String() }) {
			out = append(out, "registration "+p.String())
		}
	}
	for _, g := range s.gateways {
		if !slices.Contains(base.gateways, g) {
			out = append(out, "gateway entry "+g.String())
		}
	}
	return out
}

// hasOurTable says whether the namespace holds our nftables table (read
// over netlink, no process).
func hasOurTable(n ns.NetNS) (bool, error) {
	var found bool
	err := n.Do(func(ns.NetNS) error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		defer c.CloseLasting()
		ts, err := c.ListTables()
		if err != nil {
			return err
		}
		for _, tb := range ts {
			if tb.Name == "egress_cni" {
				found = true
			}
		}
		return nil
	})
	return found, err
}

// TestClusterConcurrentAddDel races two ADDs of the whole chain, a
// retried ADD of egress-cni alone (with the last prevResult) and DEL
// (sometimes two) for the same container, 20 rounds with random order and start
// offsets, for a gateway pod on the egress node and a captured pod on
// the app node at the same time. After each race the runtime's cleanup
// DEL must leave nothing of the container (pod rules, registration with
// the node rules, gateway entries, veth, IP allocation, cache), and ADD
// followed by two retried ADDs must give exactly one complete state.
func TestClusterConcurrentAddDel(t *testing.T) {
	c, _, start, _ := startCluster(t)
	for _, n := range []*clusterNode{c.app, c.egress} {
		n.apply(t)
	}
	// The bridges exist before the race (see testParallel).
	for _, n := range []*clusterNode{c.app, c.egress} {
		n.mustAdd(t, n.newClusterPod(t, "team-z", "warm-"+n.name, map[string]string{}))
	}
	// The gateway is selected by its protected name (the annotation is
	// honoured only in gatewaySelector.allowedNamespaces, which these
	// nodes do not set) and captured too, so that both pod rules and
	// gateway entries race.
	gw := c.egress.newClusterPod(t, "istio-system", "istio-egressgateway-race", map[string]string{
		"sidecar.istio.io/status": statusAnnotation})
	app := c.app.newClusterPod(t, "team-a", "race", map[string]string{"sidecar.istio.io/status": statusAnnotation})
	pods := []*clusterPod{gw, app}
	base := map[*clusterPod]nodeState{}
	ref := map[*clusterPod]string{}
	// last is the chain's result of the pod's last complete ADD: what a
	// runtime that retries the plugin's ADD passes as prevResult.
	last := map[*clusterPod]types.Result{}
	pristine := nstest.NFTDump(t, nstest.NewNS(t))
	for _, p := range pods {
		base[p] = p.node.state(t)
		p.node.mustAdd(t, p)
		ref[p] = nstest.NFTDump(t, p.netns)
		if !strings.Contains(ref[p], "table inet egress_cni") {
			t.Fatalf("%s: no pod rules after ADD:\n%s", p.name, ref[p])
		}
		last[p] = p.node.chain.cachedResult(p.pod)
		if err := p.node.del(p); err != nil {
			t.Fatal(err)
		}
	}

	// clean asserts that nothing of p is left, in its namespace and on
	// its node.
	clean := func(p *clusterPod, when string) {
		t.Helper()
		if d := nstest.DumpAll(t, p.netns); ourRules.MatchString(d) {
			t.Errorf("%s, %s: the pod holds our rules:\n%s", when, p.name, d)
		}
		if err := p.netns.Do(func(ns.NetNS) error {
			if _, err := netlink.LinkByName("eth0"); err == nil {
				return fmt.Errorf("eth0 still exists")
			}
			return nil
		}); err != nil {
			t.Errorf("%s, %s: %v", when, p.name, err)
		}
		s := p.node.state(t)
		if l := append(s.leaksOf(p.id), s.diff(base[p])...); len(l) > 0 {
			t.Errorf("%s, %s: leaked on node %s: %v", when, p.name, p.node.name, l)
		}
	}
	// complete asserts one full, correct state for p.
	complete := func(p *clusterPod, when string) {
		t.Helper()
		if d := nstest.NFTDump(t, p.netns); d != ref[p] {
			t.Errorf("%s, %s: pod rules differ from a clean ADD:\n%s", when, p.name, d)
		}
		if err := p.node.chain.check(p.pod); err != nil {
			t.Errorf("%s, %s: CHECK: %v", when, p.name, err)
		}
		// One registration: the pod's current host veth as its port,
		// the bridge as its L3 interface, both addresses.
		veth := p.node.hostVeth(t, p)
		var regs []node.Pod
		for _, r := range p.node.pods(t) {
			if r.ContainerID == p.id {
				regs = append(regs, r)
			}
		}
		if len(regs) != 1 || regs[0].Port != veth || regs[0].L3 != "cni0" || len(regs[0].IPs) != 2 ||
			!slices.Contains(regs[0].IPs, p.ip4) || !slices.Contains(regs[0].IPs, p.ip6) || regs[0].Gateway != (p == gw) {
			t.Errorf("%s, %s: registrations %v, want exactly %s via cni0 [%s %s] (gateway %v)", when, p.name, regs, veth, p.ip4, p.ip6, p == gw)
		}
		var mine []node.Gateway
		for _, g := range p.node.gateways(t) {
			if g.ContainerID == p.id {
				mine = append(mine, g)
			}
		}
		if p == gw {
			// Gateway entries name the L3 interface: the bridge.
			if len(mine) != 2 || !slices.ContainsFunc(mine, func(g node.Gateway) bool { return g.IP == p.ip4 && g.Iface == "cni0" }) ||
				!slices.ContainsFunc(mine, func(g node.Gateway) bool { return g.IP == p.ip6 && g.Iface == "cni0" }) {
				t.Errorf("%s, gateway: entries %v, want exactly cni0 . %s and cni0 . %s", when, mine, p.ip4, p.ip6)
			}
		} else if len(mine) != 0 {
			t.Errorf("%s, %s: gateway entries for an ordinary pod: %v", when, p.name, mine)
		}
		n := 0
		for _, x := range p.node.state(t).diff(base[p]) {
			if strings.HasPrefix(x, "veth ") {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%s, %s: %d host veths beyond the baseline, want 1", when, p.name, n)
		}
	}

	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 7))
	t.Logf("random seed %d", seed)
	type tally struct {
		opErrs               map[string]int
		delErrs              []string
		addErrs              map[string]int
		full, empty, partial int
		entries              map[int]int
		leftAdded            int
	}
	stats := map[*clusterPod]*tally{}
	for _, p := range pods {
		stats[p] = &tally{opErrs: map[string]int{}, entries: map[int]int{}, addErrs: map[string]int{}}
	}
	const rounds = 20
	raceStart := time.Now()
	for round := range rounds {
		when := fmt.Sprintf("round %d", round+1)
		type op struct {
			p     *clusterPod
			kind  string
			delay time.Duration
		}
		var ops []op
		for _, p := range pods {
			kinds := []string{"ADD", "ADD", "RETRY", "DEL"}
			if rng.IntN(2) == 0 {
				kinds = append(kinds, "DEL")
			}
			rng.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
			for _, k := range kinds {
				ops = append(ops, op{p, k, time.Duration(rng.IntN(5000)) * time.Microsecond})
			}
		}
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, o := range ops {
			wg.Add(1)
			go func() {
				defer wg.Done()
				time.Sleep(o.delay)
				var err error
				switch o.kind {
				case "ADD":
					// Each racing ADD writes its addresses into its own
					// copy: only the runtime's final ADD below is kept.
					cp := *o.p
					err = o.p.node.add(&cp)
				case "RETRY":
					// The plugin's ADD alone, retried with the last
					// prevResult (its veth and addresses may be gone).
					_, err = o.p.node.chain.execEgress(o.p.pod, "ADD", last[o.p])
				default:
					err = o.p.node.del(o.p)
				}
				if err != nil {
					mu.Lock()
					stats[o.p].opErrs[o.kind]++
					if o.kind == "DEL" {
						stats[o.p].delErrs = append(stats[o.p].delErrs, err.Error())
					} else {
						stats[o.p].addErrs[o.kind+": "+errKind(err)]++
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		for _, p := range pods {
			st := stats[p]
			switch d := nstest.NFTDump(t, p.netns); d {
			case ref[p]:
				st.full++
			case pristine:
				st.empty++
			default:
				st.partial++
				t.Errorf("%s, %s: after the race the pod holds neither the complete ruleset nor none:\n%s", when, p.name, d)
			}
			n := 0
			for _, g := range p.node.gateways(t) {
				if g.ContainerID == p.id {
					n++
				}
			}
			st.entries[n]++
			// The runtime cleans up (DEL), then retries: ADD, and the
			// plugin's ADD twice more (a retry after a timeout).
			if err := p.node.del(p); err != nil {
				t.Errorf("%s, %s: cleanup DEL: %v", when, p.name, err)
			}
			clean(p, when+" after the cleanup DEL")
			if err := p.node.add(p); err != nil {
				t.Errorf("%s, %s: ADD after cleanup: %v", when, p.name, err)
				continue
			}
			for range 2 {
				if _, err := p.node.chain.execEgress(p.pod, "ADD", p.node.chain.cachedResult(p.pod)); err != nil {
					t.Errorf("%s, %s: retried ADD: %v", when, p.name, err)
				}
			}
			complete(p, when+" after ADD and two retried ADDs")
			last[p] = p.node.chain.cachedResult(p.pod)
			// Half the rounds start the next race from a running pod.
			if rng.IntN(2) == 0 {
				st.leftAdded++
				continue
			}
			if err := p.node.del(p); err != nil {
				t.Errorf("%s, %s: DEL: %v", when, p.name, err)
			}
			clean(p, when+" after DEL")
		}
		if t.Failed() {
			break
		}
	}
	raced := time.Since(raceStart)
	for _, p := range pods {
		if err := p.node.del(p); err != nil {
			t.Errorf("final DEL %s: %v", p.name, err)
		}
		clean(p, "after the final DEL")
		st := stats[p]
		for _, e := range st.delErrs {
			// DEL of ours must succeed however it races (CNI: DEL
			// is idempotent); the reference bridge plugin may not.
			if strings.Contains(e, `type="egress-cni"`) {
				t.Errorf("%s: a racing DEL failed in egress-cni: %s", p.name, e)
			} else {
				t.Logf("%s: a racing DEL failed (not in egress-cni): %s", p.name, e)
			}
		}
		for k, n := range st.addErrs {
			t.Logf("%s: racing ADDs failed %d× with: %s", p.name, n, k)
		}
		t.Logf("%s (%s): %d rounds; racing ops that failed: %v; after the race: complete %d, none %d, partial %d; "+
			"own gateway entries after the race (count: rounds) %v; rounds started from a running pod: %d",
			p.name, p.node.name, rounds, st.opErrs, st.full, st.empty, st.partial, st.entries, st.leftAdded)
	}
	t.Logf("%d rounds in %s (%s per round, both pods); whole test %s", rounds, raced.Round(time.Millisecond),
		(raced / rounds).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
}

// errKind shortens a racing ADD's error to the failing plugin and the
// gist of its message, without names that change per round.
func errKind(err error) string {
	m := err.Error()
	m = regexp.MustCompile(`veth[0-9a-f]{8}|[0-9a-f:.]*[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+[0-9/]*|/[^ "]*netns/[^ "]*|"[^"]*" (?:lost|is)`).ReplaceAllString(m, "…")
	if len(m) > 110 {
		m = m[:110] + "…"
	}
	return m
}

// loadPod is a pod of the load test: its namespace is made and removed
// as a runtime would, around ADD and DEL.
type loadPod struct {
	*clusterPod
	gateway bool
	once    sync.Once
}

func (lp *loadPod) closeNS() error {
	var err error
	lp.once.Do(func() {
		if lp.netns == nil {
			return
		}
		// As containerd removes a sandbox's namespace: a lazy unmount,
		// since a plugin process being forked for another pod at that
		// moment can briefly hold the namespace's file (EBUSY).
		err = errors.Join(lp.netns.Close(), unix.Unmount(lp.path, unix.MNT_DETACH), os.Remove(lp.path))
	})
	return err
}

func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, (len(s)*p)/100)]
}

// TestClusterNodeLoad is issue 7's node under load: 200 pods on one node
// through the real chain, added in bursts of 50 in parallel while the
// previous burst is deleted in parallel, while the node rules are
// re-applied in a loop (alternating two allow lists). Every tenth pod is
// a gateway, by annotation (the node's plugin config allows it in the
// pods' namespace). Before each burst's deletion, every live pod's CHECK
// must pass, the node's registrations are exactly the live pods (each on
// its own host veth) and the gateway sets hold exactly the live
// gateways; afterwards nothing is left: no pod rules (checked before
// each namespace goes), no veth, IP allocation, cache entry,
// registration or gateway entry, no namespace.
func TestClusterNodeLoad(t *testing.T) {
	const total, burst = 200, 50
	c, binDir, start, built := startCluster(t)
	const allow = `"podCIDRs": ["198.51.100.0/24", "2001:db8:1a::/64", "2001:db8:1b::/64", "2001:db8:1e::/64"],
	"nodeCIDRs": ["192.0.2.0/28", "2001:db8:a::/64", "2001:db8:b::/64", "2001:db8:e::/64"]`
	bulk := c.newNode(binDir, "bulk", "bulk0", 8, "198.51.100.128/25", "198.51.100.129", "2001:db8:1b::/64", "2001:db8:1b::1",
		`{"role": "egress", "uplink": "uplink", `+allow+`}`,
		`"gatewaySelector": {"allowedNamespaces": ["team-load"]}`)
	other, err := node.Parse([]byte(`{"role": "egress", "uplink": "uplink", "allow": ["203.0.113.99/32"], ` + allow + `}`))
	if err != nil {
		t.Fatal(err)
	}
	bulk.apply(t)
	warm := bulk.newClusterPod(t, "team-z", "warm", map[string]string{})
	bulk.mustAdd(t, warm)
	base := bulk.state(t)
	setupDone := time.Now()

	pods := make([]*loadPod, total)
	for i := range pods {
		ann := map[string]string{}
		if i%3 != 2 {
			ann["sidecar.istio.io/status"] = statusAnnotation
		}
		lp := &loadPod{clusterPod: &clusterPod{node: bulk, pod: &pod{namespace: "team-load",
			name: fmt.Sprintf("load-%03d", i), id: fmt.Sprintf("c-load-%03d", i), annotations: ann}}}
		if i%10 == 0 {
			ann["egress-cni.io/gateway"] = "true"
			lp.gateway = true
		}
		pods[i] = lp
	}
	t.Cleanup(func() {
		for _, lp := range pods {
			if lp.netns != nil {
				_ = bulk.del(lp.clusterPod)
			}
			_ = lp.closeNS()
		}
	})

	// The node rules are re-applied in a loop for the whole run.
	var applies, applyErrs atomic.Int64
	var applyErrMu sync.Mutex
	var firstApplyErr error
	stop := make(chan struct{})
	applierDone := make(chan struct{})
	go func() {
		defer close(applierDone)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			cfg := bulk.cfg
			if i%2 == 1 {
				cfg = other
			}
			if err := bulk.in(func() error { return node.Apply(cfg) }); err != nil {
				applyErrs.Add(1)
				applyErrMu.Lock()
				if firstApplyErr == nil {
					firstApplyErr = err
				}
				applyErrMu.Unlock()
			}
			applies.Add(1)
		}
	}()
	stopApplier := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-applierDone
	}
	t.Cleanup(stopApplier)

	var durMu sync.Mutex
	var addDur, delDur, checkDur []time.Duration
	addOne := func(lp *loadPod) error {
		t0 := time.Now()
		n, err := testutils.NewNS()
		if err != nil {
			return err
		}
		lp.netns, lp.path = n, n.Path()
		if err := bulk.add(lp.clusterPod); err != nil {
			return fmt.Errorf("ADD %s: %w", lp.name, err)
		}
		durMu.Lock()
		addDur = append(addDur, time.Since(t0))
		durMu.Unlock()
		return nil
	}
	delOne := func(lp *loadPod) error {
		t0 := time.Now()
		if err := bulk.del(lp.clusterPod); err != nil {
			return fmt.Errorf("DEL %s: %w", lp.name, err)
		}
		// What DEL must have removed, read before the runtime drops
		// the namespace.
		if ours, err := hasOurTable(lp.netns); err != nil || ours {
			return fmt.Errorf("after DEL %s: our table still there (%w)", lp.name, err)
		}
		if err := lp.closeNS(); err != nil {
			return fmt.Errorf("remove netns of %s: %w", lp.name, err)
		}
		durMu.Lock()
		delDur = append(delDur, time.Since(t0))
		durMu.Unlock()
		return nil
	}
	parallel := func(fn func(*loadPod) error, ps []*loadPod) []error {
		errs := make([]error, len(ps))
		var wg sync.WaitGroup
		for i, lp := range ps {
			wg.Add(1)
			go func() { defer wg.Done(); errs[i] = fn(lp) }()
		}
		wg.Wait()
		return errs
	}
	verify := func(live []*loadPod, stage string) {
		t.Helper()
		for i, err := range parallel(func(lp *loadPod) error {
			t0 := time.Now()
			err := bulk.chain.check(lp.pod)
			durMu.Lock()
			checkDur = append(checkDur, time.Since(t0))
			durMu.Unlock()
			return err
		}, live) {
			if err != nil {
				t.Errorf("%s: CHECK %s: %v", stage, live[i].name, err)
			}
		}
		for _, lp := range live {
			ours, err := hasOurTable(lp.netns)
			if err != nil || ours != (lp.annotations["sidecar.istio.io/status"] != "") {
				t.Errorf("%s: %s: our table present %v (%v)", stage, lp.name, ours, err)
			}
		}
		wantRegs := []string{warm.id + " " + bulk.hostVeth(t, warm)}
		for _, lp := range live {
			wantRegs = append(wantRegs, lp.id+" "+bulk.hostVeth(t, lp.clusterPod))
		}
		var gotRegs []string
		for _, r := range bulk.pods(t) {
			gotRegs = append(gotRegs, r.ContainerID+" "+r.Port)
		}
		slices.Sort(wantRegs)
		slices.Sort(gotRegs)
		if !slices.Equal(gotRegs, wantRegs) {
			t.Errorf("%s: registrations (container port) %v, want %v", stage, gotRegs, wantRegs)
		}
		var want []string
		for _, lp := range live {
			if lp.gateway {
				want = append(want, lp.id+" "+lp.ip4.String(), lp.id+" "+lp.ip6.String())
			}
		}
		var got []string
		for _, g := range bulk.gateways(t) {
			got = append(got, g.ContainerID+" "+g.IP.String())
		}
		slices.Sort(want)
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("%s: gateway entries %v, want %v", stage, got, want)
		}
	}

	type stageTime struct {
		name string
		d    time.Duration
	}
	var stages []stageTime
	var prev []*loadPod
	for b := 0; b <= total/burst; b++ {
		var cur []*loadPod
		if b < total/burst {
			cur = pods[b*burst : (b+1)*burst]
		}
		t0 := time.Now()
		var addErrs, delErrs []error
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); addErrs = parallel(addOne, cur) }()
		go func() { defer wg.Done(); delErrs = parallel(delOne, prev) }()
		wg.Wait()
		name := fmt.Sprintf("add burst %d (%d pods) + delete burst %d (%d pods)", b+1, len(cur), b, len(prev))
		stages = append(stages, stageTime{name, time.Since(t0)})
		for _, err := range append(addErrs, delErrs...) {
			if err != nil {
				t.Error(err)
			}
		}
		if t.Failed() {
			break
		}
		if len(cur) > 0 {
			t0 = time.Now()
			verify(cur, fmt.Sprintf("burst %d", b+1))
			stages = append(stages, stageTime{fmt.Sprintf("CHECK burst %d (%d pods)", b+1, len(cur)), time.Since(t0)})
		}
		prev = cur
	}
	stopApplier()
	loadTime := time.Since(setupDone)
	if n := applyErrs.Load(); n > 0 {
		t.Errorf("%d of %d node rule applies failed under load; first: %v", n, applies.Load(), firstApplyErr)
	}

	// Nothing left: the node is as it was with only the warm pod.
	bulk.apply(t)
	if err := bulk.in(func() error { return node.Check(bulk.cfg) }); err != nil {
		t.Errorf("node rules after the load: %v", err)
	}
	if d := bulk.state(t).diff(base); len(d) > 0 {
		t.Errorf("leaked on the node after 200 pods: %v", d)
	}
	if gws := bulk.gateways(t); len(gws) != 0 {
		t.Errorf("gateway entries left: %v", gws)
	}
	if regs := bulk.pods(t); len(regs) != 1 || regs[0].ContainerID != warm.id {
		t.Errorf("registrations left: %v, want only the warm pod's", regs)
	}
	for _, lp := range pods {
		if lp.path == "" {
			continue
		}
		if _, err := os.Stat(lp.path); err == nil {
			t.Errorf("namespace of %s left at %s", lp.name, lp.path)
		}
	}
	gateways, captured := 0, 0
	for _, lp := range pods {
		if lp.gateway {
			gateways++
		}
		if lp.annotations["sidecar.istio.io/status"] != "" {
			captured++
		}
	}
	var b strings.Builder
	for _, s := range stages {
		fmt.Fprintf(&b, "  %-50s %s\n", s.name, s.d.Round(time.Millisecond))
	}
	t.Logf("node under load: %d pods (%d gateways, %d captured), bursts of %d; %d node rule applies during the run (%d failed)\n%s"+
		"  ADD (netns + loopback + chain)  p50 %s  p99 %s  max %s\n"+
		"  CHECK                          p50 %s  p99 %s\n"+
		"  DEL (chain + loopback + netns)  p50 %s  p99 %s  max %s\n"+
		"  load phase %s; plugins built in %s; whole test %s",
		total, gateways, captured, burst, applies.Load(), applyErrs.Load(), b.String(),
		pct(addDur, 50).Round(time.Millisecond), pct(addDur, 99).Round(time.Millisecond), pct(addDur, 100).Round(time.Millisecond),
		pct(checkDur, 50).Round(time.Millisecond), pct(checkDur, 99).Round(time.Millisecond),
		pct(delDur, 50).Round(time.Millisecond), pct(delDur, 99).Round(time.Millisecond), pct(delDur, 100).Round(time.Millisecond),
		loadTime.Round(time.Millisecond), built.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	if err := bulk.del(warm); err != nil {
		t.Errorf("DEL warm: %v", err)
	}
}
