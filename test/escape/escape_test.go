//go:build linux

package escape_test

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/internal/sim"
	"github.com/egress-cni/egress-cni/pkg/node"
)

var topologies = []struct {
	name string
	opts sim.Options
}{
	{"bridged-cbr0", sim.Options{Topology: sim.Bridged, Bridge: "cbr0"}},
	{"routed-ptp", sim.Options{Topology: sim.Routed}},
}

// TestEscape builds one cluster per topology; on each, the legitimate
// paths must work with the node rules in place, and no row of the escape
// matrix may reach the internet while every row's control (the same
// attempt with the node rules removed) does.
func TestEscape(t *testing.T) {
	nstest.RequirePrivileged(t)
	start := time.Now()
	for _, tp := range topologies {
		t.Run(tp.name, func(t *testing.T) {
			w := newWorld(t, tp.opts)
			t.Run("legit", w.legit)
			t.Run("explain", w.explainPaths)
			t.Run("matrix", w.matrix)
		})
	}
	t.Logf("binaries built in %s; whole run %s", buildTook.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
}

func sortedKeys(m map[string]uint64) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func ap(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

// legit: the paths that must keep working with the node rules in place,
// each its own subtest, checked by who the far end saw.
func (w *world) legit(t *testing.T) {
	c := w.c
	type path struct {
		name    string
		from    *sim.Pod // nil: the internet host
		network string
		dst     netip.AddrPort
		// want is the source the far end must see; invalid: any answer.
		want netip.Addr
	}
	paths := []path{
		{"gateway to internet tcp4", w.gw, "tcp4", ap(inet4, echoPort), c.Egress.Uplink4},
		{"gateway to internet tcp6", w.gw, "tcp6", ap(inet6, echoPort), c.Egress.Uplink6},
		{"gateway to internet udp4", w.gw, "udp4", ap(inet4, echoPort), c.Egress.Uplink4},
		{"gateway to internet udp6", w.gw, "udp6", ap(inet6, echoPort), c.Egress.Uplink6},
		{"pod to pod same node tcp4", w.app, "tcp4", ap(w.web.IP4, echoPort), w.app.IP4},
		{"pod to pod same node tcp6", w.app, "tcp6", ap(w.web.IP6, echoPort), w.app.IP6},
		{"pod to pod across nodes (overlay) tcp4", w.app, "tcp4", ap(w.worker.IP4, echoPort), w.app.IP4},
		{"pod to pod across nodes (overlay) tcp6", w.app, "tcp6", ap(w.worker.IP6, echoPort), w.app.IP6},
		{"pod to pod across nodes (overlay) udp4", w.worker, "udp4", ap(w.web.IP4, echoPort), w.worker.IP4},
		{"pod to ClusterIP to pod tcp4", w.app, "tcp4", ap(webIP4, webPort), w.app.IP4},
		{"pod to ClusterIP to pod tcp6", w.app, "tcp6", ap(webIP6, webPort), w.app.IP6},
		{"pod on the egress node to ClusterIP to pod across nodes tcp4", w.worker, "tcp4", ap(webIP4, webPort), w.worker.IP4},
		{"pod to NodePort on the other node to a pod tcp4", w.app, "tcp4", ap(c.Egress.Uplink4, webNodePort), netip.Addr{}},
		{"pod to NodePort on its own node to a pod on the other node tcp4", w.app, "tcp4", ap(c.App.Uplink4, peerNodePort), netip.Addr{}},
		{"DNS udp/53 to cluster DNS via ClusterIP (across nodes) udp4", w.app, "udp4", ap(dnsIP4, dnsPort), w.app.IP4},
		{"DNS udp/53 to cluster DNS via ClusterIP (across nodes) udp6", w.app, "udp6", ap(dnsIP6, dnsPort), w.app.IP6},
		{"DNS tcp/53 to cluster DNS via ClusterIP tcp4", w.app, "tcp4", ap(dnsIP4, dnsPort), w.app.IP4},
		// NodePorts on app nodes (an egress node does not pass replies of
		// connections the outside opened: ingressReplies, and the matrix's
		// "ingress" rows).
		{"NodePort from the internet (app node) to a pod on it tcp4", nil, "tcp4", ap(c.App.Uplink4, webNodePort), netip.Addr{}},
		{"NodePort from the internet (app node) to a pod on it tcp6", nil, "tcp6", ap(c.App.Uplink6, webNodePort), netip.Addr{}},
		{"NodePort from the internet (app node) to a pod on the egress node (overlay) tcp4", nil, "tcp4", ap(c.App.Uplink4, peerNodePort), netip.Addr{}},
		{"NodePort from the internet (app node) to a pod on the egress node (overlay) udp6", nil, "udp6", ap(c.App.Uplink6, peerNodePort), netip.Addr{}},
		{"hostPort from the internet to a pod tcp4 (no masquerade: replies go out as replies)", nil, "tcp4", ap(c.App.Uplink4, webHostPort), inet4},
		{"hostPort from the internet to a pod tcp6", nil, "tcp6", ap(c.App.Uplink6, webHostPort), inet6},
		{"reply to an ingress connection from the internet tcp4", nil, "tcp4", ap(w.web.IP4, echoPort), inet4},
		{"reply to an ingress connection from the internet tcp6", nil, "tcp6", ap(w.web.IP6, echoPort), inet6},
		{"reply to an ingress datagram from the internet udp4", nil, "udp4", ap(w.web.IP4, echoPort), inet4},
		{"reply to an ingress datagram from the internet udp6", nil, "udp6", ap(w.web.IP6, echoPort), inet6},
	}
	t.Run("IPv6 neighbour unreachability detection (unicast NS from the pod's link-local address to its gateway)", w.nud)
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			from, who := c.Internet, "the internet host"
			uid := uint32(0)
			if p.from != nil {
				from, who, uid = p.from.NS, p.from.Namespace+"/"+p.from.Name, appUID
			}
			r, err := sim.Dial(w.ctx(), w.exe, from, uid, p.network, p.dst.String(), "", 2*time.Second)
			if err != nil {
				t.Fatalf("%s -> %s %s: %v", who, p.network, p.dst, err)
			}
			if p.want.IsValid() && r.Src != p.want {
				t.Fatalf("%s -> %s %s: the far end saw %s, want %s (%q)", who, p.network, p.dst, r.Src, p.want, r.Lines)
			}
			t.Logf("%s -> %s %s: far end saw %s", who, p.network, p.dst, r.Src)
		})
	}
}

