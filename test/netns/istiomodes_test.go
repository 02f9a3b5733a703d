//go:build linux

package netns_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/internal/sim"
)

// runInitEnv runs egress-init (as root, in the test's namespace, with
// --netns pointing at the pod) with extra environment variables.
func runInitEnv(t *testing.T, bin string, env []string, args ...string) (stderr string, code int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append([]string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}, env...)
	var e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &e, &e
	code = exitCode(t, cmd)
	return e.String(), code
}

// TestEgressInitOwnerGroups: ISTIO_OUTBOUND_OWNER_GROUPS captures only the
// listed groups' traffic, ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE all but the
// listed groups', with real connections, for each backend.
func TestEgressInitOwnerGroups(t *testing.T) {
	nstest.RequirePrivileged(t)
	bin := buildEgressInit(t)
	target := nstest.InternetIPv4.String() + ":80"
	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		t.Run(backend, func(t *testing.T) {
			for _, tc := range []struct {
				env      string
				captured []uint32 // GIDs captured; the others go direct
				direct   []uint32
			}{
				{"ISTIO_OUTBOUND_OWNER_GROUPS=2000,2001", []uint32{2000, 2001}, []uint32{1000, 3000}},
				{"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE=3000", []uint32{1000, 2000}, []uint32{3000}},
			} {
				p := nstest.NewPod(t, nstest.PodOptions{})
				nstest.ServeProxy(t, p.NS, 15001)
				nstest.ServeEcho(t, p.World, ":80")
				args := append(slices.Clone(injectorArgs), "--backend", backend, "--netns", p.NS.Path())
				if out, code := runInitEnv(t, bin, []string{tc.env}, args...); code != 0 {
					t.Fatalf("%s: exit %d: %s", tc.env, code, out)
				}
				for _, gid := range tc.captured {
					if r := parseReply(t, nstest.MustDial(t, p.NS, 1000, gid, "tcp", target)); r.Kind != "proxy" || r.Orig.String() != target {
						t.Errorf("%s: GID %d: want the proxy with orig %s, got %+v", tc.env, gid, target, r)
					}
				}
				for _, gid := range tc.direct {
					if r := parseReply(t, nstest.MustDial(t, p.NS, 1000, gid, "tcp", target)); r.Kind != "direct" {
						t.Errorf("%s: GID %d: want direct, got %+v", tc.env, gid, r)
					}
				}
				// The proxy is never captured, whatever its group.
				if r := parseReply(t, nstest.MustDial(t, p.NS, 1337, 2000, "tcp", target)); r.Kind != "direct" {
					t.Errorf("%s: proxy UID: want direct, got %+v", tc.env, r)
				}
			}
		})
	}
}

