package rules

import (
	"bytes"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// The -update flag rewrites golden files; it is shared with the other
// renderers' tests, whichever file's init runs first defines it.
func init() {
	if flag.Lookup("update") == nil {
		flag.Bool("update", false, "rewrite golden files under testdata/")
	}
}

func nftUpdate() bool {
	f := flag.Lookup("update")
	if f == nil {
		return false
	}
	g, ok := f.Value.(flag.Getter)
	return ok && g.Get() == true
}

func nftLine() int {
	_, _, line, _ := runtime.Caller(1)
	return line
}

func nftPrefixes(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(s))
	for i, p := range s {
		out[i] = netip.MustParsePrefix(p)
	}
	return normalizePrefixes(out)
}

type nftGoldenCase struct {
	name string
	line int
	cfg  func(*Config)
}

// nftGoldenCases are rendered to testdata/nft/NAME.golden, and applied in
// a fresh netns by the privileged tests.
func nftGoldenCases() []nftGoldenCase {
	return []nftGoldenCase{
		{"istio-defaults", nftLine(), func(*Config) {}},
		{"exclusions", nftLine(), func(c *Config) {
			// Overlapping (10.1/16 in 10/8), adjacent (12/8 and 13/8),
			// and reaching the top of the address space.
			c.OutboundExcludeCIDRs = nftPrefixes(
				"10.0.0.0/8", "10.1.0.0/16", "12.0.0.0/8", "13.0.0.0/8", "169.254.169.254/32", "255.255.255.0/24",
				"fd00::/8", "fd00:1::/32", "2001:db8::/32", "ffff::/16")
			c.OutboundExcludePorts = []PortRange{{22, 22}, {9000, 9100}, {9050, 9200}, {65000, 65535}}
			c.InboundExcludePorts = append(c.InboundExcludePorts, PortRange{8443, 8443})
		}},
		{"exclude-everything", nftLine(), func(c *Config) {
			c.OutboundExcludeCIDRs = nftPrefixes("0.0.0.0/0", "10.0.0.0/8", "::/0")
		}},
		{"include-only-cidrs", nftLine(), func(c *Config) {
			c.OutboundIncludeAll = false
			c.OutboundIncludeCIDRs = nftPrefixes("10.0.0.0/8", "172.16.0.0/12", "fd00::/8")
			c.OutboundExcludeCIDRs = nftPrefixes("10.0.0.10/32")
		}},
		{"ports-and-ranges", nftLine(), func(c *Config) {
			c.OutboundIncludePorts = []PortRange{{80, 80}, {8000, 8080}}
			c.OutboundExcludePorts = []PortRange{{3306, 3306}, {9000, 9100}}
			c.InboundExcludePorts = []PortRange{{15020, 15021}, {15090, 15090}}
		}},
		{"inbound-include-ports", nftLine(), func(c *Config) {
			c.InboundIncludeAll = false
			c.InboundIncludePorts = []PortRange{{80, 80}, {8080, 8090}}
			c.InboundExcludePorts = nil
		}},
		{"no-inbound", nftLine(), func(c *Config) {
			c.InboundIncludeAll = false
			c.InboundExcludePorts = nil
		}},
		{"ipv6-only", nftLine(), func(c *Config) {
			c.Families = IPv6Only
			c.OutboundExcludeCIDRs = nftPrefixes("::1.2.3.4/128", "::ffff:10.0.0.0/104", "2001:db8:0:0:1::/80")
		}},
		{"ipv4-only", nftLine(), func(c *Config) {
			c.Families = IPv4Only
			c.OutboundExcludeCIDRs = nftPrefixes("192.168.0.0/16")
		}},
		{"dns-capture", nftLine(), func(c *Config) {
			c.RedirectDNS = true
		}},
		// Istio's per-nameserver DNS, with the raw-table zones.
		{"dns-nameservers", nftLine(), func(c *Config) {
			c.RedirectDNS, c.CaptureAllDNS = true, false
			c.DNSServers = []netip.Addr{netip.MustParseAddr("127.0.0.53"), netip.MustParseAddr("2001:db8::53")}
		}},
		// TPROXY mode (mangle), with excluded inbound ports and interfaces.
		{"tproxy", nftLine(), func(c *Config) {
			c.Mode = ModeTPROXY
			c.ExcludeInterfaces = []string{"eth1"}
			c.DropInvalid = true
		}},
		{"tproxy-ports", nftLine(), func(c *Config) {
			c.Mode = ModeTPROXY
			c.InboundIncludeAll, c.InboundIncludePorts, c.InboundExcludePorts = false, []PortRange{{8080, 8080}, {9000, 9001}}, nil
		}},
		// mangle (--drop-invalid), owner groups, -k and the loopback CIDR.
		{"drop-invalid-groups-virt", nftLine(), func(c *Config) {
			c.DropInvalid = true
			c.OwnerGroupsInclude = []uint32{1001, 202}
			c.RerouteVirtualInterfaces = []string{"vm0"}
			lo := netip.MustParsePrefix("127.0.0.0/8")
			c.IPv4LoopbackCIDR = &lo
		}},
		{"exclude-interfaces", nftLine(), func(c *Config) {
			c.ExcludeInterfaces = []string{"eth1", "net1"}
		}},
		{"uid-only-custom-ports", nftLine(), func(c *Config) {
			c.ProxyPort, c.InboundPort, c.InboundTunnelPort = 16001, 16006, 16008
			c.ProxyUIDs, c.ProxyGIDs = []uint32{1337, 2000}, nil
		}},
	}
}

