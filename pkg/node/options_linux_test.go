package node

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// optionsWorld is a routed pod (eth0, 10.244.1.2) on a node (vpod;
// up0 192.0.2.10) whose uplink leads to an internet host (192.0.2.20,
// 203.0.113.10) that captures every IPv4 frame on its eth0 (a sniffer:
// what reaches the wire counts, whether or not its own stack would
// accept a packet that still carries a source route); the node has
// source routing and route_localnet on, the settings the attacks below
// need.
type optionsWorld struct {
	pod, host, inet ns.NetNS
	sniff           int          // the internet host's packet socket
	local           *net.UDPConn // the node's listener on 127.0.0.1:5300
}

func newOptionsWorld(t *testing.T) *optionsWorld {
	t.Helper()
	w := &optionsWorld{pod: nstest.NewNS(t), host: nstest.NewNS(t), inet: nstest.NewNS(t)}
	nstest.Link(t,
		nstest.LinkEnd{NS: w.pod, Name: "eth0", Addrs: []netip.Prefix{netip.MustParsePrefix("10.244.1.2/24")}},
		nstest.LinkEnd{NS: w.host, Name: "vpod", Addrs: []netip.Prefix{netip.MustParsePrefix("10.244.1.1/24")}})
	nstest.Link(t,
		nstest.LinkEnd{NS: w.host, Name: "up0", Addrs: []netip.Prefix{netip.MustParsePrefix("192.0.2.10/26")}},
		nstest.LinkEnd{NS: w.inet, Name: "eth0", Addrs: []netip.Prefix{netip.MustParsePrefix("192.0.2.20/26"), netip.MustParsePrefix("203.0.113.10/32")}})
	nstest.Route(t, w.pod, netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr("10.244.1.1"))
	nstest.Route(t, w.host, netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr("192.0.2.20"))
	for _, k := range []string{"net.ipv4.ip_forward", "net.ipv4.conf.all.accept_source_route", "net.ipv4.conf.vpod.accept_source_route",
		"net.ipv4.conf.all.route_localnet", "net.ipv4.conf.vpod.route_localnet"} {
		nstest.Sysctl(t, w.host, k, "1")
	}
	listen := func(n ns.NetNS, addr string) *net.UDPConn {
		var c *net.UDPConn
		if err := n.Do(func(ns.NetNS) error {
			var err error
			c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	w.local = listen(w.host, "127.0.0.1:5300")
	if err := w.inet.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		proto := htons(unix.ETH_P_IP)
		w.sniff, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(proto))
		if err != nil {
			return err
		}
		if err := unix.Bind(w.sniff, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: l.Attrs().Index}); err != nil {
			return err
		}
		return unix.SetsockoptTimeval(w.sniff, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 1})
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(w.sniff) })
	return w
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// sniffed says whether an IPv4 packet carrying payload reached the
// internet host's wire within a second.
func (w *optionsWorld) sniffed(t *testing.T, payload string) bool {
	t.Helper()
	return w.sniffedMatch(t, time.Second, func(p []byte) bool { return bytes.Contains(p, []byte(payload)) })
}

// sniffedMatch says whether an IPv4 packet for which match is true
// reached the internet host's wire within timeout.
func (w *optionsWorld) sniffedMatch(t *testing.T, timeout time.Duration, match func([]byte) bool) bool {
	t.Helper()
	buf := make([]byte, 4096)
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(w.sniff, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if match(buf[:n]) {
			return true
		}
	}
	return false
}

// arrived says whether a datagram carrying payload reached c.
func arrived(t *testing.T, c *net.UDPConn, payload string) bool {
	t.Helper()
	buf := make([]byte, 2048)
	for {
		if err := c.SetReadDeadline(time.Now().Add(time.Second)); err != nil {
			t.Fatal(err)
		}
		n, _, err := c.ReadFromUDP(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return false
		}
		if err != nil {
			t.Fatal(err)
		}
		if string(buf[:n]) == payload {
			return true
		}
	}
}

