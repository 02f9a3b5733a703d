package rules

import (
	"flag"
	"net/netip"
	"os/exec"
	"runtime"
	"testing"
)

// The golden configs: one table, rendered by every backend to
// testdata/nft/NAME.golden and testdata/ipt/NAME.golden (TestRenderGolden),
// and applied in fresh namespaces by the privileged tests of each backend.

// The -update flag rewrites the golden files.
var update = flag.Bool("update", false, "rewrite golden files under testdata/")

func updateGolden() bool { return *update }

type goldenCase struct {
	name string
	line int // where the case is written, for failure messages
	cfg  func(*Config)
}

// goldenLine returns the caller's line, so a failing table case names itself.
func goldenLine() int {
	_, _, line, _ := runtime.Caller(1)
	return line
}

// mustPrefixes parses prefixes, in the order given.
func mustPrefixes(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(s))
	for i, p := range s {
		out[i] = netip.MustParsePrefix(p)
	}
	return out
}

// nftPrefixes parses prefixes sorted and without duplicates, as
// ParseCIDRs returns them.
func nftPrefixes(s ...string) []netip.Prefix { return normalizePrefixes(mustPrefixes(s...)) }

// lookPathOrSkip finds a binary the test needs, or skips the test.
func lookPathOrSkip(tb testing.TB, name string) string {
	tb.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		tb.Skip(name + " not installed")
	}
	return path
}

// goldenRuleset builds DefaultConfig changed by mod.
func goldenRuleset(t testing.TB, mod func(*Config)) *Ruleset {
	t.Helper()
	cfg := DefaultConfig()
	mod(&cfg)
	rs, err := Build(cfg)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return rs
}

// goldenConfig is the case named name.
func goldenConfig(t testing.TB, name string) func(*Config) {
	t.Helper()
	for _, tc := range goldenCases() {
		if tc.name == name {
			return tc.cfg
		}
	}
	t.Fatalf("no golden case %q", name)
	return nil
}

func goldenCases() []goldenCase {
	return []goldenCase{
		{"istio-defaults", goldenLine(), func(*Config) {}},
		{"exclusions", goldenLine(), func(c *Config) {
			c.OutboundExcludeCIDRs = mustPrefixes("10.96.0.0/12", "169.254.169.254/32", "fd00:10:96::/112", "2001:db8::/32")
			c.OutboundExcludePorts = []PortRange{{22, 22}, {9000, 9100}}
			c.InboundExcludePorts = append(c.InboundExcludePorts, PortRange{8443, 8443})
		}},
		{"exclusions-merged", goldenLine(), func(c *Config) {
			// Overlapping (10.1/16 in 10/8), adjacent (12/8 and 13/8),
			// and reaching the top of the address space.
			c.OutboundExcludeCIDRs = nftPrefixes(
				"10.0.0.0/8", "10.1.0.0/16", "12.0.0.0/8", "13.0.0.0/8", "169.254.169.254/32", "255.255.255.0/24",
				"fd00::/8", "fd00:1::/32", "2001:db8::/32", "ffff::/16")
			c.OutboundExcludePorts = []PortRange{{22, 22}, {9000, 9100}, {9050, 9200}, {65000, 65535}}
			c.InboundExcludePorts = append(c.InboundExcludePorts, PortRange{8443, 8443})
		}},
		{"exclude-everything", goldenLine(), func(c *Config) {
			c.OutboundExcludeCIDRs = nftPrefixes("0.0.0.0/0", "10.0.0.0/8", "::/0")
		}},
		{"include-only-cidrs", goldenLine(), func(c *Config) {
			c.OutboundIncludeAll = false
			c.OutboundIncludeCIDRs = mustPrefixes("10.0.0.0/8", "172.16.0.0/12", "fd00::/8")
			c.OutboundExcludeCIDRs = mustPrefixes("10.0.0.10/32")
		}},
		{"ports-and-ranges", goldenLine(), func(c *Config) {
			c.OutboundIncludePorts = []PortRange{{80, 80}, {8000, 8080}}
			c.OutboundExcludePorts = []PortRange{{3306, 3306}, {9000, 9100}}
			c.InboundExcludePorts = []PortRange{{15020, 15021}, {15090, 15090}}
		}},
		{"inbound-include-ports", goldenLine(), func(c *Config) {
			c.InboundIncludeAll = false
			c.InboundIncludePorts = []PortRange{{80, 80}, {8080, 8090}}
			c.InboundExcludePorts = nil
		}},
		{"no-inbound", goldenLine(), func(c *Config) {
			c.InboundIncludeAll = false
			c.InboundExcludePorts = nil
		}},
		{"ipv6-only", goldenLine(), func(c *Config) {
			c.Families = IPv6Only
			c.OutboundExcludeCIDRs = mustPrefixes("::1.2.3.4/128", "::ffff:10.0.0.0/104", "2001:db8:0:0:1::/80")
		}},
		{"ipv4-only", goldenLine(), func(c *Config) {
			c.Families = IPv4Only
			c.OutboundExcludeCIDRs = mustPrefixes("192.168.0.0/16")
		}},
		{"dns-capture", goldenLine(), func(c *Config) {
			c.RedirectDNS = true
		}},
		// Istio's per-nameserver DNS, with the raw-table zones.
		{"dns-nameservers", goldenLine(), func(c *Config) {
			c.RedirectDNS, c.CaptureAllDNS = true, false
			c.DNSServers = []netip.Addr{netip.MustParseAddr("127.0.0.53"), netip.MustParseAddr("2001:db8::53")}
		}},
		// TPROXY mode (mangle), with excluded inbound ports and interfaces.
		{"tproxy", goldenLine(), func(c *Config) {
			c.Mode = ModeTPROXY
			c.ExcludeInterfaces = []string{"eth1"}
			c.DropInvalid = true
		}},
		{"tproxy-ports", goldenLine(), func(c *Config) {
			c.Mode = ModeTPROXY
			c.InboundIncludeAll, c.InboundIncludePorts, c.InboundExcludePorts = false, []PortRange{{8080, 8080}, {9000, 9001}}, nil
		}},
		// mangle (--drop-invalid), owner groups, -k and the loopback CIDR.
		{"drop-invalid-groups-virt", goldenLine(), func(c *Config) {
			c.DropInvalid = true
			c.OwnerGroupsInclude = []uint32{1001, 202}
			c.RerouteVirtualInterfaces = []string{"vm0"}
			lo := netip.MustParsePrefix("127.0.0.0/8")
			c.IPv4LoopbackCIDR = &lo
		}},
		{"exclude-interfaces", goldenLine(), func(c *Config) {
			c.ExcludeInterfaces = []string{"eth1", "net1"}
		}},
		{"uid-only-custom-ports", goldenLine(), func(c *Config) {
			c.ProxyPort, c.InboundPort, c.InboundTunnelPort = 16001, 16006, 16008
			c.ProxyUIDs, c.ProxyGIDs = []uint32{1337, 2000}, nil
		}},
	}
}