// attempt is one try of a row, in one phase.
type attempt struct {
	w       *world
	control bool
	token   []byte
	lport   uint16
	// note is extra evidence the row adds (what a server recorded).
	note []string
}

func (a *attempt) timeout() time.Duration {
	if a.control {
		return time.Second
	}
	return blockedWait
}

// row is one escape path.
type row struct {
	class, path string
	from        *sim.Pod
	// who names the sender when from is nil (the internet host).
	who string
	// match, if set, replaces attempt.matches.
	match func(a *attempt, p sim.Packet) bool
	// only, if set, limits the row to one topology.
	only *sim.Topology
	// run makes the attempt and describes what the client saw.
	run func(a *attempt) (string, error)
}

func (r row) sender() string {
	if r.from == nil {
		return r.who
	}
	return r.from.Node.Name + "/" + r.from.Name
}

// result is what one attempt observed.
type result struct {
	seen     []sim.Captured
	counters string
	client   string
	note     string
	err      error
}

func (r result) internet() string {
	if len(r.seen) == 0 {
		return "nothing"
	}
	srcs := map[string]int{}
	var order []string
	for _, c := range r.seen {
		s := c.Src.Addr().String()
		if srcs[s] == 0 {
			order = append(order, s)
		}
		srcs[s]++
	}
	var parts []string
	for _, s := range order {
		parts = append(parts, fmt.Sprintf("%d from %s", srcs[s], s))
	}
	return strings.Join(parts, ", ")
}

