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
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// The bypass matrix of issue 7: from an injected app pod (its sidecar
// stand-in on 15001 forwards to the egress gateway), every way out is
// tried once with the node rules applied. Each path must end either in
// the sidecar (captured, and then only the gateway talks to the
// internet) or in one of the source node's drop counters (the exit's, or
// source validation's for a forged source) with nothing reaching the
// internet host. Every row the node rules drop is tried again with
// the node rules flushed (its control): there the internet host must see
// it, so the row shows the node rules, nothing else, stopping it.

var inetDNS = netip.MustParseAddr("203.0.113.53")

// Outcomes of a bypass attempt.
const (
	outCaptured = "captured by sidecar"
	// outRedirected: the pod rules REDIRECTed the packet to the
	// sidecar's port, but no connection could be accepted (a SYN from a
	// foreign source address: the answer has nowhere to go).
	outRedirected = "captured (REDIRECT to :15001, no handshake)"
	outDropped    = "dropped at node"
	// outForged: dropped by the node's source validation (a source the
	// pod's port may not use), before conntrack and the forward hook.
	outForged  = "dropped at node (forged source)"
	outGateway = "gateway -> internet"
)

// recordingSidecar stands in for Envoy on 15001 (IPv4 and IPv6): it
// records each captured connection's original destination and forwards
// it through the egress gateway, as a sidecar does for external hosts.
type recordingSidecar struct {
	mu   sync.Mutex
	orig []netip.AddrPort
}

func (s *recordingSidecar) captured() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]netip.AddrPort(nil), s.orig...)
}

// serveRecordingSidecar listens on [::]:15001 (dual stack) in p.
func serveRecordingSidecar(t *testing.T, p *clusterPod, gateway netip.AddrPort) *recordingSidecar {
	t.Helper()
	s := &recordingSidecar{}
	serveSidecar(t, p, "tcp", ":15001", gateway, func(orig netip.AddrPort) {
		s.mu.Lock()
		s.orig = append(s.orig, orig)
		s.mu.Unlock()
	})
	return s
}

// rawSendIn sends one packet from a raw socket inside n, as root. For
// IPv4 it builds the whole IP header itself (IPPROTO_RAW, so
// IP_HDRINCL) around a UDP datagram to dst:port from src; for IPv6 it
// sends an experimental-protocol (253) payload. Nothing is read back.
func rawSendIn(n ns.NetNS, src, dst netip.Addr, port uint16) error {
	return n.Do(func(ns.NetNS) error {
		payload := []byte("raw bypass\n")
		if dst.Is6() {
			fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 253)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			return unix.Sendto(fd, payload, 0, &unix.SockaddrInet6{Addr: dst.As16()})
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		udpLen := 8 + len(payload)
		pkt := make([]byte, 20+udpLen)
		pkt[0], pkt[8], pkt[9] = 0x45, 64, unix.IPPROTO_UDP // the kernel fills length, id, checksum
		s4, d4 := src.As4(), dst.As4()
		copy(pkt[12:16], s4[:])
		copy(pkt[16:20], d4[:])
		u := pkt[20:]
		u[0], u[1] = 0xbe, 0xef // source port 48879
		u[2], u[3] = byte(port>>8), byte(port)
		u[4], u[5] = byte(udpLen>>8), byte(udpLen)
		copy(u[8:], payload) // UDP checksum 0: none (IPv4)
		return unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: d4})
	})
}

// nftCounter reads the packets of a named counter in table inet tbl.
func nftCounter(t *testing.T, n ns.NetNS, tbl, name string) uint64 {
	t.Helper()
	out := nstest.MustExec(t, n, "nft", "list", "counter", "inet", tbl, name)
	i := strings.Index(out, "packets")
	if i < 0 {
		t.Fatalf("bad counter output %q", out)
	}
	v, err := strconv.ParseUint(strings.Fields(out[i:])[1], 10, 64)
	if err != nil {
		t.Fatalf("bad counter output %q", out)
	}
	return v
}

// inetCounters reads the internet host's per-source counters: packets
// from the egress node's uplink (the gateway, masqueraded) and from
// anywhere else outside the internet's own link.
func (c *cluster) inetCounters(t *testing.T) (gw, other uint64) {
	t.Helper()
	return nftCounter(t, c.internet, "bypass", "gw"), nftCounter(t, c.internet, "bypass", "other")
}

