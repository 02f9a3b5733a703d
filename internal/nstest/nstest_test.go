package nstest_test

import (
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

func TestMain(m *testing.M) { nstest.Main(m) }

func hostPort(a netip.Addr, port uint16) string {
	return netip.AddrPortFrom(a, port).String()
}

func parse(t *testing.T, s string) nstest.Reply {
	t.Helper()
	r, err := nstest.ParseReply(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestParseReply(t *testing.T) {
	r, err := nstest.ParseReply("proxy:15001 orig=[2001:db8:2::10]:80 src=[::1]:4242")
	if err != nil {
		t.Fatal(err)
	}
	want := nstest.Reply{
		Kind: nstest.KindProxy, Port: 15001,
		Orig: netip.MustParseAddrPort("[2001:db8:2::10]:80"),
		Src:  netip.MustParseAddrPort("[::1]:4242"),
	}
	if r != want {
		t.Errorf("got %+v, want %+v", r, want)
	}
	r, err = nstest.ParseReply("direct src=192.0.2.2:5000 dst=203.0.113.10:80")
	if err != nil || r.Kind != nstest.KindDirect || r.Src.Addr() != nstest.PodIPv4 || r.Dst.Port() != 80 {
		t.Errorf("got %+v, %v", r, err)
	}
	if _, err := nstest.ParseReply("hello"); err == nil {
		t.Error("ParseReply accepted garbage")
	}
}

// TestPodTopology checks that the pod reaches the "internet" addresses,
// over TCP and UDP, v4 and v6, as root and as an unprivileged user, and
// that the world sees the pod's own address.
func TestPodTopology(t *testing.T) {
	nstest.RequirePrivileged(t)
	p := nstest.NewPod(t, nstest.PodOptions{})
	for _, a := range []netip.Addr{nstest.InternetIPv4, nstest.InternetIPv6} {
		nstest.ServeEcho(t, p.World, hostPort(a, 80))
	}
	for _, tc := range []struct {
		network string
		dst     netip.Addr
		src     netip.Addr
	}{
		{"tcp", nstest.InternetIPv4, nstest.PodIPv4},
		{"tcp", nstest.InternetIPv6, nstest.PodIPv6},
		{"udp", nstest.InternetIPv4, nstest.PodIPv4},
		{"udp", nstest.InternetIPv6, nstest.PodIPv6},
		{"tcp", nstest.WorldIPv4, nstest.PodIPv4},
	} {
		for _, uid := range []uint32{0, 1000} {
			addr := hostPort(tc.dst, 80)
			if tc.dst == nstest.WorldIPv4 {
				// Nothing listens on the world's veth address.
				if _, err := nstest.Dial(t, p.NS, uid, uid, tc.network, addr); !isKind(err, "refused") {
					t.Errorf("dial %s as %d: got %v, want refused", addr, uid, err)
				}
				continue
			}
			r := parse(t, nstest.MustDial(t, p.NS, uid, uid, tc.network, addr))
			if r.Kind != nstest.KindDirect || r.Src.Addr() != tc.src || r.Dst.Addr() != tc.dst {
				t.Errorf("%s %s as %d: got %+v, want direct from %s", tc.network, addr, uid, r, tc.src)
			}
		}
	}
	// A wildcard UDP server answers from the address it was sent to, so
	// the connected client accepts the reply.
	nstest.ServeEcho(t, p.World, ":5353")
	for _, a := range []netip.Addr{nstest.InternetIPv4, nstest.InternetIPv6} {
		r := parse(t, nstest.MustDial(t, p.NS, 1000, 1000, "udp", hostPort(a, 5353)))
		if r.Kind != nstest.KindDirect || r.Dst != netip.AddrPortFrom(a, 5353) {
			t.Errorf("udp to wildcard server at %s: got %+v", a, r)
		}
	}
	// The world has no route anywhere but the link and its loopback.
	if _, err := nstest.Exec(p.World, "ip", "route", "get", "198.51.100.1"); err == nil {
		t.Error("world namespace has a route to 198.51.100.1")
	}
}

func isKind(err error, kind string) bool {
	var de *nstest.DialError
	return errors.As(err, &de) && de.Kind == kind
}

// TestProxyAndCredentials redirects only UID 1000's TCP with a
// hand-written nft rule: the proxy must see the original destination,
// and UID 1001 must not be redirected. This checks the child's
// credentials and SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST at once.
func TestProxyAndCredentials(t *testing.T) {
	nstest.RequirePrivileged(t)
	p := nstest.NewPod(t, nstest.PodOptions{})
	nstest.ServeProxy(t, p.NS, 15001)
	for _, a := range []netip.Addr{nstest.InternetIPv4, nstest.InternetIPv6} {
		nstest.ServeEcho(t, p.World, hostPort(a, 80))
	}
	ruleset := `table inet nstest {
	chain out {
		type nat hook output priority -100; policy accept;
		meta skuid 1000 meta l4proto tcp redirect to :15001
		meta skgid 2337 meta l4proto tcp redirect to :15001
	}
}
`
	if _, err := execStdin(p, ruleset); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{nstest.InternetIPv4, nstest.InternetIPv6} {
		dst := hostPort(a, 80)
		for _, id := range []struct {
			uid, gid uint32
			proxied  bool
		}{{1000, 1000, true}, {1001, 1001, false}, {1001, 2337, true}} {
			r := parse(t, nstest.MustDial(t, p.NS, id.uid, id.gid, "tcp", dst))
			if !id.proxied {
				if r.Kind != nstest.KindDirect {
					t.Errorf("%s as %d:%d: got %+v, want direct", dst, id.uid, id.gid, r)
				}
				continue
			}
			if r.Kind != nstest.KindProxy || r.Port != 15001 || r.Orig != netip.MustParseAddrPort(dst) {
				t.Errorf("%s as %d:%d: got %+v, want proxy:15001 orig=%s", dst, id.uid, id.gid, r, dst)
			}
		}
	}
	// UDP is not redirected by the rule above.
	r := parse(t, nstest.MustDial(t, p.NS, 1000, 1000, "udp", hostPort(nstest.InternetIPv4, 80)))
	if r.Kind != nstest.KindDirect {
		t.Errorf("udp as 1000: got %+v", r)
	}
	if d := nstest.NFTDump(t, p.NS); !strings.Contains(d, "table inet nstest") || !strings.Contains(d, "skuid 1000") {
		t.Errorf("NFTDump misses the table:\n%s", d)
	}
}

func execStdin(p *nstest.Pod, ruleset string) (string, error) {
	f, err := os.CreateTemp("", "nstest-*.nft")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(ruleset); err != nil {
		return "", err
	}
	f.Close()
	return nstest.Exec(p.NS, "nft", "-f", f.Name())
}

// TestDialSource binds the client to the pod's address, then to one the
// pod does not own: the world's answer to the spoofed source never comes
// back, so the dial times out instead of hanging.
func TestDialSource(t *testing.T) {
	nstest.RequirePrivileged(t)
	p := nstest.NewPod(t, nstest.PodOptions{})
	nstest.ServeEcho(t, p.World, hostPort(nstest.InternetIPv4, 80))
	r := parse(t, nstest.MustDial(t, p.NS, 1000, 1000, "tcp", hostPort(nstest.InternetIPv4, 80), nstest.WithSource("192.0.2.2")))
	if r.Src.Addr() != nstest.PodIPv4 {
		t.Errorf("got %+v, want src 192.0.2.2", r)
	}
	start := time.Now()
	_, err := nstest.Dial(t, p.NS, 0, 0, "tcp", hostPort(nstest.InternetIPv4, 80),
		nstest.WithSource("192.0.2.99"), nstest.WithTimeout(500*time.Millisecond))
	if !isKind(err, "timeout") {
		t.Errorf("spoofed dial as root: got %v, want a timeout", err)
	}
	_, err = nstest.Dial(t, p.NS, 1000, 1000, "tcp", hostPort(nstest.InternetIPv4, 80),
		nstest.WithSource("192.0.2.99"), nstest.WithTimeout(500*time.Millisecond))
	if !isKind(err, "unreachable") {
		t.Errorf("spoofed dial as 1000: got %v, want unreachable", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("spoofed dial took %s", d)
	}
}

// TestDumpsAndCleanup checks that fresh namespaces have empty dumps and
// that a pod's namespaces are gone once its test ends.
func TestDumpsAndCleanup(t *testing.T) {
	nstest.RequirePrivileged(t)
	var paths []string
	t.Run("pod", func(t *testing.T) {
		p := nstest.NewPod(t, nstest.PodOptions{})
		paths = append(paths, p.NS.Path(), p.World.Path())
		nstest.ServeProxy(t, p.NS, 15001)
		if d := nstest.NFTDump(t, p.NS); d != "" {
			t.Errorf("fresh namespace has nft rules:\n%s", d)
		}
		for _, f := range []string{nstest.FlavourNFT, nstest.FlavourLegacy} {
			if d := nstest.IPTSave(t, p.NS, f); d != "## ipv4\n## ipv6\n" {
				t.Errorf("fresh namespace has %s rules:\n%s", f, d)
			}
		}
		nstest.MustExec(t, p.NS, "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-d", "198.51.100.1", "-j", "RETURN")
		if d := nstest.IPTSave(t, p.NS, nstest.FlavourLegacy); !strings.Contains(d, "-A OUTPUT -d 198.51.100.1/32 -j RETURN") {
			t.Errorf("IPTSave misses the rule:\n%s", d)
		}
	})
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("namespace %s still exists after its test", p)
		}
	}
	// The proxy socket of the subtest is closed: its port is free again
	// in a new namespace, and no listener leaked into this one.
	n := nstest.NewNS(t)
	if _, err := nstest.Dial(t, n, 0, 0, "tcp", "127.0.0.1:15001"); !isKind(err, "refused") {
		t.Errorf("got %v, want refused", err)
	}
}

func TestWithoutEmptyTables(t *testing.T) {
	in := `### nft list ruleset
table ip nat {
	chain PREROUTING {
		type nat hook prerouting priority dstnat; policy accept;
	}

	chain OUTPUT {
		type nat hook output priority -100; policy accept;
	}
}
table ip6 nat {
	chain OUTPUT {
		type nat hook output priority -100; policy accept;
		counter packets 0 bytes 0 return
	}
}
table inet empty {
}
### iptables-legacy
## ipv4
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*filter
:INPUT DROP [0:0]
COMMIT
## ipv6
*nat
:PREROUTING ACCEPT [0:0]
:FOO - [0:0]
COMMIT
`
	want := `### nft list ruleset
table ip6 nat {
	chain OUTPUT {
		type nat hook output priority -100; policy accept;
		counter packets 0 bytes 0 return
	}
}
table inet empty {
}
### iptables-legacy
## ipv4
*filter
:INPUT DROP [0:0]
COMMIT
## ipv6
*nat
:PREROUTING ACCEPT [0:0]
:FOO - [0:0]
COMMIT
`
	if got := nstest.WithoutEmptyTables(in); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
}