// matches says whether a packet that arrived at the internet host
// belongs to the attempt: it carries the attempt's token (anywhere in
// its payload, an ICMP error's quote included) or, for TCP, comes from
// the attempt's source port (a SYN carries no data).
func (a *attempt) matches(p sim.Packet) bool {
	if sim.IsNoise(p) {
		return false
	}
	if strings.Contains(string(p.Payload), string(a.token)) {
		return true
	}
	return a.lport != 0 && p.Proto == 6 && p.Src.Port() == a.lport
}

func (w *world) try(r row, i int, control bool) result {
	phase := "rules"
	if control {
		phase = "control"
	}
	a := &attempt{w: w, control: control,
		token: fmt.Appendf(nil, "escape-%s-%s-row%02d", w.topo.Topology, phase, i+1),
		lport: uint16(41000 + i), // a port per row and phase
	}
	if control {
		a.lport += 1000
	}
	c0 := w.counters()
	mark := w.rec.Mark()
	var res result
	res.client, res.err = r.run(a)
	wait := attemptGrace
	if control {
		wait = 2 * time.Second // returns at the first match
	}
	match := a.matches
	if r.match != nil {
		match = func(p sim.Packet) bool { return !sim.IsNoise(p) && r.match(a, p) }
	}
	res.seen = w.rec.Wait(mark, match, wait)
	c1 := w.counters()
	res.counters = counterDelta(c0, c1)
	if !control {
		w.checkReasonCounters(r, c0, c1)
	}
	res.note = strings.Join(a.note, "; ")
	return res
}

// checkReasonCounters: every drop of the attempt went through a drop
// chain, so per node and table the reason counters (drop_<reason>_<family>)
// rose by as much as dropped and forged together.
func (w *world) checkReasonCounters(r row, before, after map[string]uint64) {
	w.t.Helper()
	sums := map[string][2]uint64{} // "node table" -> {reasons, dropped+forged}
	for k, v := range after {
		f := strings.Fields(k) // node table counter
		if len(f) != 3 {
			continue
		}
		d := v - before[k]
		s := sums[f[0]+" "+f[1]]
		switch {
		case strings.HasPrefix(f[2], "drop_"):
			s[0] += d
		case f[2] == node.CounterDropped || f[2] == node.CounterForged:
			s[1] += d
		}
		sums[f[0]+" "+f[1]] = s
	}
	for k, s := range sums {
		if s[0] != s[1] {
			w.t.Errorf("%s (from %s): %s reason counters rose by %d, dropped and forged by %d", r.path, r.sender(), k, s[0], s[1])
		}
	}
}

// clientOutcome describes a probe's result.
func clientOutcome(reply []byte, err error) (string, error) {
	var de *sim.DialError
	switch {
	case err == nil:
		return "reply " + strings.TrimSpace(string(reply)), nil
	case errors.As(err, &de):
		return "no reply (" + de.Kind + ")", nil
	}
	return "", err
}

