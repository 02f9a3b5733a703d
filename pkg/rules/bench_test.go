package rules

import (
	"net/netip"
	"strings"
	"testing"
)

// The pure parts of an apply at N=10,000 excluded CIDRs, without the
// kernel: parse the flag value, build the model, render it for each
// backend. `make bench` runs these and includes them in bench/results.md.

func bench10kCIDRList() string {
	ps := nftSpreadCIDRs(10000)
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func BenchmarkParseCIDRList10k(b *testing.B) {
	s := bench10kCIDRList()
	b.ReportAllocs()
	b.SetBytes(int64(len(s)))
	for b.Loop() {
		_, ps, err := ParseCIDRList(FieldOutboundExcludeCIDRs, s)
		if err != nil || len(ps) != 10000 {
			b.Fatalf("parsed %d, err %v", len(ps), err)
		}
	}
}

func BenchmarkBuild10k(b *testing.B) {
	cfg := DefaultConfig()
	cfg.OutboundExcludeCIDRs = nftSpreadCIDRs(10000)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Build(cfg); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRenderIPTables10k renders the iptables-restore input of both
// families (10,000 RETURN rules in the IPv4 one).
func BenchmarkRenderIPTables10k(b *testing.B) {
	rs := goldenRuleset(b, func(c *Config) { c.OutboundExcludeCIDRs = nftSpreadCIDRs(10000) })
	b.ReportAllocs()
	for b.Loop() {
		for _, f := range []Family{FamilyIPv4, FamilyIPv6} {
			if _, err := RenderIPTablesFamily(rs, f); err != nil {
				b.Fatal(err)
			}
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
