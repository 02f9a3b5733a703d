package rules

import (
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