func nftRuleset(t testing.TB, mod func(*Config)) *Ruleset {
	t.Helper()
	cfg := DefaultConfig()
	mod(&cfg)
	rs, err := Build(cfg)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return rs
}

func TestRenderNFTGolden(t *testing.T) {
	for _, tc := range nftGoldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			rs := nftRuleset(t, tc.cfg)
			got := RenderNFT(rs)
			if again := RenderNFT(rs); again != got {
				t.Fatalf("line %d: RenderNFT is not deterministic", tc.line)
			}
			if _, err := nftObjectsFor(rs); err != nil {
				t.Fatalf("line %d: nftObjectsFor: %v", tc.line, err)
			}
			path := filepath.Join("testdata", "nft", tc.name+".golden")
			if nftUpdate() {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("line %d: %v (run with -update to create it)", tc.line, err)
			}
			if diff := cmp.Diff(string(want), got); diff != "" {
				t.Errorf("line %d: %s differs (-want +got):\n%s", tc.line, path, diff)
			}
		})
	}
}

// TestRenderNFTAcceptedByNft feeds every golden ruleset to `nft -c -f -`
// (check only, nothing is committed), inside a new user and network
// namespace so that it needs no root and cannot touch the host.
func TestRenderNFTAcceptedByNft(t *testing.T) {
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Skip("nft binary not installed")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("unshare not installed")
	}
	if out, err := exec.Command(unshare, "-rn", "true").CombinedOutput(); err != nil {
		t.Skipf("cannot create a user+network namespace: %v: %s", err, out)
	}
	for _, tc := range nftGoldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			rs := nftRuleset(t, tc.cfg)
			cmd := exec.Command(unshare, "-rn", nft, "-c", "-f", "-")
			cmd.Stdin = strings.NewReader(RenderNFT(rs))
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("line %d: nft -c rejected the ruleset: %v\n%s\n%s", tc.line, err, out, RenderNFT(rs))
			}
		})
	}
}

