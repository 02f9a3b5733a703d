package rules

import (
	"net/netip"
	"strings"
	"testing"
)

func TestValidateRejectsCorruptModels(t *testing.T) {
	v6 := netip.MustParsePrefix("2001:db8::/32")
	cases := []struct {
		name   string
		mutate func(rs *Ruleset)
		want   string
	}{
		{"v6 prefix in v4 rule", func(rs *Ruleset) {
			o := rs.Chain(ChainOutput)
			o.Rules = append([]Rule{{Family: FamilyIPv4, Dst: &v6, Verdict: ret()}}, o.Rules...)
		}, "does not match the rule's family"},
		{"prefix without family", func(rs *Ruleset) {
			rs.Chain(ChainOutput).Rules[0] = Rule{Dst: &v6, Verdict: ret()}
		}, "without a family"},
		{"jump to missing chain", func(rs *Ruleset) {
			rs.Chain(ChainOutput).Rules[0].Verdict = jump("NOPE")
		}, "does not exist"},
		{"jump to base chain", func(rs *Ruleset) {
			rs.Chain(ChainOutput).Rules[0].Verdict = jump(BasePrerouting)
		}, "base chain"},
		{"missing set", func(rs *Ruleset) {
			rs.Chain(ChainOutput).Rules[0] = Rule{Family: FamilyIPv4, DstSet: "nope", Verdict: ret()}
		}, "set nope does not exist"},
		{"port without proto", func(rs *Ruleset) {
			rs.Chain(ChainOutput).Rules[0] = Rule{DPort: single(80), Verdict: ret()}
		}, "without a protocol"},
		{"v6 rule in v4 ruleset", func(rs *Ruleset) {
			rs.Families = IPv4Only
		}, "IPv6 rule in a ruleset without IPv6"},
		{"set family mismatch", func(rs *Ruleset) {
			rs.Sets = append(rs.Sets, &Set{Name: "x", Type: SetIPv4, Prefixes: []netip.Prefix{v6}})
		}, "does not match the set's family"},
		{"duplicate chain", func(rs *Ruleset) { rs.Chains = append(rs.Chains, &Chain{Name: ChainOutput}) }, "defined twice"},
		{"no verdict", func(rs *Ruleset) { rs.Chain(ChainOutput).Rules[0].Verdict = Verdict{} }, "without a verdict"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rs, err := Build(DefaultConfig())
			if err != nil {
				t.Fatal(err)
			}
			if err := rs.Validate(); err != nil {
				t.Fatalf("Build output invalid: %v", err)
			}
			tc.mutate(rs)
			err = rs.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