// ipv4UDP builds an IPv4 UDP datagram with the given options (padded
// with End of Options to a multiple of 4) and a correct header checksum.
func ipv4UDP(src, dst netip.Addr, opts []byte, dport uint16, payload string) []byte {
	udp := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], 40000)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	return ipv4Packet(src, dst, opts, unix.IPPROTO_UDP, append(udp, payload...))
}

// ipv4Echo builds an ICMP echo request carrying payload.
func ipv4Echo(src, dst netip.Addr, payload string) []byte {
	icmp := append([]byte{8, 0, 0, 0, 0x12, 0x34, 0, 1}, payload...)
	binary.BigEndian.PutUint16(icmp[2:], checksum(icmp))
	return ipv4Packet(src, dst, nil, unix.IPPROTO_ICMP, icmp)
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// ipv4Packet wraps l4 in an IPv4 header with opts.
func ipv4Packet(src, dst netip.Addr, opts []byte, proto byte, l4 []byte) []byte {
	for len(opts)%4 != 0 {
		opts = append(opts, 0)
	}
	ihl := 20 + len(opts)
	h := make([]byte, 20, ihl+len(l4))
	h[0] = 0x40 | byte(ihl/4)
	binary.BigEndian.PutUint16(h[2:], uint16(ihl+len(l4)))
	binary.BigEndian.PutUint16(h[4:], uint16(time.Now().UnixNano()))
	h[8], h[9] = 64, proto
	s, d := src.As4(), dst.As4()
	copy(h[12:], s[:])
	copy(h[16:], d[:])
	h = append(h, opts...)
	binary.BigEndian.PutUint16(h[10:], checksum(h))
	return append(h, l4...)
}

// lsrr is a loose source route option: type 131, its length, the
// pointer and the addresses.
func lsrr(length, ptr byte, addrs ...string) []byte {
	o := []byte{131, length, ptr}
	for _, a := range addrs {
		b := netip.MustParseAddr(a).As4()
		o = append(o, b[:]...)
	}
	return o
}

// sendRaw sends pkt from the pod through a raw IP socket (the pod's
// kernel routes it by its destination and leaves the options alone).
func (w *optionsWorld) sendRaw(t *testing.T, pkt []byte) {
	t.Helper()
	if err := w.pod.Do(func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: [4]byte(pkt[16:20])})
	}); err != nil {
		t.Fatal(err)
	}
}

// sendFrame sends pkt from the pod as a link-layer frame to the node's
// vpod, so that no routing in the pod decides where it goes.
func (w *optionsWorld) sendFrame(t *testing.T, pkt []byte) {
	t.Helper()
	var mac net.HardwareAddr
	if err := w.host.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("vpod")
		if err == nil {
			mac = l.Attrs().HardwareAddr
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := w.pod.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		proto := htons(unix.ETH_P_IP)
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(proto))
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Protocol: proto, Ifindex: l.Attrs().Index, Halen: 6}
		copy(sa.Addr[:], mac)
		return unix.Sendto(fd, pkt, 0, sa)
	}); err != nil {
		t.Fatal(err)
	}
}