// TestEgressInitRerouteVirtualInterfaces: with -k, TCP that a VM behind
// an interface of the pod sends out is redirected to the proxy's outbound
// port (with its original destination), as if the pod had sent it;
// without -k it is taken for inbound traffic (15006). For each backend.
func TestEgressInitRerouteVirtualInterfaces(t *testing.T) {
	nstest.RequirePrivileged(t)
	bin := buildEgressInit(t)
	target := nstest.InternetIPv4.String() + ":80"
	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		t.Run(backend, func(t *testing.T) {
			p := nstest.NewPod(t, nstest.PodOptions{})
			vm := nstest.NewNS(t)
			nstest.Link(t,
				nstest.LinkEnd{NS: p.NS, Name: "vm0", Addrs: []netip.Prefix{netip.MustParsePrefix("198.51.100.1/24")}},
				nstest.LinkEnd{NS: vm, Name: "eth0", Addrs: []netip.Prefix{netip.MustParsePrefix("198.51.100.2/24")}})
			nstest.Route(t, vm, netip.MustParsePrefix("0.0.0.0/0"), netip.MustParseAddr("198.51.100.1"))
			nstest.Route(t, p.World, netip.MustParsePrefix("198.51.100.0/24"), nstest.PodIPv4)
			nstest.Sysctl(t, p.NS, "net.ipv4.ip_forward", "1")
			nstest.ServeProxy(t, p.NS, 15001)
			nstest.ServeProxy(t, p.NS, 15006)
			nstest.ServeEcho(t, p.World, ":80")
			if r := parseReply(t, nstest.MustDial(t, vm, 1000, 1000, "tcp", target)); r.Kind != "direct" {
				t.Fatalf("before egress-init the VM's traffic must be forwarded, got %+v", r)
			}
			// Without -k the VM's connection enters the pod like any
			// inbound one: the inbound capture takes it to 15006.
			args := append(slices.Clone(injectorArgs), "--backend", backend, "--netns", p.NS.Path())
			if out, code := runInitEnv(t, bin, nil, args...); code != 0 {
				t.Fatalf("exit %d: %s", code, out)
			}
			if r := parseReply(t, nstest.MustDial(t, vm, 1000, 1000, "tcp", target)); r.Kind != "proxy" || r.Port != 15006 {
				t.Fatalf("without -k: want the inbound port 15006, got %+v", r)
			}
			if out, code := runInitEnv(t, bin, nil, append(args, "-k", "vm0")...); code != 0 {
				t.Fatalf("-k vm0: exit %d: %s", code, out)
			}
			if r := parseReply(t, nstest.MustDial(t, vm, 1000, 1000, "tcp", target)); r.Kind != "proxy" || r.Port != 15001 || r.Orig.String() != target {
				t.Fatalf("-k vm0: want the outbound port 15001 with orig %s, got %+v", target, r)
			}
			// The pod's own app is still captured too.
			if r := parseReply(t, nstest.MustDial(t, p.NS, 1000, 1000, "tcp", target)); r.Kind != "proxy" {
				t.Fatalf("-k vm0: the app: want the proxy, got %+v", r)
			}
		})
	}
}

// TestEgressInitDNSCapture: with --redirect-dns --capture-all-dns, the
// app's DNS, UDP and TCP, to a loopback resolver (127.0.0.53) and to a
// resolver beyond eth0 goes to the agent's port 15053, and the proxy's
// DNS goes straight to the resolver; in particular the proxy's TCP DNS to
// the loopback resolver is not sent to the inbound port 15006 (the loop
// Istio's port-53 exceptions avoid). For each backend.
func TestEgressInitDNSCapture(t *testing.T) {
	nstest.RequirePrivileged(t)
	bin := buildEgressInit(t)
	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		t.Run(backend, func(t *testing.T) {
			p := nstest.NewPod(t, nstest.PodOptions{})
			nstest.ServeEchoAs(t, p.NS, ":15053", 1337, 1337) // the agent's DNS, as the proxy UID
			nstest.ServeEcho(t, p.NS, "127.0.0.53:53")        // a loopback resolver
			nstest.ServeEcho(t, p.World, ":53")               // a resolver beyond eth0
			nstest.ServeProxy(t, p.NS, 15006)                 // where a loop would land
			args := append(slices.Clone(injectorArgs), "--redirect-dns", "--capture-all-dns", "--backend", backend, "--netns", p.NS.Path())
			if out, code := runInitEnv(t, bin, nil, args...); code != 0 {
				t.Fatalf("exit %d: %s", code, out)
			}
			for _, resolver := range []string{"127.0.0.53:53", nstest.InternetIPv4.String() + ":53"} {
				for _, network := range []string{"udp", "tcp"} {
					r := parseReply(t, nstest.MustDial(t, p.NS, 1000, 1000, network, resolver))
					if r.Kind != "direct" || r.Dst.Port() != 15053 {
						t.Errorf("app %s DNS to %s: want the agent on 15053, got %+v", network, resolver, r)
					}
					r = parseReply(t, nstest.MustDial(t, p.NS, 1337, 1337, network, resolver))
					if r.Kind != "direct" || r.Dst.String() != resolver {
						t.Errorf("proxy %s DNS to %s: want the resolver itself, got %+v", network, resolver, r)
					}
				}
			}
		})
	}
}