// observeNode counts, in a table of the test's own, packets to the
// internet's addresses in the node's forward hook before our chain
// (priority -5) and after it: what reached the node, and what it let
// through.
func observeNode(t *testing.T, n *clusterNode) {
	t.Helper()
	nstest.MustExec(t, n.ns, "nft", `add table inet bypassobs
		add counter inet bypassobs seen
		add counter inet bypassobs passed
		add chain inet bypassobs pre { type filter hook forward priority -10; }
		add chain inet bypassobs post { type filter hook forward priority 10; }
		add rule inet bypassobs pre ip daddr 203.0.113.0/24 counter name seen
		add rule inet bypassobs pre ip6 daddr 2001:db8:ff::/64 counter name seen
		add rule inet bypassobs post ip daddr 203.0.113.0/24 counter name passed
		add rule inet bypassobs post ip6 daddr 2001:db8:ff::/64 counter name passed`)
}

// observePod counts, in a table of the test's own, packets the pod
// sends to its sidecar's port on lo after NAT (a REDIRECT).
func observePod(t *testing.T, p *clusterPod) {
	t.Helper()
	nstest.MustExec(t, p.netns, "nft", `add table inet bypassobs
		add counter inet bypassobs redirected
		add chain inet bypassobs post { type filter hook postrouting priority 400; }
		add rule inet bypassobs post oifname "lo" ip daddr 127.0.0.1 tcp dport 15001 counter name redirected
		add rule inet bypassobs post oifname "lo" ip6 daddr ::1 tcp dport 15001 counter name redirected`)
}

// bypassCase is one row of the matrix.
type bypassCase struct {
	path   string
	from   *clusterPod
	expect string
	// run makes the attempt; replied says whether the client got an
	// answer (src is who the far end saw, when known).
	run func() (replied bool, src netip.Addr, err error)
	// target is the destination a capture must record (captured rows).
	target netip.AddrPort
}

// bypassResult is what one attempt observed.
type bypassResult struct {
	replied    bool
	src        netip.Addr
	err        error
	captured   int    // new connections the sidecar accepted for target
	redirected uint64 // packets the pod REDIRECTed to 15001 (-1: not observed)
	drops      uint64 // rise of the source node's drop counter (the exit)
	forged     uint64 // rise of the source node's forged counters (source validation)
	// seen, passed: packets to the internet in the source node's
	// forward hook, before and after our chain.
	seen, passed uint64
	gw, other    uint64 // packets reaching the internet host, by source
}

func (r bypassResult) outcome() string {
	switch {
	case r.other > 0:
		return "LEAK: internet reached from a non-gateway source"
	case r.captured > 0 && r.drops == 0 && r.passed == 0:
		return outCaptured
	case !r.replied && r.redirected > 0 && r.seen == 0 && r.gw == 0:
		return outRedirected
	case !r.replied && r.drops > 0 && r.seen > 0 && r.passed == 0 && r.gw == 0:
		return outDropped
	case !r.replied && r.forged > 0 && r.seen == 0 && r.passed == 0 && r.gw == 0:
		return outForged
	case r.replied && r.captured == 0 && r.drops == 0 && r.gw > 0:
		return outGateway
	}
	return "UNEXPECTED"
}

func (r bypassResult) detail() string {
	reply := "no reply"
	if r.replied {
		reply = "reply"
		if r.src.IsValid() {
			reply += ", far end saw " + r.src.String()
		}
	} else if de, ok := errors.AsType[*nstest.DialError](r.err); ok {
		reply += " (" + de.Kind + ")"
	} else if r.err != nil {
		reply += " (" + r.err.Error() + ")"
	}
	return reply
}