// IPv4 options get a registered pod nothing, in whatever shape: the
// well-formed loose source route (source-route), and the ones the
// kernel's option parser refuses in its strict mode but the receive
// path follows (ip-options): pointer 8 over two hops, an odd length.
// A packet to 127.0.0.0/8 from the pod's interface is refused too
// (loopback). Controls: without the node rules the pointer-8 route and
// the odd-length one reach the internet host, and the loopback one the
// node's localhost listener, so each check can fail.
func TestIPv4OptionsAndLoopback(t *testing.T) {
	nstest.RequirePrivileged(t)
	w := newOptionsWorld(t)
	podIP, nodeIP := netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("192.0.2.10")
	cases := []struct {
		name   string
		opts   []byte
		reason Reason
	}{
		{"lsrr pointer 4", lsrr(7, 4, "203.0.113.10"), ReasonSourceRoute},
		{"lsrr pointer 8 over two hops", lsrr(11, 8, "198.51.100.1", "203.0.113.10"), ReasonIPOptions},
		{"lsrr of length 8", append(lsrr(8, 4, "203.0.113.10"), 0), ReasonIPOptions},
	}
	mustApply(t, w.host, mustParse(t, `{"role":"app","podCIDRs":["10.244.0.0/16"],"nodeCIDRs":["192.0.2.0/26"]}`))
	if _, err := in2(w.host, func() ([]Pod, error) {
		return RegisterPod(Pod{ContainerID: "c-raw", Port: "vpod", L3: "vpod", IPs: []netip.Addr{podIP}})
	}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		w.sendRaw(t, ipv4UDP(podIP, nodeIP, tc.opts, 9999, "ruled "+tc.name))
		if w.sniffed(t, "ruled "+tc.name) {
			t.Errorf("%s: with the node rules, the pod's datagram reached the internet host", tc.name)
		}
	}
	w.sendFrame(t, ipv4UDP(podIP, netip.MustParseAddr("127.0.0.1"), nil, 5300, "ruled loopback"))
	if arrived(t, w.local, "ruled loopback") {
		t.Error("with the node rules, the pod reached the node's 127.0.0.1 listener")
	}
	c := countersIn(t, w.host)
	want := map[Reason]uint64{ReasonSourceRoute: 1, ReasonIPOptions: 2, ReasonLoopback: 1}
	for r, n := range want {
		if got := c.ByReason[r][FamilyIPv4]; got != n {
			t.Errorf("%s/ipv4 counted %d, want %d", r, got, n)
		}
	}

	if err := in(w.host, Remove); err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases[1:] {
		w.sendRaw(t, ipv4UDP(podIP, nodeIP, tc.opts, 9999, "control "+tc.name))
		if !w.sniffed(t, "control "+tc.name) {
			t.Errorf("control, %s: without the node rules the datagram did not reach the internet host either, so its check cannot fail", tc.name)
		}
	}
	w.sendFrame(t, ipv4UDP(podIP, netip.MustParseAddr("127.0.0.1"), nil, 5300, "control loopback"))
	if !arrived(t, w.local, "control loopback") {
		t.Error("control: without the node rules the pod did not reach the node's 127.0.0.1 listener either, so the check cannot fail")
	}
}

