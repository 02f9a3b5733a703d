//go:build linux

package netns_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// bypassRow is one line of the bypass table the test logs.
type bypassRow struct{ path, expected, seen string }

// probe is one connection attempt and what it observed.
type probe struct {
	replied bool
	reply   nstest.Reply
	err     error
	drops   uint64 // rise of the source node's drop counter
	seen    uint64 // rise of packets reaching the internet's echo port
}

func (p probe) String() string {
	var b strings.Builder
	switch {
	case p.replied && p.reply.Src.IsValid():
		fmt.Fprintf(&b, "reply, source seen %s", p.reply.Src.Addr())
	case p.replied:
		b.WriteString("reply")
	default:
		kind := "error"
		if de, ok := errors.AsType[*nstest.DialError](p.err); ok {
			kind = de.Kind
		} else if errors.Is(p.err, unix.EAGAIN) {
			kind = "timeout"
		}
		fmt.Fprintf(&b, "no reply (%s)", kind)
	}
	fmt.Fprintf(&b, "; node drops +%d; internet got %d pkt", p.drops, p.seen)
	return b.String()
}

// TestCluster is issue 4's simulated cluster: pods made by the real CNI
// chain (bridge, host-local, egress-cni with nodeEnforcement) on an app
// node and an egress node behind a router, and an internet host. It first
// shows that without node rules every bypass reaches the internet, then
// applies the node rules and tries each bypass again.
func TestCluster(t *testing.T) {
	c, _, start, built := startCluster(t)
	var table []bypassRow
	t.Cleanup(func() {
		var b strings.Builder
		w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(w, "path\texpected\tseen")
		for _, r := range table {
			fmt.Fprintf(w, "%s\t%s\t%s\n", r.path, r.expected, r.seen)
		}
		w.Flush()
		t.Logf("bypass table:\n%s", b.String())
	})
	inet4 := net.JoinHostPort(inetIPv4.String(), strconv.Itoa(inetEchoPort))
	inet6 := net.JoinHostPort(inetIPv6.String(), strconv.Itoa(inetEchoPort))

	// blocked counts what a node's rules dropped: at the exit and, for
	// a forged source, before conntrack.
	blocked := func(n *clusterNode) uint64 {
		var k node.Counters
		if err := n.in(func() error { var err error; k, err = node.ReadCounters(); return err }); err != nil {
			return 0 // rules not applied
		}
		return k.Dropped + k.Forged
	}
	run := func(from *clusterPod, uid uint32, network, addr string, timeout time.Duration, opts ...nstest.DialOption) probe {
		t.Helper()
		d0, s0 := blocked(from.node), c.inetSeen(t)
		line, err := nstest.Dial(t, from.netns, uid, uid, network, addr, append(opts, nstest.WithTimeout(timeout))...)
		p := probe{err: err}
		if err == nil {
			p.replied = true
			if p.reply, err = nstest.ParseReply(line); err != nil {
				t.Fatalf("bad reply %q: %v", line, err)
			}
		}
		p.drops, p.seen = blocked(from.node)-d0, c.inetSeen(t)-s0
		return p
	}
	// expectReply: the connection works and the far end saw src (if
	// valid).
	expectReply := func(path string, src netip.Addr, from *clusterPod, uid uint32, network, addr string, opts ...nstest.DialOption) {
		t.Helper()
		p := run(from, uid, network, addr, 2*time.Second, opts...)
		want := "reply"
		if src.IsValid() {
			want += " from " + src.String()
		}
		table = append(table, bypassRow{path, want, p.String()})
		if !p.replied || (src.IsValid() && p.reply.Src.Addr() != src) || p.drops != 0 {
			t.Errorf("%s: want %s and no drop, got %s (err %v)", path, want, p, p.err)
		}
	}
	// ping: an ICMP echo from the pod (as root: raw socket).
	ping := func(from *clusterPod, dst netip.Addr, timeout time.Duration) probe {
		t.Helper()
		d0, s0 := blocked(from.node), c.inetSeen(t)
		err := pingIn(from.netns, dst, timeout)
		p := probe{err: err, replied: err == nil}
		p.drops, p.seen = blocked(from.node)-d0, c.inetSeen(t)-s0
		return p
	}
	// expectDropped: no reply, the source node counted a drop, and
	// nothing reached the internet.
	expectDropped := func(path string, from *clusterPod, uid uint32, network, addr string, opts ...nstest.DialOption) {
		t.Helper()
		p := run(from, uid, network, addr, time.Second, opts...)
		table = append(table, bypassRow{path, "dropped on its node, counted", p.String()})
		if p.replied || p.drops == 0 || p.seen != 0 {
			t.Errorf("%s: want dropped and counted on node %s, got %s (err %v)", path, from.node.name, p, p.err)
		}
	}

	// Pods. The app pod is injected (captured by its pod rules) and lets
	// its sidecar reach the gateway's forwarder port uncaptured; "plain"
	// is in a namespace without injection.
	app := c.app.newClusterPod(t, "team-a", "app", map[string]string{
		"sidecar.istio.io/status":                       statusAnnotation,
		"traffic.sidecar.istio.io/excludeOutboundPorts": strconv.Itoa(gatewayForwardPort),
	})
	plain := c.app.newClusterPod(t, "team-b", "plain", map[string]string{})
	worker := c.egress.newClusterPod(t, "team-c", "worker", map[string]string{})
	gw := c.egress.newClusterPod(t, "istio-system", "istio-egressgateway-5d8f9-abcde", map[string]string{})
	// No pod starts on a node without its rules: fail, clearly (code 11).
	err := c.app.add(plain)
	if err == nil {
		t.Fatal("pod ADD succeeded without node rules")
	}
	if te := cniError(t, err); te.Code != types.ErrTryAgainLater || !strings.Contains(te.Msg, "egress-node apply") {
		t.Errorf("pod ADD without node rules: code %d %q, want code 11 naming egress-node apply", te.Code, te.Msg)
	}
	if err := c.app.del(plain); err != nil {
		t.Fatalf("DEL after failed ADD: %v", err)
	}

	// Node rules: apply twice, nothing changes; Check passes.
	before := map[*clusterNode]string{}
	for _, n := range []*clusterNode{c.app, c.egress} {
		before[n] = nstest.NFTDump(t, n.ns)
		n.apply(t)
		first := nstest.NFTDump(t, n.ns)
		n.apply(t)
		if second := nstest.NFTDump(t, n.ns); second != first {
			t.Errorf("%s: second apply changed the ruleset:\n--- first\n%s\n--- second\n%s", n.name, first, second)
		}
		if err := n.in(func() error { return node.Check(n.cfg) }); err != nil {
			t.Errorf("%s: check after apply: %v", n.name, err)
		}
	}
	for _, p := range []*clusterPod{app, plain} {
		c.app.mustAdd(t, p)
	}
	c.egress.mustAdd(t, worker)
	nstest.ServeEcho(t, worker.netns, ":8080")
	workerAddr := net.JoinHostPort(worker.ip4.String(), "8080")
	workerAddr6 := net.JoinHostPort(worker.ip6.String(), "8080")

	// A flushed table fails closed: its chains' policy is drop, so
	// nothing is forwarded at all, not even cluster traffic.
	nstest.MustExec(t, c.app.ns, "nft", "flush table inet "+node.Table+"; flush table bridge "+node.Table)
	if p := run(plain, cniAppUID, "tcp4", inet4, time.Second); p.replied || p.seen != 0 {
		t.Errorf("flushed node rules: a pod reached the internet: %s", p)
	} else {
		table = append(table, bypassRow{"node rules flushed (nft flush table): app node pod -> internet tcp4", "nothing forwarded", p.String()})
	}
	c.app.apply(t)
	// So does a flushed drop chain: every drop is a goto to its reason's
	// chain, and a goto'd chain that ends returns to the base chain's
	// policy, drop.
	var flush []string
	dump := nstest.NFTDump(t, c.app.ns)
	for _, r := range node.Reasons() {
		if !strings.Contains(dump, "chain "+node.AuditChain(r)) {
			t.Fatalf("no chain %s", node.AuditChain(r))
		}
		for _, fam := range []string{"inet", "bridge"} {
			flush = append(flush, fmt.Sprintf("flush chain %s %s %s", fam, node.Table, node.AuditChain(r)))
		}
	}
	// Not every reason has a chain in both tables: flush what exists.
	flushed := 0
	for _, cmd := range flush {
		if _, err := nstest.Exec(c.app.ns, "nft", cmd); err == nil {
			flushed++
		}
	}
	if flushed < len(node.Reasons()) {
		t.Fatalf("flushed %d drop chains, want at least %d", flushed, len(node.Reasons()))
	}
	if p := run(plain, cniAppUID, "tcp4", inet4, time.Second); p.replied || p.seen != 0 {
		t.Errorf("flushed drop chains: a pod reached the internet: %s", p)
	} else {
		table = append(table, bypassRow{"drop chains flushed: app node pod -> internet tcp4", "dropped by the policy", p.String()})
	}
	c.app.apply(t)

	// Without our rules (chains deleted; the sets and registrations
	// stay) every bypass reaches the internet: the test can fail.
	for _, n := range []*clusterNode{c.app, c.egress} {
		nstest.DeleteChains(t, n.ns, "inet", node.Table)
		nstest.DeleteChains(t, n.ns, "bridge", node.Table)
	}
	expectReply("no node rules: app node pod -> internet tcp4 (UID 1000)", plain.ip4, plain, cniAppUID, "tcp4", inet4)
	expectReply("no node rules: captured pod as UID 1337 -> internet tcp4", app.ip4, app, cniProxyUID, "tcp4", inet4)
	expectReply("no node rules: captured pod -> internet udp4", app.ip4, app, cniAppUID, "udp4", inet4)
	expectReply("no node rules: app node pod -> internet tcp6", plain.ip6, plain, cniAppUID, "tcp6", inet6)
	expectReply("no node rules: egress node ordinary pod -> internet tcp4", worker.ip4, worker, cniAppUID, "tcp4", inet4)
	for _, dst := range []netip.Addr{inetIPv4, inetIPv6} {
		path := "no node rules: app node pod -> internet ICMP echo " + dst.String()
		p := ping(plain, dst, 2*time.Second)
		table = append(table, bypassRow{path, "reply", p.String()})
		if !p.replied || p.seen == 0 {
			t.Errorf("%s: %s (err %v)", path, p, p.err)
		}
	}
	if p := run(worker, 0, "udp4", inet4, time.Second, nstest.WithSource("198.51.100.100")); p.seen == 0 {
		t.Errorf("no node rules: a spoofed datagram did not reach the internet: %s", p)
	} else {
		table = append(table, bypassRow{"no node rules: spoofed source udp4 (UID 0)", "reaches the internet", p.String()})
	}
	for _, n := range []*clusterNode{c.app, c.egress} {
		n.apply(t)
	}

	// The gateway starts; its entries bind its addresses to its own veth.
	c.egress.mustAdd(t, gw)
	veth := c.egress.hostVeth(t, gw)
	gws := c.egress.gateways(t)
	if len(gws) != 2 {
		t.Fatalf("gateway entries after ADD: %v, want its IPv4 and IPv6 on cni0", gws)
	}
	for _, g := range gws {
		if g.Iface != "cni0" || g.ContainerID != gw.id || (g.IP != gw.ip4 && g.IP != gw.ip6) {
			t.Errorf("gateway entry %v, want cni0 . %s|%s (container %s)", g, gw.ip4, gw.ip6, gw.id)
		}
	}
	// Its sources are bound to its own veth.
	var reg []node.Pod
	if err := c.egress.in(func() error { var err error; reg, err = node.ListPods(); return err }); err != nil {
		t.Fatal(err)
	}
	if i := slices.IndexFunc(reg, func(p node.Pod) bool { return p.ContainerID == gw.id }); i < 0 || reg[i].Port != veth || reg[i].L3 != "cni0" || !reg[i].Gateway {
		t.Errorf("gateway registration %v, want port %s via cni0, gateway", reg, veth)
	}
	// The plugin found the veth from the pod's eth0 (IFLA_LINK), not
	// from prevResult.
	var how []any
	for _, r := range c.egress.chain.logRecords(gw.pod) {
		if r["msg"] == "registered with the node rules" {
			how = append(how, r["found"])
		}
	}
	if len(how) != 1 || how[0] != "veth peer" {
		t.Errorf("gateway log records say the interface came from %v, want one \"veth peer\"", how)
	}
	if d := nstest.NFTDump(t, c.egress.ns); !strings.Contains(d, veth) {
		t.Errorf("gateway veth %s not in the egress node's sets:\n%s", veth, d)
	}
	// A second ADD of the gateway (runtime retry) is harmless.
	if _, err := c.egress.chain.execEgress(gw.pod, "ADD", c.egress.chain.cachedResult(gw.pod)); err != nil {
		t.Errorf("second gateway ADD: %v", err)
	}
	if got := c.egress.gateways(t); len(got) != 2 {
		t.Errorf("gateway entries after a second ADD: %v", got)
	}
	// CHECK verifies the gateway's registration; a lost one is reported
	// and ADD restores it.
	if err := c.egress.chain.check(gw.pod); err != nil {
		t.Errorf("CHECK of the gateway: %v", err)
	}
	if err := c.egress.in(func() error {
		_, err := node.UnregisterPods(func(id string) bool { return id == gw.id })
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := c.egress.chain.check(gw.pod); err == nil || !strings.Contains(err.Error(), "not registered") {
		t.Errorf("CHECK of a gateway that lost its registration: %v, want an error saying so", err)
	}
	if _, err := c.egress.chain.execEgress(gw.pod, "ADD", c.egress.chain.cachedResult(gw.pod)); err != nil {
		t.Errorf("repairing ADD: %v", err)
	}
	if err := c.egress.chain.check(gw.pod); err != nil {
		t.Errorf("CHECK after the repairing ADD: %v", err)
	}
	serveForwarder(t, gw, "tcp4")
	serveSidecar(t, app, "tcp4", "0.0.0.0:15001", netip.AddrPortFrom(gw.ip4, uint16(gatewayForwardPort)), nil)

	// Bypasses from the app node.
	expectDropped("app node pod -> internet tcp4 (UID 1000, no sidecar)", plain, cniAppUID, "tcp4", inet4)
	expectDropped("captured pod as UID 1337 -> internet tcp4", app, cniProxyUID, "tcp4", inet4)
	expectDropped("captured pod -> internet udp4 (QUIC-like)", app, cniAppUID, "udp4", inet4)
	expectDropped("app node pod -> internet tcp6", plain, cniAppUID, "tcp6", inet6)
	expectDropped("captured pod as UID 1337 -> internet tcp6", app, cniProxyUID, "tcp6", inet6)
	for _, dst := range []netip.Addr{inetIPv4, inetIPv6} {
		path := "app node pod -> internet ICMP echo " + dst.String()
		p := ping(plain, dst, time.Second)
		table = append(table, bypassRow{path, "dropped on its node, counted", p.String()})
		if p.replied || p.drops == 0 || p.seen != 0 {
			t.Errorf("%s: want dropped and counted, got %s (err %v)", path, p, p.err)
		}
	}
	// In-cluster traffic is allowed.
	expectReply("app node pod -> pod on egress node tcp4", plain.ip4, plain, cniAppUID, "tcp4", workerAddr)
	expectReply("app node pod -> pod on egress node tcp6", plain.ip6, plain, cniAppUID, "tcp6", workerAddr6)
	expectReply("captured pod as UID 1337 -> pod on egress node", app.ip4, app, cniProxyUID, "tcp4", workerAddr)
	// The gateway reaches the internet, masqueraded to the uplink.
	expectReply("gateway pod -> internet tcp4", c.egress.uplink4, gw, cniAppUID, "tcp4", inet4)
	expectReply("gateway pod -> internet udp4", c.egress.uplink4, gw, cniAppUID, "udp4", inet4)
	expectReply("gateway pod -> internet tcp6", c.egress.uplink6, gw, cniAppUID, "tcp6", inet6)
	// The gateway gets out because its connection's first packet got our
	// conntrack label. Without the conn chain's rules it is dropped at
	// the exit; re-applying restores them and keeps the registrations.
	nstest.MustExec(t, c.egress.ns, "nft", "flush", "chain", "inet", node.Table, node.ChainConn)
	expectDropped("gateway pod -> internet tcp4, conn label rules flushed", gw, cniAppUID, "tcp4", inet4)
	c.egress.apply(t)
	expectReply("gateway pod -> internet tcp4, after re-apply", c.egress.uplink4, gw, cniAppUID, "tcp4", inet4)
	// The full path: app -> its sidecar (REDIRECT) -> gateway -> internet.
	expectReply("captured pod -> sidecar -> gateway -> internet", c.egress.uplink4, app, cniAppUID, "tcp4", inet4)
	// Bypasses on the egress node.
	expectDropped("egress node ordinary pod -> internet tcp4", worker, cniAppUID, "tcp4", inet4)
	expectDropped("egress node ordinary pod -> internet udp4", worker, cniAppUID, "udp4", inet4)
	expectDropped("egress node pod spoofing the gateway's IPv4 (UID 0) udp4", worker, 0, "udp4", inet4, nstest.WithSource(gw.ip4.String()))
	expectDropped("egress node pod spoofing the gateway's IPv4 (UID 0) tcp4", worker, 0, "tcp4", inet4, nstest.WithSource(gw.ip4.String()))
	expectDropped("egress node pod spoofing the gateway's IPv6 (UID 0) udp6", worker, 0, "udp6", inet6, nstest.WithSource(gw.ip6.String()))

	// The gateway goes away; DEL drops its entries even without a netns.
	if err := c.egress.chain.del(gw.pod, ""); err != nil {
		t.Fatalf("gateway DEL without netns: %v", err)
	}
	if got := c.egress.gateways(t); len(got) != 0 {
		t.Fatalf("gateway entries after DEL: %v", got)
	}
	if err := c.egress.del(gw); err != nil {
		t.Fatalf("gateway DEL again: %v", err)
	}
	// A DEL that never came leaves an entry behind; an ordinary pod given
	// the same address removes it on ADD and is dropped.
	stale := node.Pod{ContainerID: gw.id, Port: veth, L3: "cni0", IPs: []netip.Addr{gw.ip4}, Gateway: true}
	if err := c.egress.in(func() error { _, err := node.RegisterPod(stale); return err }); err != nil {
		t.Fatal(err)
	}
	reuse := c.egress.newClusterPod(t, "team-c", "reuse", map[string]string{})
	c.egress.mustAdd(t, reuse, [2]string{"IP", gw.ip4.String()})
	if reuse.ip4 != gw.ip4 {
		t.Fatalf("reuse pod got %s, want the gateway's %s", reuse.ip4, gw.ip4)
	}
	if got := c.egress.gateways(t); len(got) != 0 {
		t.Errorf("stale gateway entry survived an ordinary pod's ADD of the same IP: %v", got)
	}
	expectDropped("new ordinary pod with the departed gateway's IP -> internet tcp4", reuse, cniAppUID, "tcp4", inet4)

	// GC drops registrations of containers that are not valid
	// attachments.
	ghost := node.Pod{ContainerID: "c-ghost", Port: "vethghost", L3: "cni0", IPs: []netip.Addr{netip.MustParseAddr("198.51.100.99")}, Gateway: true}
	if err := c.egress.in(func() error { _, err := node.RegisterPod(ghost); return err }); err != nil {
		t.Fatal(err)
	}
	err = c.egress.in(func() error {
		return c.egress.chain.cni.GCNetworkList(t.Context(), c.egress.chain.list, &libcni.GCArgs{
			ValidAttachments: []types.GCAttachment{{ContainerID: worker.id, IfName: "eth0"}, {ContainerID: reuse.id, IfName: "eth0"}},
		})
	})
	if err != nil {
		t.Errorf("GC: %v", err)
	}
	if got := c.egress.gateways(t); len(got) != 0 {
		t.Errorf("gateway entries after GC: %v, want none", got)
	}
	if err := c.egress.in(func() error { var err error; reg, err = node.ListPods(); return err }); err != nil {
		t.Fatal(err)
	}
	if len(reg) != 2 || !slices.ContainsFunc(reg, func(p node.Pod) bool { return p.ContainerID == worker.id }) ||
		!slices.ContainsFunc(reg, func(p node.Pod) bool { return p.ContainerID == reuse.id }) {
		t.Errorf("registrations after GC: %v, want worker's and reuse's", reg)
	}

	// Removing the node rules leaves each node as it was.
	for _, n := range []*clusterNode{c.app, c.egress} {
		if err := n.in(node.Remove); err != nil {
			t.Fatalf("%s: remove: %v", n.name, err)
		}
		if got := nstest.NFTDump(t, n.ns); got != before[n] {
			t.Errorf("%s: remove did not restore the ruleset:\n--- before\n%s\n--- after\n%s", n.name, before[n], got)
		}
	}
	delPods(t, app, plain, worker, reuse)
	t.Logf("plugins built in %s; cluster test ran in %s", built.Round(time.Millisecond), (time.Since(start) - built).Round(time.Millisecond))
}
