package rules

import (
	"bytes"
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// TestRenderNFTAcceptedByNft feeds every golden ruleset to `nft -c -f -`
// (check only, nothing is committed), inside a new user and network
// namespace so that it needs no root and cannot touch the host.
func TestRenderNFTAcceptedByNft(t *testing.T) {
	nft := lookPathOrSkip(t, "nft")
	unshare := lookPathOrSkip(t, "unshare")
	if out, err := exec.Command(unshare, "-rn", "true").CombinedOutput(); err != nil {
		t.Skipf("cannot create a user+network namespace: %v: %s", err, out)
	}
	for _, tc := range goldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			rs := goldenRuleset(t, tc.cfg)
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
		{goldenLine(), nil, nil},
		{goldenLine(), []string{"10.0.0.0/8", "10.1.0.0/16"}, []string{"10.0.0.0/8"}},
		{goldenLine(), []string{"10.0.0.0/25", "10.0.0.128/25"}, []string{"10.0.0.0/24"}},
		{goldenLine(), []string{"10.0.0.0/8", "11.0.0.0/8"}, []string{"10.0.0.0/7"}},
		{goldenLine(), []string{"11.0.0.0/8", "12.0.0.0/8"}, []string{"11.0.0.0-12.255.255.255"}},
		{goldenLine(), []string{"10.0.0.1/32", "10.0.0.3/32"}, []string{"10.0.0.1", "10.0.0.3"}},
		{goldenLine(), []string{"0.0.0.0/0", "10.0.0.0/8"}, []string{"0.0.0.0/0"}},
		{goldenLine(), []string{"255.255.255.255/32", "255.255.255.0/24"}, []string{"255.255.255.0/24"}},
		{goldenLine(), []string{"::/0"}, []string{"::/0"}},
		{goldenLine(), []string{"ffff::/16", "fd00::/8", "fd00:1::/32"}, []string{"fd00::/8", "ffff::/16"}},
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
		{goldenLine(), &Set{Type: SetIPv4, Prefixes: nftPrefixes("10.0.0.0/8", "192.168.0.0/16")},
			[]el{{"00000000", true}, {"0a000000", false}, {"0b000000", true}, {"c0a80000", false}, {"c0a90000", true}}},
		// Reaching the top: no end element.
		{goldenLine(), &Set{Type: SetIPv4, Prefixes: nftPrefixes("255.255.255.0/24")},
			[]el{{"00000000", true}, {"ffffff00", false}}},
		// Everything: a single start at zero, no leading end marker.
		{goldenLine(), &Set{Type: SetIPv4, Prefixes: nftPrefixes("0.0.0.0/0")},
			[]el{{"00000000", false}}},
		{goldenLine(), &Set{Type: SetIPv6, Prefixes: nftPrefixes("::/0")},
			[]el{{"00000000000000000000000000000000", false}}},
		{goldenLine(), &Set{Type: SetIPv6, Prefixes: nftPrefixes("ffff::/16")},
			[]el{{"00000000000000000000000000000000", true}, {"ffff0000000000000000000000000000", false}}},
		{goldenLine(), &Set{Type: SetPorts, Ports: []PortRange{{53, 53}, {1000, 2000}, {65535, 65535}}},
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
	rs := goldenRuleset(t, func(c *Config) { c.RedirectDNS = true; c.ExcludeInterfaces = []string{"eth1"} })
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
	rs := goldenRuleset(t, func(c *Config) {
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

// BenchmarkRenderNFT10k renders the netlink objects (what Apply sends)
// and the nft text (what dry runs and Check use).
func BenchmarkRenderNFT10k(b *testing.B) {
	rs := goldenRuleset(b, func(c *Config) { c.OutboundExcludeCIDRs = nftSpreadCIDRs(10000) })
	b.ReportAllocs()
	for b.Loop() {
		if _, err := nftObjectsFor(rs); err != nil {
			b.Fatal(err)
		}
		_ = RenderNFT(rs)
	}
}

// checkNFTRendering is FuzzConfig's nftables check: the rendering holds
// our table.
func checkNFTRendering(t *testing.T, rs *Ruleset) {
	t.Helper()
	if out := RenderNFT(rs); !strings.Contains(out, NFTTable) {
		t.Fatalf("nft rendering lacks the table:\n%s", out)
	}
}