// TestEgressInitDropInvalid: an out-of-window segment (a lone ACK for no
// connection, which conntrack with strict TCP tracking deems INVALID)
// sent to the pod draws a reset without --drop-invalid, and nothing with
// it: mangle drops it before the stack answers. For each backend.
func TestEgressInitDropInvalid(t *testing.T) {
	nstest.RequirePrivileged(t)
	bin := buildEgressInit(t)
	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		t.Run(backend, func(t *testing.T) {
			p := nstest.NewPod(t, nstest.PodOptions{})
			nstest.ServeEcho(t, p.NS, ":8080")
			nstest.ServeProxy(t, p.NS, 15006)
			var stack sim.Cleanups
			t.Cleanup(stack.Run)
			rec, err := sim.Record(&stack, p.World, p.WorldIfName)
			if err != nil {
				t.Fatal(err)
			}
			sport := uint16(40000)
			// resets reports whether the pod answers a lone ACK with a RST.
			resets := func() bool {
				t.Helper()
				sport++
				src := netip.AddrPortFrom(nstest.WorldIPv4, sport)
				dst := netip.AddrPortFrom(nstest.PodIPv4, 8080)
				pkt, err := sim.Packet{Src: src, Dst: dst, Proto: unix.IPPROTO_TCP, Flags: sim.TCPAck, Seq: 0x12345678, Ack: 0x9abcdef0}.Marshal()
				if err != nil {
					t.Fatal(err)
				}
				mark := rec.Mark()
				if err := sim.SendRaw(p.World, pkt); err != nil {
					t.Fatal(err)
				}
				got := rec.Wait(mark, func(q sim.Packet) bool {
					return q.Src == dst && q.Dst == src && q.Flags&sim.TCPRst != 0
				}, time.Second)
				return len(got) > 0
			}
			args := append(slices.Clone(injectorArgs), "--backend", backend, "--netns", p.NS.Path())
			if out, code := runInitEnv(t, bin, nil, args...); code != 0 {
				t.Fatalf("exit %d: %s", code, out)
			}
			// Strict tracking: a mid-stream segment of no known
			// connection is INVALID rather than picked up.
			nstest.Sysctl(t, p.NS, "net.netfilter.nf_conntrack_tcp_loose", "0")
			if !resets() {
				t.Fatal("control: without --drop-invalid the pod must answer the lone ACK with a reset")
			}
			if out, code := runInitEnv(t, bin, nil, append(args, "--drop-invalid")...); code != 0 {
				t.Fatalf("--drop-invalid: exit %d: %s", code, out)
			}
			if resets() {
				t.Error("--drop-invalid: the INVALID segment reached the stack (a reset came back)")
			}
			// A real connection still works (captured inbound).
			if r := parseReply(t, nstest.MustDial(t, p.World, 0, 0, "tcp", nstest.PodIPv4.String()+":8080")); r.Kind != "proxy" || r.Port != 15006 {
				t.Errorf("--drop-invalid: a new inbound connection: want the inbound port 15006, got %+v", r)
			}
			// INVALID_DROP, Istio's older variable, turns it on too.
			if out, code := runInitEnv(t, bin, []string{"INVALID_DROP=true"}, append(args, "--dry-run")...); code != 0 || !strings.Contains(out, "ISTIO_DROP") {
				t.Errorf("INVALID_DROP=true: exit %d, dry run lacks ISTIO_DROP:\n%s", code, out)
			}
		})
	}
}

// serveTransparent listens on port in n with IP_TRANSPARENT, as Envoy's
// inbound listener does in TPROXY mode, and answers each connection with
// "local=<its local address> remote=<its peer>".
func serveTransparent(t *testing.T, n ns.NetNS, port int) {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1) })
		if err != nil {
			return err
		}
		return serr
	}}
	var l net.Listener
	err := n.Do(func(ns.NetNS) error {
		var err error
		l, err = lc.Listen(context.Background(), "tcp4", net.JoinHostPort("0.0.0.0", strconv.Itoa(port)))
		return err
	})
	if err != nil {
		t.Fatalf("transparent listener: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "local=%s remote=%s\n", c.LocalAddr(), c.RemoteAddr())
			c.Close()
		}
	}()
}