func (w *world) matrix(t *testing.T) {
	rows := w.rows()
	var kept []row
	for _, r := range rows {
		if r.only == nil || *r.only == w.topo.Topology {
			kept = append(kept, r)
		}
	}
	rows = kept
	res := make([][2]result, len(rows))
	done := [2]int{}
	start := time.Now()
	defer func() {
		var b strings.Builder
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "#\tclass\tpath (from)\twith node rules: internet saw\tnode counters\tclient\tcontrol (rules removed): internet saw\tcontrol client\tverdict")
		for i, r := range rows {
			if i >= done[0] {
				break
			}
			on, off := res[i][0], res[i][1]
			verdict, offSeen, offClient := "-", "(not run)", ""
			if i < done[1] {
				offSeen, offClient = off.internet(), off.client
				verdict = rowVerdict(on, off)
			}
			client := on.client
			if on.note != "" {
				client += " [" + on.note + "]"
			}
			if off.note != "" {
				offClient += " [" + off.note + "]"
			}
			if on.err != nil {
				client = "ERROR " + on.err.Error()
			}
			if off.err != nil {
				offClient = "ERROR " + off.err.Error()
			}
			fmt.Fprintf(tw, "%d\t%s\t%s (%s)\t%s\t%s\t%s\t%s\t%s\t%s\n", i+1, r.class, r.path, r.sender(),
				on.internet(), on.counters, client, offSeen, offClient, verdict)
		}
		tw.Flush()
		t.Logf("escape matrix, %s topology (%s), %d rows in %s:\n%s", w.topo.Topology, bridgeName(w.topo), len(rows),
			time.Since(start).Round(time.Millisecond), b.String())
	}()
	for i, r := range rows {
		res[i][0] = w.try(r, i, false)
		done[0] = i + 1
	}
	w.removeNodeRules()
	time.Sleep(100 * time.Millisecond)
	for i, r := range rows {
		res[i][1] = w.try(r, i, true)
		done[1] = i + 1
	}
	if len(w.selfRegistered) > 0 {
		t.Errorf("the self-declared gateway (namespace %s, annotation egress-cni.io/gateway) was registered as a gateway: %v", w.selfgw.Namespace, w.selfRegistered)
	}
	for i, r := range rows {
		on, off := res[i][0], res[i][1]
		switch {
		case on.err != nil || off.err != nil:
			t.Errorf("row %d %s: attempt failed: %v / %v", i+1, r.path, on.err, off.err)
		case len(on.seen) > 0:
			t.Errorf("row %d %s (%s): LEAK with the node rules in place: the internet host saw %s, e.g. %s",
				i+1, r.path, r.sender(), on.internet(), on.seen[0].Packet)
		case len(off.seen) == 0:
			t.Errorf("row %d %s: its control (node rules removed) did not reach the internet host either: the row cannot fail", i+1, r.path)
		}
	}
}

func rowVerdict(on, off result) string {
	switch {
	case on.err != nil || off.err != nil:
		return "ERROR"
	case len(on.seen) > 0:
		return "LEAK"
	case len(off.seen) == 0:
		return "NO CONTROL"
	}
	return "blocked"
}

// nud: a pod confirms that its IPv6 gateway is still reachable with a
// unicast neighbour solicitation from its link-local address to the
// gateway's global address (RFC 4861 7.3.3; Linux sends them when a
// neighbour entry goes stale); the gateway must answer.
func (w *world) nud(t *testing.T) {
	p := w.app
	ll, mac, err := linkLocal(p)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := sim.Record(w.cl, p.NS, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	target := p.GW6.As16()
	body := append(target[:], 1, 1) // target, then the source link-layer address option
	body = append(body, mac...)
	ns := sim.Packet{Src: netip.AddrPortFrom(ll, 0), Dst: netip.AddrPortFrom(p.GW6, 0), Proto: unix.IPPROTO_ICMPV6, TTL: 255, Type: 135, Payload: body}
	b, err := ns.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	c0 := w.counters()
	mark := rec.Mark()
	if err := sim.SendRaw(p.NS, b); err != nil {
		t.Fatal(err)
	}
	got := rec.Wait(mark, func(q sim.Packet) bool {
		return q.Proto == unix.IPPROTO_ICMPV6 && q.Type == 136 && q.Src.Addr() == p.GW6
	}, time.Second)
	if len(got) == 0 {
		t.Fatalf("%s -> %s neighbour solicitation for %s: no advertisement came back (node counters %s)", ll, p.GW6, p.GW6, counterDelta(c0, w.counters()))
	}
	t.Logf("%s -> %s neighbour solicitation: answered by %s", ll, p.GW6, got[0].Packet)
}

// linkLocal is the pod's eth0 link-local address and MAC.
func linkLocal(p *sim.Pod) (netip.Addr, []byte, error) {
	var ll netip.Addr
	var mac []byte
	err := p.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		mac = l.Attrs().HardwareAddr
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if x, ok := netip.AddrFromSlice(a.IP); ok && x.IsLinkLocalUnicast() {
				ll = x
			}
		}
		return nil
	})
	if err == nil && !ll.IsValid() {
		err = errors.New("no link-local address on eth0")
	}
	return ll, mac, err
}