func TestMergePrefixes(t *testing.T) {
	for _, tc := range []struct {
		line int
		in   []string
		want []string
	}{
		{nftLine(), nil, nil},
		{nftLine(), []string{"10.0.0.0/8", "10.1.0.0/16"}, []string{"10.0.0.0/8"}},
		{nftLine(), []string{"10.0.0.0/25", "10.0.0.128/25"}, []string{"10.0.0.0/24"}},
		{nftLine(), []string{"10.0.0.0/8", "11.0.0.0/8"}, []string{"10.0.0.0/7"}},
		{nftLine(), []string{"11.0.0.0/8", "12.0.0.0/8"}, []string{"11.0.0.0-12.255.255.255"}},
		{nftLine(), []string{"10.0.0.1/32", "10.0.0.3/32"}, []string{"10.0.0.1", "10.0.0.3"}},
		{nftLine(), []string{"0.0.0.0/0", "10.0.0.0/8"}, []string{"0.0.0.0/0"}},
		{nftLine(), []string{"255.255.255.255/32", "255.255.255.0/24"}, []string{"255.255.255.0/24"}},
		{nftLine(), []string{"::/0"}, []string{"::/0"}},
		{nftLine(), []string{"ffff::/16", "fd00::/8", "fd00:1::/32"}, []string{"fd00::/8", "ffff::/16"}},
	} {
		var got []string
		for _, r := range mergePrefixes(nftPrefixes(tc.in...)) {
			got = append(got, r.String())
		}
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("line %d: (-want +got):\n%s", tc.line, diff)
		}
	}
}