// dialFrom connects from n to addr and returns the first line answered.
func dialFrom(t *testing.T, n ns.NetNS, addr string) (string, error) {
	t.Helper()
	var line string
	err := n.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		if err := c.SetDeadline(time.Now().Add(2 * time.Second)); err != nil {
			return err
		}
		b, err := bufio.NewReader(c).ReadString('\n')
		line = strings.TrimSpace(b)
		return err
	})
	return line, err
}

// TestEgressInitTPROXY: with -m TPROXY, an inbound connection reaches the
// proxy's transparent listener on 15006 with its original destination as
// the socket's local address and the client's address as its peer (the
// source is preserved), both for the pod's own address and for an
// address the pod does not hold (delivered by the fwmark route table);
// --cleanup-only removes the rules and the policy route. For each backend.
func TestEgressInitTPROXY(t *testing.T) {
	nstest.RequirePrivileged(t)
	bin := buildEgressInit(t)
	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		t.Run(backend, func(t *testing.T) {
			p := nstest.NewPod(t, nstest.PodOptions{})
			far := "198.51.100.77"
			nstest.Route(t, p.World, netip.MustParsePrefix(far+"/32"), nstest.PodIPv4)
			serveTransparent(t, p.NS, 15006)
			if _, err := dialFrom(t, p.World, nstest.PodIPv4.String()+":8080"); err == nil {
				t.Fatal("control: before egress-init nothing listens on 8080")
			}
			args := []string{"istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-x", "",
				"-b", "*", "-d", "15090,15021", "--backend", backend, "--netns", p.NS.Path()}
			if out, code := runInitEnv(t, bin, nil, args...); code != 0 {
				t.Fatalf("exit %d: %s", code, out)
			}
			for _, dst := range []string{nstest.PodIPv4.String() + ":8080", far + ":80"} {
				line, err := dialFrom(t, p.World, dst)
				if err != nil {
					t.Fatalf("to %s: %v", dst, err)
				}
				want := "local=" + dst + " remote=" + nstest.WorldIPv4.String() + ":"
				if !strings.HasPrefix(line, want) {
					t.Errorf("to %s: got %q, want the original destination and the client's source (%s...)", dst, line, want)
				}
			}
			rules4, _ := nstest.Exec(p.NS, "ip", "-4", "rule", "list")
			if !strings.Contains(rules4, "fwmark 0x539 lookup 133") {
				t.Errorf("no policy rule fwmark 1337 lookup 133:\n%s", rules4)
			}
			// --check covers the policy route too.
			check := append(slices.Clone(args), "--check")
			if out, code := runInitEnv(t, bin, nil, check...); code != 0 {
				t.Errorf("--check after apply: exit %d: %s", code, out)
			}
			nstest.MustExec(t, p.NS, "ip", "-4", "route", "flush", "table", "133")
			if out, code := runInitEnv(t, bin, nil, check...); code != 1 || !strings.Contains(out, "table 133") {
				t.Errorf("--check without the route: exit %d, want 1 naming table 133: %s", code, out)
			}
			if out, code := runInitEnv(t, bin, nil, args...); code != 0 {
				t.Fatalf("re-apply: exit %d: %s", code, out)
			}
			if out, code := runInitEnv(t, bin, nil, "--cleanup-only", "--netns", p.NS.Path()); code != 0 {
				t.Fatalf("--cleanup-only: exit %d: %s", code, out)
			}
			if rules4, _ := nstest.Exec(p.NS, "ip", "-4", "rule", "list"); strings.Contains(rules4, "lookup 133") {
				t.Errorf("--cleanup-only left the policy rule:\n%s", rules4)
			}
			if _, err := dialFrom(t, p.World, far+":80"); err == nil {
				t.Error("after --cleanup-only the far address still reaches the listener")
			}
		})
	}
}