// TestClusterBypassMatrix builds the simulated cluster once, applies the
// node rules, and tries every bypass of issue 7 from an injected app
// pod. The matrix is logged as a table.
func TestClusterBypassMatrix(t *testing.T) {
	c, _, start, built := startCluster(t)

	// The internet host also runs a resolver stand-in (UDP and TCP
	// echo on 203.0.113.53:53) and QUIC's port (UDP 443), and counts
	// every packet it receives from outside its own link, by source.
	if err := c.internet.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		a, err := netlink.ParseAddr(inetDNS.String() + "/24")
		if err != nil {
			return err
		}
		return netlink.AddrAdd(l, a)
	}); err != nil {
		t.Fatal(err)
	}
	nstest.ServeEcho(t, c.internet, net.JoinHostPort(inetDNS.String(), "53"))
	nstest.ServeEcho(t, c.internet, ":443")
	nstest.MustExec(t, c.internet, "nft", fmt.Sprintf(`add table inet bypass
		add counter inet bypass gw
		add counter inet bypass other
		add chain inet bypass in { type filter hook prerouting priority -310; }
		add rule inet bypass in ip saddr 203.0.113.0/24 return
		add rule inet bypass in ip6 saddr { 2001:db8:ff::/64, fe80::/10 } return
		add rule inet bypass in ip saddr %s counter name gw return
		add rule inet bypass in ip6 saddr %s counter name gw return
		add rule inet bypass in counter name other`, c.egress.uplink4, c.egress.uplink6))

	app := c.app.newClusterPod(t, "team-a", "app", map[string]string{
		"sidecar.istio.io/status":                       statusAnnotation,
		"traffic.sidecar.istio.io/excludeOutboundPorts": strconv.Itoa(gatewayForwardPort),
	})
	admin := c.app.newClusterPod(t, "team-a", "netadmin", map[string]string{"sidecar.istio.io/status": statusAnnotation})
	worker := c.egress.newClusterPod(t, "team-c", "worker", map[string]string{})
	gw := c.egress.newClusterPod(t, "istio-system", "istio-egressgateway-7c9d-bypass", map[string]string{})
	// Pods are registered with the node rules at ADD, so the rules come
	// first (an ADD without them fails: try again later).
	for _, n := range []*clusterNode{c.app, c.egress} {
		n.apply(t)
	}
	c.app.mustAdd(t, app)
	c.app.mustAdd(t, admin)
	c.egress.mustAdd(t, worker)
	c.egress.mustAdd(t, gw)
	// The counters can see a leak: without the node rules, an
	// uncaptured datagram from the app pod reaches the internet.
	c.app.withoutNodeRules(t, func() {
		g0, o0 := c.inetCounters(t)
		if _, err := nstest.Dial(t, app.netns, cniAppUID, cniAppUID, "udp4", net.JoinHostPort(inetIPv4.String(), "443")); err != nil {
			t.Errorf("without node rules: UDP :443 from the app pod: %v", err)
		}
		if g1, o1 := c.inetCounters(t); o1 == o0 || g1 != g0 {
			t.Fatalf("without node rules: the internet's counters saw gw +%d other +%d, want other > 0", g1-g0, o1-o0)
		} else {
			t.Logf("without node rules: UDP :443 from the app pod reached the internet (other +%d): the matrix can fail", o1-o0)
		}
	})
	for _, p := range []*clusterPod{app, admin, worker, gw} {
		reg, ok := p.node.registration(t, p.id)
		if veth := p.node.hostVeth(t, p); !ok || reg.Port != veth || reg.L3 != "cni0" || reg.Gateway != (p == gw) ||
			!slices.Contains(reg.IPs, p.ip4) || !slices.Contains(reg.IPs, p.ip6) {
			t.Fatalf("%s: registration %v (found %v), want port %s, l3 cni0, %s and %s, gateway %v", p.name, reg, ok, veth, p.ip4, p.ip6, p == gw)
		}
	}
	if gws := c.egress.gateways(t); len(gws) != 2 || slices.ContainsFunc(gws, func(g node.Gateway) bool {
		return g.Iface != "cni0" || g.ContainerID != gw.id || (g.IP != gw.ip4 && g.IP != gw.ip6)
	}) {
		t.Fatalf("gateway entries %v, want cni0 . %s and cni0 . %s for %s", gws, gw.ip4, gw.ip6, gw.id)
	}
	for _, n := range []*clusterNode{c.app, c.egress} {
		if k := n.counters(t); k.Forged != 0 || k.Dropped != 0 {
			t.Logf("%s: counters before the matrix: %+v", n.name, k)
		}
	}
	serveForwarder(t, gw, "tcp")
	sidecar := serveRecordingSidecar(t, app, netip.AddrPortFrom(gw.ip4, uint16(gatewayForwardPort)))
	for _, n := range []*clusterNode{c.app, c.egress} {
		observeNode(t, n)
	}
	observePod(t, app)
	for _, p := range []*clusterPod{app, admin} {
		if err := p.node.chain.check(p.pod); err != nil {
			t.Fatalf("CHECK %s before the matrix: %v", p.name, err)
		}
	}

	ap := func(a netip.Addr, port int) netip.AddrPort { return netip.AddrPortFrom(a, uint16(port)) }
	inet4, inet6 := ap(inetIPv4, inetEchoPort), ap(inetIPv6, inetEchoPort)
	dial := func(p *clusterPod, uid, gid uint32, network string, dst netip.AddrPort, opts ...nstest.DialOption) func() (bool, netip.Addr, error) {
		return func() (bool, netip.Addr, error) {
			line, err := nstest.Dial(t, p.netns, uid, gid, network, dst.String(), append([]nstest.DialOption{nstest.WithTimeout(time.Second)}, opts...)...)
			if err != nil {
				return false, netip.Addr{}, err
			}
			r, err := nstest.ParseReply(line)
			if err != nil {
				return true, netip.Addr{}, fmt.Errorf("bad reply %q: %w", line, err)
			}
			return true, r.Src.Addr(), nil
		}
	}
	ping := func(p *clusterPod, dst netip.Addr) func() (bool, netip.Addr, error) {
		return func() (bool, netip.Addr, error) {
			err := pingIn(p.netns, dst, time.Second)
			return err == nil, netip.Addr{}, err
		}
	}
	raw := func(p *clusterPod, src, dst netip.Addr) func() (bool, netip.Addr, error) {
		return func() (bool, netip.Addr, error) {
			if err := rawSendIn(p.netns, src, dst, uint16(inetEchoPort)); err != nil {
				return false, netip.Addr{}, err
			}
			time.Sleep(300 * time.Millisecond) // no answer expected either way
			return false, netip.Addr{}, nil
		}
	}
	const uid, gid = cniAppUID, cniAppUID
	cases := []bypassCase{
		{path: "TCP as the app UID 1000 -> internet :8080", from: app, expect: outCaptured, target: inet4,
			run: dial(app, uid, gid, "tcp4", inet4)},
		{path: "TCP/IPv6 as the app UID 1000 -> internet :8080", from: app, expect: outCaptured, target: inet6,
			run: dial(app, uid, gid, "tcp6", inet6)},
		{path: "TCP as UID 1337 (proxy UID, not captured)", from: app, expect: outDropped,
			run: dial(app, cniProxyUID, gid, "tcp4", inet4)},
		{path: "TCP as GID 1337 (UID 1000)", from: app, expect: outDropped,
			run: dial(app, uid, cniProxyUID, "tcp4", inet4)},
		{path: "TCP/IPv6 as UID 1337", from: app, expect: outDropped,
			run: dial(app, cniProxyUID, gid, "tcp6", inet6)},
		{path: "UDP :443 (QUIC) as the app UID", from: app, expect: outDropped,
			run: dial(app, uid, gid, "udp4", ap(inetIPv4, 443))},
		{path: "UDP/IPv6 :443 (QUIC) as the app UID", from: app, expect: outDropped,
			run: dial(app, uid, gid, "udp6", ap(inetIPv6, 443))},
		{path: "ICMP echo (raw socket, root)", from: app, expect: outDropped, run: ping(app, inetIPv4)},
		{path: "ICMPv6 echo (raw socket, root)", from: app, expect: outDropped, run: ping(app, inetIPv6)},
		{path: "raw IPv4 packet, IP_HDRINCL, UDP :8080 (root)", from: app, expect: outDropped, run: raw(app, app.ip4, inetIPv4)},
		{path: "raw IPv6 packet, protocol 253 (root)", from: app, expect: outDropped, run: raw(app, app.ip6, inetIPv6)},
		{path: "spoofed source = gateway's IPv4, UDP (root)", from: app, expect: outForged,
			run: dial(app, 0, 0, "udp4", inet4, nstest.WithSource(gw.ip4.String()))},
		{path: "spoofed source = gateway's IPv6, UDP (root)", from: app, expect: outForged,
			run: dial(app, 0, 0, "udp6", inet6, nstest.WithSource(gw.ip6.String()))},
		{path: "spoofed source = gateway's IPv4, TCP (root)", from: app, expect: outRedirected,
			run: dial(app, 0, 0, "tcp4", inet4, nstest.WithSource(gw.ip4.String()))},
		{path: "spoofed source = gateway's IPv4, raw IP_HDRINCL (root)", from: app, expect: outForged,
			run: raw(app, gw.ip4, inetIPv4)},
		{path: "spoofed source = egress node's IPv4 (its NAT address), UDP (root)", from: app, expect: outForged,
			run: dial(app, 0, 0, "udp4", inet4, nstest.WithSource(c.egress.uplink4.String()))},
		{path: "spoofed source = egress node's IPv6, UDP (root)", from: app, expect: outForged,
			run: dial(app, 0, 0, "udp6", inet6, nstest.WithSource(c.egress.uplink6.String()))},
		{path: "spoofed source = egress node's IPv4, raw IP_HDRINCL (root)", from: app, expect: outForged,
			run: raw(app, c.egress.uplink4, inetIPv4)},
		{path: "DNS udp/53 to an outside resolver as the app UID", from: app, expect: outDropped,
			run: dial(app, uid, gid, "udp4", ap(inetDNS, 53))},
		{path: "DNS udp/53 to an outside resolver as UID 1337", from: app, expect: outDropped,
			run: dial(app, cniProxyUID, gid, "udp4", ap(inetDNS, 53))},
		{path: "DNS tcp/53 to an outside resolver as the app UID", from: app, expect: outCaptured, target: ap(inetDNS, 53),
			run: dial(app, uid, gid, "tcp4", ap(inetDNS, 53))},
		{path: "DNS tcp/53 to an outside resolver as UID 1337", from: app, expect: outDropped,
			run: dial(app, cniProxyUID, gid, "tcp4", ap(inetDNS, 53))},
	}
	// The NET_ADMIN pod flushes its own capture, then connects out.
	flushed := []bypassCase{
		{path: "NET_ADMIN pod, own rules flushed: TCP as the app UID", from: admin, expect: outDropped,
			run: dial(admin, uid, gid, "tcp4", inet4)},
		{path: "NET_ADMIN pod, own rules flushed: TCP/IPv6 as the app UID", from: admin, expect: outDropped,
			run: dial(admin, uid, gid, "tcp6", inet6)},
		{path: "NET_ADMIN pod, own rules flushed: TCP as root", from: admin, expect: outDropped,
			run: dial(admin, 0, 0, "tcp4", inet4)},
	}
	// Controls: what the node rules let through.
	controls := []bypassCase{
		{path: "control: ordinary pod on the egress node, TCP", from: worker, expect: outDropped,
			run: dial(worker, uid, gid, "tcp4", inet4)},
		{path: "control: the gateway pod, TCP", from: gw, expect: outGateway, run: dial(gw, uid, gid, "tcp4", inet4)},
		{path: "control: the gateway pod, TCP/IPv6", from: gw, expect: outGateway, run: dial(gw, uid, gid, "tcp6", inet6)},
		{path: "control: the gateway pod, UDP :443", from: gw, expect: outGateway, run: dial(gw, uid, gid, "udp4", ap(inetIPv4, 443))},
	}

	type row struct {
		bypassCase
		r   bypassResult
		got string
		// ctl: what the internet host saw of the same attempt with the
		// source node's rules flushed (rows the node rules drop).
		ctl string
	}
	var rows []row
	t.Cleanup(func() {
		var b strings.Builder
		w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(w, "#\tpath (from)\texpected\tobserved\tsidecar accepted\tpod to :15001\tnode fwd to internet (seen/passed)\tnode drops (exit/forged)\tinternet saw (gw/other)\tclient\twithout node rules\tok")
		for i, r := range rows {
			ok := "ok"
			if r.got != r.expect {
				ok = "FAIL"
			}
			pod := fmt.Sprintf("+%d", r.r.redirected)
			if r.from != app {
				pod = "-"
			}
			ctl := r.ctl
			if ctl == "" {
				ctl = "-"
			}
			fmt.Fprintf(w, "%d\t%s (%s/%s)\t%s\t%s\t+%d\t%s\t+%d/+%d\t+%d/+%d\t+%d/+%d\t%s\t%s\t%s\n", i+1, r.path, r.from.node.name, r.from.name,
				r.expect, r.got, r.r.captured, pod, r.r.seen, r.r.passed, r.r.drops, r.r.forged, r.r.gw, r.r.other, r.r.detail(), ctl, ok)
		}
		w.Flush()
		t.Logf("bypass matrix (node rules applied on both nodes):\n%s", b.String())
	})
	// control makes the attempt again with the source node's rules
	// flushed: the internet host must see it (from any source; a spoofed
	// egress node address counts as gw), or the row proves nothing.
	control := func(bc bypassCase) string {
		t.Helper()
		var g, o uint64
		var replied bool
		bc.from.node.withoutNodeRules(t, func() {
			g0, o0 := c.inetCounters(t)
			replied, _, _ = bc.run()
			time.Sleep(50 * time.Millisecond)
			g1, o1 := c.inetCounters(t)
			g, o = g1-g0, o1-o0
		})
		if g+o == 0 {
			t.Errorf("%s: control: with the node rules of %s flushed, nothing reached the internet either: the row does not show the node rules at work",
				bc.path, bc.from.node.name)
		}
		reply := "no reply"
		if replied {
			reply = "reply"
		}
		return fmt.Sprintf("internet saw +%d/+%d, %s", g, o, reply)
	}
	try := func(bc bypassCase) {
		t.Helper()
		before := len(sidecar.captured())
		nodeNS := bc.from.node.ns
		redirected := func() uint64 {
			if bc.from != app {
				return 0
			}
			return nftCounter(t, app.netns, "bypassobs", "redirected")
		}
		k0, r0 := bc.from.node.counters(t), redirected()
		s0, p0 := nftCounter(t, nodeNS, "bypassobs", "seen"), nftCounter(t, nodeNS, "bypassobs", "passed")
		g0, o0 := c.inetCounters(t)
		var r bypassResult
		r.replied, r.src, r.err = bc.run()
		// Let in-flight packets land before reading the counters.
		time.Sleep(50 * time.Millisecond)
		k1 := bc.from.node.counters(t)
		r.drops, r.forged, r.redirected = k1.Dropped-k0.Dropped, k1.Forged-k0.Forged, redirected()-r0
		r.seen, r.passed = nftCounter(t, nodeNS, "bypassobs", "seen")-s0, nftCounter(t, nodeNS, "bypassobs", "passed")-p0
		g1, o1 := c.inetCounters(t)
		r.gw, r.other = g1-g0, o1-o0
		for _, o := range sidecar.captured()[before:] {
			if o == bc.target {
				r.captured++
			}
		}
		got := r.outcome()
		ctl := ""
		if bc.expect == outDropped || bc.expect == outForged {
			ctl = control(bc)
		}
		rows = append(rows, row{bc, r, got, ctl})
		if got != bc.expect {
			t.Errorf("%s: expected %s, observed %s (sidecar +%d, pod to :15001 +%d, node seen/passed +%d/+%d, drops exit/forged +%d/+%d, internet gw +%d other +%d, %s)",
				bc.path, bc.expect, got, r.captured, r.redirected, r.seen, r.passed, r.drops, r.forged, r.gw, r.other, r.detail())
		}
		// Only the gateway reaches the internet; a capture gets there
		// through it, and the far end sees the egress node's address.
		if r.other != 0 {
			t.Errorf("%s: %d packets reached the internet from a source other than the gateway", bc.path, r.other)
		}
		if bc.expect == outCaptured && r.replied && r.src != c.egress.uplink4 && r.src != c.egress.uplink6 {
			t.Errorf("%s: captured, but the internet saw %s, not the egress node", bc.path, r.src)
		}
	}
	for _, bc := range cases {
		try(bc)
	}
	// The NET_ADMIN container: flush everything it can (nft, and the nat
	// table of both iptables families), as root inside its namespace.
	nstest.MustExec(t, admin.netns, "nft", "flush", "ruleset")
	for _, cmd := range []string{"iptables", "ip6tables"} {
		if out, err := nstest.Exec(admin.netns, cmd, "-t", "nat", "-F"); err != nil {
			t.Logf("%s -t nat -F in the pod: %v %s", cmd, err, out)
		}
	}
	if err := c.app.chain.check(admin.pod); err == nil {
		t.Error("CHECK of the NET_ADMIN pod passed after it flushed its rules")
	}
	for _, bc := range flushed {
		try(bc)
	}
	for _, bc := range controls {
		try(bc)
	}
	if n := len(sidecar.captured()); n == 0 {
		t.Error("the sidecar captured nothing")
	}
	delPods(t, app, admin, worker, gw)
	if got := c.egress.gateways(t); len(got) != 0 {
		t.Errorf("gateway entries after the gateway's DEL: %v", got)
	}
	for _, n := range []*clusterNode{c.app, c.egress} {
		if got := n.pods(t); len(got) != 0 {
			t.Errorf("%s: pod registrations after every pod's DEL: %v", n.name, got)
		}
	}
	t.Logf("plugins built in %s; matrix ran in %s", built.Round(time.Millisecond), (time.Since(start) - built).Round(time.Millisecond))
}