// The node's own IGMPv2 membership reports (Router Alert, to the group
// address) still leave: the output rule that keeps the node's IPv4
// packets with options in the cluster exempts multicast, as the source
// rule does (found by the fifth red-team pass: the reports were dropped
// as reflection, and IGMP snooping pruned the node's groups).
func TestNodeIGMPv2ReportsLeave(t *testing.T) {
	nstest.RequirePrivileged(t)
	w := newOptionsWorld(t)
	nstest.Sysctl(t, w.host, "net.ipv4.conf.up0.force_igmp_version", "2")
	mustApply(t, w.host, mustParse(t, `{"role":"app","podCIDRs":["10.244.0.0/16"],"nodeCIDRs":["192.0.2.0/26"]}`))
	group := netip.MustParseAddr("239.1.2.3").As4()
	if err := w.host.Do(func(ns.NetNS) error {
		up, err := net.InterfaceByName("up0")
		if err != nil {
			return err
		}
		c, err := net.ListenMulticastUDP("udp4", up, &net.UDPAddr{IP: net.IP(group[:]), Port: 5999})
		if err != nil {
			return err
		}
		t.Cleanup(func() { c.Close() })
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// IPv4, protocol IGMP, to the group, with options (Router Alert).
	if w.sniffedMatch(t, 3*time.Second, func(p []byte) bool {
		return len(p) >= 24 && p[0]>>4 == 4 && p[0]&0x0f > 5 && p[9] == unix.IPPROTO_IGMP && [4]byte(p[16:20]) == group
	}) {
		return
	}
	c := countersIn(t, w.host)
	t.Errorf("no IGMPv2 report for 239.1.2.3 left the node (reflection/ipv4 counted %d)", c.ByReason[ReasonReflection][FamilyIPv4])
}

// The fail-closed table (boot-apply without a usable config) forwards
// nothing, and keeps the checks that need no config: a pod's plain
// datagram to the internet, its IPv4 options and its frame to 127.0.0.1
// get nowhere; Apply then replaces the table with the rules. Control:
// with no table at all the datagram reaches the internet host.
func TestApplyFailClosed(t *testing.T) {
	nstest.RequirePrivileged(t)
	w := newOptionsWorld(t)
	podIP := netip.MustParseAddr("10.244.1.2")
	inet := netip.MustParseAddr("203.0.113.10")
	if err := in(w.host, ApplyFailClosed); err != nil {
		t.Fatal(err)
	}
	w.sendRaw(t, ipv4UDP(podIP, inet, nil, 9999, "fail-closed plain"))
	if w.sniffed(t, "fail-closed plain") {
		t.Error("the fail-closed table forwarded a pod's datagram to the internet host")
	}
	w.sendRaw(t, ipv4UDP(podIP, netip.MustParseAddr("192.0.2.10"), lsrr(11, 8, "198.51.100.1", "203.0.113.10"), 9999, "fail-closed lsrr"))
	if w.sniffed(t, "fail-closed lsrr") {
		t.Error("the fail-closed table let a source-routed datagram out")
	}
	w.sendFrame(t, ipv4UDP(podIP, netip.MustParseAddr("127.0.0.1"), nil, 5300, "fail-closed loopback"))
	if arrived(t, w.local, "fail-closed loopback") {
		t.Error("the fail-closed table let a pod reach the node's 127.0.0.1 listener")
	}
	// A forged internet source to a closed port of the node: the node's
	// port unreachable would carry the datagram to the internet host (as
	// its echo reply does for an overlay packet it decapsulates; the
	// sixth red-team pass found it open in the first fail-closed table).
	w.sendRaw(t, ipv4UDP(inet, netip.MustParseAddr("192.0.2.10"), nil, 9, "fail-closed reflection"))
	if w.sniffed(t, "fail-closed reflection") {
		t.Error("the fail-closed node answered a forged internet source with the pod's data (port unreachable)")
	}
	w.sendRaw(t, ipv4Echo(inet, netip.MustParseAddr("192.0.2.10"), "fail-closed echo"))
	if w.sniffed(t, "fail-closed echo") {
		t.Error("the fail-closed node answered a forged internet source with the pod's data (echo reply)")
	}
	if _, err := in3(w.host, func() ([]Gateway, error) { _, err := IsEgressNode(); return nil, err }); !errors.Is(err, ErrNotApplied) {
		t.Errorf("IsEgressNode on the fail-closed table: %v, want ErrNotApplied (so that an ADD applies the rules)", err)
	}
	cfg := mustParse(t, `{"role":"app","podCIDRs":["10.244.0.0/16"],"nodeCIDRs":["192.0.2.0/26"]}`)
	mustApply(t, w.host, cfg)
	if err := in(w.host, func() error { return Check(cfg) }); err != nil {
		t.Errorf("Apply over the fail-closed table: %v", err)
	}
	if err := in(w.host, Remove); err != nil {
		t.Fatal(err)
	}
	w.sendRaw(t, ipv4UDP(podIP, inet, nil, 9999, "control plain"))
	if !w.sniffed(t, "control plain") {
		t.Error("control: with no table the datagram did not reach the internet host either, so the first check cannot fail")
	}
	w.sendRaw(t, ipv4UDP(inet, netip.MustParseAddr("192.0.2.10"), nil, 9, "control reflection"))
	if !w.sniffed(t, "control reflection") {
		t.Error("control: with no table the node's port unreachable did not reach the internet host either, so the reflection check cannot fail")
	}
	w.sendRaw(t, ipv4Echo(inet, netip.MustParseAddr("192.0.2.10"), "control echo"))
	if !w.sniffed(t, "control echo") {
		t.Error("control: with no table the node's echo reply did not reach the internet host either, so the echo check cannot fail")
	}
}

// The fail-closed tables do not bridge either: two namespaces on one
// bridge of the node (a pod and a NIC enslaved to the pod bridge, or an
// unregistered pod) get no frame across. Control: with no table they do.
func TestApplyFailClosedBridge(t *testing.T) {
	nstest.RequirePrivileged(t)
	host, a, b := nstest.NewNS(t), nstest.NewNS(t), nstest.NewNS(t)
	nstest.Link(t, nstest.LinkEnd{NS: host, Name: "pa"}, nstest.LinkEnd{NS: a, Name: "eth0", Addrs: []netip.Prefix{netip.MustParsePrefix("10.244.9.2/24")}})
	nstest.Link(t, nstest.LinkEnd{NS: host, Name: "pb"}, nstest.LinkEnd{NS: b, Name: "eth0", Addrs: []netip.Prefix{netip.MustParsePrefix("10.244.9.3/24")}})
	if err := host.Do(func(ns.NetNS) error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
		if err := netlink.LinkAdd(br); err != nil {
			return err
		}
		for _, n := range []string{"pa", "pb"} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetMaster(l, br); err != nil {
				return err
			}
		}
		return netlink.LinkSetUp(br)
	}); err != nil {
		t.Fatal(err)
	}
	var lc *net.UDPConn
	if err := b.Do(func(ns.NetNS) error {
		var err error
		lc, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP("10.244.9.3"), Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer lc.Close()
	send := func(msg string) bool {
		t.Helper()
		sendUDP(t, a, nil, &net.UDPAddr{IP: net.ParseIP("10.244.9.3"), Port: 9999}, msg)
		return arrived(t, lc, msg)
	}
	// Without br_netfilter's hand-off the inet forward chain never sees a
	// bridged frame: the bridge table's own chain must hold it.
	for _, k := range []string{"net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"} {
		nstest.Sysctl(t, host, k, "0")
	}
	if err := in(host, ApplyFailClosed); err != nil {
		t.Fatal(err)
	}
	if send("bridged while fail-closed") {
		t.Error("the fail-closed tables bridged a frame between two ports")
	}
	if err := in(host, Remove); err != nil {
		t.Fatal(err)
	}
	if !send("bridged control") {
		t.Error("control: with no table the frame was not bridged either, so the check cannot fail")
	}
}

// countersIn reads the node counters in n.
func countersIn(t *testing.T, n ns.NetNS) Counters {
	t.Helper()
	var c Counters
	if err := in(n, func() error {
		var err error
		c, err = ReadCounters()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return c
}

// sendUDP sends msg from n (from laddr, if given) to raddr.
func sendUDP(t *testing.T, n ns.NetNS, laddr, raddr *net.UDPAddr, msg string) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error {
		c, err := net.DialUDP("udp", laddr, raddr)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte(msg))
		return err
	}); err != nil {
		t.Fatalf("send %q: %v", msg, err)
	}
}

// Replies of connections the outside opened leave only when their first
// packet crossed the forward chain (the ingress label). Found by the
// seventh red-team pass: while the tables were missing, one forged
// "internet to pod" packet made a conntrack entry, and after the repair
// the pod sent out through it as replies for as long as it kept the
// entry alive. Here: a real ingress flow from the internet host still
// gets its replies; the forged one made in the window gets none, also
// after the rules and the pod's registration are back. Control: the
// same forged entry without the rules lets the "reply" out.
func TestIngressRepliesNeedTheForwardChain(t *testing.T) {
	nstest.RequirePrivileged(t)
	w := newOptionsWorld(t)
	podIP, inet := netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("203.0.113.10")
	nstest.Route(t, w.inet, netip.MustParsePrefix("10.244.0.0/16"), netip.MustParseAddr("192.0.2.10"))
	// kube-proxy's stand-in: conntrack runs in the node namespace
	// whether or not our tables are there.
	nstest.MustExec(t, w.host, "nft", "add table inet standin; add chain inet standin conntrack { type filter hook forward priority 10; }; add rule inet standin conntrack ct state new accept")
	cfg := mustParse(t, `{"role":"app","podCIDRs":["10.244.0.0/16"],"nodeCIDRs":["192.0.2.0/26"]}`)
	register := func() {
		t.Helper()
		if _, err := in2(w.host, func() ([]Pod, error) {
			return RegisterPod(Pod{ContainerID: "c-pod", Port: "vpod", L3: "vpod", IPs: []netip.Addr{podIP}})
		}); err != nil {
			t.Fatal(err)
		}
	}
	// reply sends from the pod's port to inet:dport, as a reply would.
	reply := func(sport, dport uint16, msg string) bool {
		t.Helper()
		sendUDP(t, w.pod, &net.UDPAddr{IP: net.IP(podIP.AsSlice()), Port: int(sport)}, &net.UDPAddr{IP: net.IP(inet.AsSlice()), Port: int(dport)}, msg)
		return w.sniffed(t, msg)
	}

	mustApply(t, w.host, cfg)
	register()
	// A real ingress flow: the internet host opens it.
	sendUDP(t, w.inet, &net.UDPAddr{IP: net.IP(inet.AsSlice()), Port: 5555}, &net.UDPAddr{IP: net.IP(podIP.AsSlice()), Port: 7777}, "ingress hello")
	time.Sleep(100 * time.Millisecond)
	if !reply(7777, 5555, "ingress reply") {
		t.Error("the reply of a connection the internet host opened did not leave")
	}

	// The window: our tables are gone; the pod forges "internet to me".
	if err := in(w.host, Remove); err != nil {
		t.Fatal(err)
	}
	w.sendFrame(t, ipv4UDP(inet, podIP, nil, 6666, "forged opener"))
	time.Sleep(100 * time.Millisecond)
	mustApply(t, w.host, cfg)
	register()
	if err := in(w.host, func() error { return Check(cfg) }); err != nil {
		t.Fatal(err)
	}
	if reply(6666, 40000, "window reply") {
		t.Error("after the repair, the pod sent out as a reply of a connection it forged while the tables were missing")
	}
	if got := countersIn(t, w.host).ByReason[ReasonNotAGateway][FamilyIPv4]; got == 0 {
		t.Error("the window reply was not dropped as not-a-gateway")
	}

	// Control: the same forged entry with no rules lets the reply out.
	if err := in(w.host, Remove); err != nil {
		t.Fatal(err)
	}
	w.sendFrame(t, ipv4UDP(inet, podIP, nil, 6667, "forged opener 2"))
	time.Sleep(100 * time.Millisecond)
	if !reply(6667, 40000, "control reply") {
		t.Error("control: with no rules the forged connection's reply did not leave either, so the check cannot fail")
	}
}

// The node's own ICMP errors to itself pass the output chain: a UDP
// datagram to a closed port on 127.0.0.1 or ::1 fails at once with
// ECONNREFUSED, with the node rules and with the fail-closed tables
// (the seventh red-team pass found them dropped as reflection, so such
// a client timed out).
func TestLoopbackPortUnreachable(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	refused := func(addr string) error {
		return host.Do(func(ns.NetNS) error {
			c, err := net.Dial("udp", addr)
			if err != nil {
				return err
			}
			defer c.Close()
			if _, err := c.Write([]byte("anyone?")); err != nil {
				return err
			}
			if err := c.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
				return err
			}
			_, err = c.Read(make([]byte, 16))
			if !errors.Is(err, unix.ECONNREFUSED) {
				return fmt.Errorf("read from %s: %w, want ECONNREFUSED", addr, err)
			}
			return nil
		})
	}
	for _, state := range []struct {
		name  string
		apply func() error
	}{
		{"node rules", func() error {
			return Apply(mustParse(t, `{"role":"app","podCIDRs":["10.244.0.0/16"]}`))
		}},
		{"fail-closed tables", ApplyFailClosed},
	} {
		if err := in(host, state.apply); err != nil {
			t.Fatal(err)
		}
		for _, addr := range []string{"127.0.0.1:9", "[::1]:9"} {
			if err := refused(addr); err != nil {
				t.Errorf("%s: %v", state.name, err)
			}
		}
		if state.name != "node rules" {
			continue // the fail-closed tables have no counters
		}
		if got := countersIn(t, host).ByReason[ReasonReflection]; got[FamilyIPv4]+got[FamilyIPv6] != 0 {
			t.Errorf("%s: reflection counted %v for the node's own port unreachables", state.name, got)
		}
	}
}
