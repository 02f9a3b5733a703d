package rules

import (
	"net/netip"
	"strings"
	"testing"
)

// The lines that must match iptables-save exactly. Each was checked
// against iptables-save and ip6tables-save 1.8.9, both flavours.
func TestRenderIPTablesCanonicalLines(t *testing.T) {
	rs := goldenRuleset(t, func(c *Config) { c.OutboundIncludePorts = []PortRange{{8000, 8080}} })
	v4 := iptRenderHas(t, rs, FamilyIPv4,
		"-A PREROUTING -p tcp -m comment --comment egress-cni -j ISTIO_INBOUND",
		"-A OUTPUT -m comment --comment egress-cni -j ISTIO_OUTPUT",
		"-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
		"-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
		"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
		"-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
		"-A ISTIO_OUTPUT -p tcp -m tcp --dport 8000:8080 -j ISTIO_REDIRECT",
		"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
		"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001")
	v6 := iptRenderHas(t, rs, FamilyIPv6,
		"-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN",
		"-A ISTIO_OUTPUT -d ::1/128 -j RETURN")
	if strings.Contains(v6, "127.0.0.") || strings.Contains(v4, "::") {
		t.Errorf("a family's rule leaked into the other:\nv4:\n%s\nv6:\n%s", v4, v6)
	}
}

// iptRenderHas renders rs's family f and checks that it holds lines.
func iptRenderHas(t *testing.T, rs *Ruleset, f Family, lines ...string) string {
	t.Helper()
	got, err := RenderIPTablesFamily(rs, f)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range lines {
		if !strings.Contains(got, l+"\n") {
			t.Errorf("%s render lacks %q:\n%s", iptCommand(f), l, got)
		}
	}
	return got
}

func TestIPTPrefixMatchesInetNtop(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"10.1.2.3/8", "10.0.0.0/8"},
		{"0.0.0.0/0", "0.0.0.0/0"},
		{"::1.2.3.4/128", "::1.2.3.4/128"},
		{"::1:0/112", "::0.1.0.0/112"},
		{"::1/128", "::1/128"},
		{"::6/128", "::6/128"},
		{"::/0", "::/0"},
		{"::ffff:10.0.0.0/104", "::ffff:10.0.0.0/104"},
		{"::ffff:0:0/96", "::ffff:0.0.0.0/96"},
		{"2001:db8:0:0:1::/80", "2001:db8:0:0:1::/80"},
		{"1:0:2:0::/64", "1:0:2::/64"},
		{"2001:DB8::/32", "2001:db8::/32"},
		{"64:ff9b::1.2.3.0/120", "64:ff9b::102:300/120"},
	} {
		if got := iptPrefix(netip.MustParsePrefix(tc.in)); got != tc.want {
			t.Errorf("iptPrefix(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

func TestRenderIPTablesRejectsBadModel(t *testing.T) {
	rs := goldenRuleset(t, func(*Config) {})
	rs.Chain(ChainOutput).Rules = append(rs.Chain(ChainOutput).Rules, Rule{DPort: single(80), Verdict: ret()})
	if _, err := renderIPTables(rs); err == nil || !strings.Contains(err.Error(), "needs a protocol") {
		t.Errorf("want a protocol error, got %v", err)
	}
	if s := RenderIPTables(rs); !strings.Contains(s, "# error: ") {
		t.Errorf("RenderIPTables should report the error inline:\n%s", s)
	}
}

func TestIsOurEntry(t *testing.T) {
	for l, want := range map[string]bool{
		"-A OUTPUT -m comment --comment egress-cni -j RETURN":   true,
		`-A OUTPUT -m comment --comment "egress-cni" -j RETURN`: true,
		"-A OUTPUT -m comment --comment egress-cni-x -j RETURN": false,
		"-A PREROUTING -p tcp -j ISTIO_INBOUND":                 true,
		"-A OUTPUT -g ISTIO_OUTPUT":                             true,
		// ISTIO_OUTPUT_DNS is one of our nat chains since the DNS layout
		// follows Istio's (it was foreign before); ISTIO_DROP is not.
		"-A OUTPUT -j ISTIO_OUTPUT_DNS":                           true,
		"-A OUTPUT -j ISTIO_DROP":                                 false,
		"-A OUTPUT -d 198.51.100.7/32 -j ACCEPT":                  false,
		"-A OUTPUT -m comment --comment ISTIO_OUTPUT -j ACCEPT":   false,
		`-A OUTPUT -m comment --comment "a -j b" -j ISTIO_OUTPUT`: true,
		// A quoted comment is one word: one that starts with our name,
		// or names our chain, is not ours.
		`-A OUTPUT -m comment --comment "egress-cni but not ours" -j ACCEPT`: false,
		`-A OUTPUT -m comment --comment "x -j ISTIO_OUTPUT" -j ACCEPT`:       false,
		`-A OUTPUT -m comment --comment "say \"egress-cni\"" -j ACCEPT`:      false,
		`-A OUTPUT -m comment --comment "egress-cni" -g ISTIO_OUTPUT`:        true,
	} {
		if got := isOurEntry(l); got != want {
			t.Errorf("isOurEntry(%q) = %v, want %v", l, got, want)
		}
	}
}