func TestMergePorts(t *testing.T) {
	got := mergePorts([]PortRange{{9050, 9200}, {22, 22}, {9000, 9100}, {23, 23}, {65000, 65535}, {65535, 65535}})
	want := []PortRange{{22, 23}, {9000, 9200}, {65000, 65535}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// TestNFTSetElements checks the interval encoding, and that decoding it
// (as Check does with the kernel's readback, in any order) gives back the
// rendered elements.
func TestNFTSetElements(t *testing.T) {
	type el struct {
		key string
		end bool
	}
	for _, tc := range []struct {
		line int
		set  *Set
		want []el
	}{
		{nftLine(), &Set{Type: SetIPv4, Prefixes: nftPrefixes("10.0.0.0/8", "192.168.0.0/16")},
			[]el{{"00000000", true}, {"0a000000", false}, {"0b000000", true}, {"c0a80000", false}, {"c0a90000", true}}},
		// Reaching the top: no end element.
		{nftLine(), &Set{Type: SetIPv4, Prefixes: nftPrefixes("255.255.255.0/24")},
			[]el{{"00000000", true}, {"ffffff00", false}}},
		// Everything: a single start at zero, no leading end marker.
		{nftLine(), &Set{Type: SetIPv4, Prefixes: nftPrefixes("0.0.0.0/0")},
			[]el{{"00000000", false}}},
		{nftLine(), &Set{Type: SetIPv6, Prefixes: nftPrefixes("::/0")},
			[]el{{"00000000000000000000000000000000", false}}},
		{nftLine(), &Set{Type: SetIPv6, Prefixes: nftPrefixes("ffff::/16")},
			[]el{{"00000000000000000000000000000000", true}, {"ffff0000000000000000000000000000", false}}},
		{nftLine(), &Set{Type: SetPorts, Ports: []PortRange{{53, 53}, {1000, 2000}, {65535, 65535}}},
			[]el{{"0000", true}, {"0035", false}, {"0036", true}, {"03e8", false}, {"07d1", true}, {"ffff", false}}},
	} {
		elems := nftSetElements(tc.set)
		var got []el
		for _, e := range elems {
			got = append(got, el{fmt.Sprintf("%x", e.Key), e.IntervalEnd})
		}
		if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(el{})); diff != "" {
			t.Errorf("line %d: elements (-want +got):\n%s", tc.line, diff)
		}
		// Reverse, as the rbtree dumps them.
		rev := make([]nftables.SetElement, len(elems))
		for i, e := range elems {
			rev[len(elems)-1-i] = e
		}
		if diff := cmp.Diff(nftSetElementTexts(tc.set), nftElementTexts(tc.set.Type, rev)); diff != "" {
			t.Errorf("line %d: decoded elements (-want +got):\n%s", tc.line, diff)
		}
	}
}

func TestNFTRuleComments(t *testing.T) {
	rs := nftRuleset(t, func(c *Config) { c.RedirectDNS = true; c.ExcludeInterfaces = []string{"eth1"} })
	objs, err := nftObjectsFor(rs)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range objs.Rules {
		got = append(got, r.Chain.Name+": "+nftRuleCommentOf(r.UserData))
	}
	for _, want := range []string{
		`prerouting: iifname eth1 return`,
		`prerouting: meta l4proto tcp jump ISTIO_INBOUND`,
		`ISTIO_OUTPUT: oifname lo ip saddr 127.0.0.6 return`,
		// With DNS capture, port 53 is kept apart in the owner rules and
		// the redirects sit in ISTIO_OUTPUT_DNS, as in istio-iptables.
		`ISTIO_OUTPUT: oifname lo ip6 daddr != ::1 tcp dport != 53 tcp dport != 15008 meta skuid 1337 jump ISTIO_IN_REDIRECT`,
		`ISTIO_OUTPUT: oifname lo ip6 daddr != ::1 tcp dport != 15008 meta skgid 1337 jump ISTIO_IN_REDIRECT`,
		`ISTIO_OUTPUT: oifname lo tcp dport != 53 meta skgid != 1337 return`,
		`ISTIO_OUTPUT: jump ISTIO_OUTPUT_DNS`,
		`ISTIO_OUTPUT_DNS: udp dport 53 redirect to :15053`,
		`ISTIO_REDIRECT: meta l4proto tcp redirect to :15001`,
	} {
		found := false
		for _, g := range got {
			found = found || g == want
		}
		if !found {
			t.Errorf("no rule %q in\n%s", want, strings.Join(got, "\n"))
		}
	}
	// RenderNFT carries the same comments.
	text := RenderNFT(rs)
	for _, r := range objs.Rules {
		if c := nftRuleCommentOf(r.UserData); !strings.Contains(text, ` comment "`+c+`"`+"\n") {
			t.Errorf("comment %q is not in RenderNFT", c)
		}
	}
}

// TestNFTExprsInetFamily checks that in an inet table every rule that
// matches an IPv4 or IPv6 header checks meta nfproto first.
func TestNFTExprsInetFamily(t *testing.T) {
	rs := nftRuleset(t, func(c *Config) {
		c.OutboundExcludeCIDRs = nftPrefixes("10.0.0.0/8", "fd00::/8", "10.0.0.0/20")
	})
	objs, err := nftObjectsFor(rs)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range objs.Rules {
		c := nftRuleCommentOf(r.UserData)
		if !strings.Contains(c, "ip daddr") && !strings.Contains(c, "ip saddr") &&
			!strings.Contains(c, "ip6 daddr") && !strings.Contains(c, "ip6 saddr") {
			continue
		}
		i := 0
		if strings.HasPrefix(c, "oifname") {
			i = 2 // nft checks the interface first
		}
		if m, ok := r.Exprs[i].(*expr.Meta); !ok || m.Key != expr.MetaKeyNFPROTO {
			var b bytes.Buffer
			for _, e := range r.Exprs {
				fmt.Fprintf(&b, "%T%+v\n", e, e)
			}
			t.Errorf("rule %q does not start with meta nfproto:\n%s", c, b.String())
		}
	}
}

func BenchmarkBuildRenderNFT(b *testing.B) {
	cfg := DefaultConfig()
	cfg.OutboundExcludeCIDRs = nftSpreadCIDRs(10000)
	b.ReportAllocs()
	for b.Loop() {
		rs, err := Build(cfg)
		if err != nil {
			b.Fatal(err)
		}
		_ = RenderNFT(rs)
		if _, err := nftObjectsFor(rs); err != nil {
			b.Fatal(err)
		}
	}
}

// nftSpreadCIDRs returns n IPv4 host routes that do not merge (every other
// address of 10.0.0.0/8), so the set really holds n intervals.
func nftSpreadCIDRs(n int) []netip.Prefix {
	out := make([]netip.Prefix, 0, n)
	for i := range n {
		v := uint32(10)<<24 | uint32(2*i)
		a := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
		out = append(out, netip.PrefixFrom(a, 32))
	}
	return out
}
