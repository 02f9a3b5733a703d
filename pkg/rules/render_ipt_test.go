package rules

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// The -update flag rewrites golden files. It is shared with the other
// renderers' tests: whichever file runs first defines it.
func init() {
	if flag.Lookup("update") == nil {
		flag.Bool("update", false, "rewrite golden files under testdata/")
	}
}

func updateGolden() bool {
	f := flag.Lookup("update")
	if f == nil {
		return false
	}
	g, ok := f.Value.(flag.Getter)
	return ok && g.Get() == true
}

// iptLine returns the caller's line, so a failing table case names itself.
func iptLine() int {
	_, _, line, _ := runtime.Caller(1)
	return line
}

func mustPrefixes(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(s))
	for i, p := range s {
		out[i] = netip.MustParsePrefix(p)
	}
	return out
}

// iptGoldenCases are the configs rendered to testdata/ipt/NAME.golden.
func iptGoldenCases() []struct {
	name string
	line int
	cfg  func(*Config)
} {
	return []struct {
		name string
		line int
		cfg  func(*Config)
	}{
		{"istio-defaults", iptLine(), func(*Config) {}},
		{"exclusions", iptLine(), func(c *Config) {
			c.OutboundExcludeCIDRs = mustPrefixes("10.96.0.0/12", "169.254.169.254/32", "fd00:10:96::/112", "2001:db8::/32")
			c.OutboundExcludePorts = []PortRange{{22, 22}, {9000, 9100}}
			c.InboundExcludePorts = append(c.InboundExcludePorts, PortRange{8443, 8443})
		}},
		{"include-only-cidrs", iptLine(), func(c *Config) {
			c.OutboundIncludeAll = false
			c.OutboundIncludeCIDRs = mustPrefixes("10.0.0.0/8", "172.16.0.0/12", "fd00::/8")
			c.OutboundExcludeCIDRs = mustPrefixes("10.0.0.10/32")
		}},
		{"ports-and-ranges", iptLine(), func(c *Config) {
			c.OutboundIncludePorts = []PortRange{{80, 80}, {8000, 8080}}
			c.OutboundExcludePorts = []PortRange{{3306, 3306}, {9000, 9100}}
			c.InboundExcludePorts = []PortRange{{15020, 15021}, {15090, 15090}}
		}},
		{"inbound-include-ports", iptLine(), func(c *Config) {
			c.InboundIncludeAll = false
			c.InboundIncludePorts = []PortRange{{80, 80}, {8080, 8090}}
			c.InboundExcludePorts = nil
		}},
		{"no-inbound", iptLine(), func(c *Config) {
			c.InboundIncludeAll = false
			c.InboundExcludePorts = nil
		}},
		{"ipv6-only", iptLine(), func(c *Config) {
			c.Families = IPv6Only
			c.OutboundExcludeCIDRs = mustPrefixes("::1.2.3.4/128", "::ffff:10.0.0.0/104", "2001:db8:0:0:1::/80")
		}},
		{"ipv4-only", iptLine(), func(c *Config) {
			c.Families = IPv4Only
			c.OutboundExcludeCIDRs = mustPrefixes("192.168.0.0/16")
		}},
		{"dns-capture", iptLine(), func(c *Config) {
			c.RedirectDNS = true
		}},
		// Istio's per-nameserver DNS, with the raw-table zones.
		{"dns-nameservers", iptLine(), func(c *Config) {
			c.RedirectDNS, c.CaptureAllDNS = true, false
			c.DNSServers = []netip.Addr{netip.MustParseAddr("127.0.0.53"), netip.MustParseAddr("2001:db8::53")}
		}},
		// TPROXY mode (mangle), with excluded inbound ports and interfaces.
		{"tproxy", iptLine(), func(c *Config) {
			c.Mode = ModeTPROXY
			c.ExcludeInterfaces = []string{"eth1"}
			c.DropInvalid = true
		}},
		{"tproxy-ports", iptLine(), func(c *Config) {
			c.Mode = ModeTPROXY
			c.InboundIncludeAll, c.InboundIncludePorts, c.InboundExcludePorts = false, []PortRange{{8080, 8080}, {9000, 9001}}, nil
		}},
		// mangle (--drop-invalid), owner groups, -k and the loopback CIDR.
		{"drop-invalid-groups-virt", iptLine(), func(c *Config) {
			c.DropInvalid = true
			c.OwnerGroupsInclude = []uint32{1001, 202}
			c.RerouteVirtualInterfaces = []string{"vm0"}
			lo := netip.MustParsePrefix("127.0.0.0/8")
			c.IPv4LoopbackCIDR = &lo
		}},
		{"exclude-interfaces", iptLine(), func(c *Config) {
			c.ExcludeInterfaces = []string{"eth1", "net1"}
		}},
		{"uid-only-custom-ports", iptLine(), func(c *Config) {
			c.ProxyPort, c.InboundPort, c.InboundTunnelPort = 16001, 16006, 16008
			c.ProxyUIDs, c.ProxyGIDs = []uint32{1337, 2000}, nil
		}},
	}
}

func iptGoldenRuleset(t testing.TB, mod func(*Config)) *Ruleset {
	t.Helper()
	cfg := DefaultConfig()
	mod(&cfg)
	rs, err := Build(cfg)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return rs
}

func TestRenderIPTablesGolden(t *testing.T) {
	for _, tc := range iptGoldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			rs := iptGoldenRuleset(t, tc.cfg)
			got, err := renderIPTables(rs)
			if err != nil {
				t.Fatalf("line %d: render: %v", tc.line, err)
			}
			if s := RenderIPTables(rs); s != got {
				t.Errorf("line %d: RenderIPTables differs from renderIPTables", tc.line)
			}
			path := filepath.Join("testdata", "ipt", tc.name+".golden")
			if updateGolden() {
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

// The lines that must match iptables-save exactly. Each was checked
// against iptables-save and ip6tables-save 1.8.9, both flavours.
func TestRenderIPTablesCanonicalLines(t *testing.T) {
	rs := iptGoldenRuleset(t, func(c *Config) { c.OutboundIncludePorts = []PortRange{{8000, 8080}} })
	v4, err := RenderIPTablesFamily(rs, FamilyIPv4)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{
		"-A PREROUTING -p tcp -m comment --comment egress-cni -j ISTIO_INBOUND",
		"-A OUTPUT -m comment --comment egress-cni -j ISTIO_OUTPUT",
		"-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
		"-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
		"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
		"-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
		"-A ISTIO_OUTPUT -p tcp -m tcp --dport 8000:8080 -j ISTIO_REDIRECT",
		"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
		"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
	} {
		if !strings.Contains(v4, l+"\n") {
			t.Errorf("IPv4 render lacks %q:\n%s", l, v4)
		}
	}
	v6, err := RenderIPTablesFamily(rs, FamilyIPv6)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{
		"-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN",
		"-A ISTIO_OUTPUT -d ::1/128 -j RETURN",
	} {
		if !strings.Contains(v6, l+"\n") {
			t.Errorf("IPv6 render lacks %q:\n%s", l, v6)
		}
	}
	if strings.Contains(v6, "127.0.0.") || strings.Contains(v4, "::") {
		t.Errorf("a family's rule leaked into the other:\nv4:\n%s\nv6:\n%s", v4, v6)
	}
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
	rs := iptGoldenRuleset(t, func(*Config) {})
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
