//go:build linux

package rules

import (
	"slices"
	"testing"
)

// TestIstioConformanceKernel applies every identical case of the
// conformance table with both iptables flavours in a namespace of its
// own, and reads the rules back with iptables-save: what the kernel
// holds is Istio's rules, rule for rule.
func TestIstioConformanceKernel(t *testing.T) {
	iptRequirePrivileged(t)
	for _, fl := range iptFlavours {
		t.Run(string(fl), func(t *testing.T) {
			n := newIPTTestNS(t)
			ipt := newIPTBackend(fl, BackendOptions{})
			checked := 0
			for _, tc := range istioCases() {
				// The nat table of the DNS cases is identical too.
				if tc.differ != "" && tc.differ != diffDNS || tc.rejects != "" {
					continue
				}
				cfg, err := tc.config()
				if err != nil {
					t.Fatal(err)
				}
				rs, err := Build(cfg)
				if err != nil {
					t.Fatal(err)
				}
				iptInNS(t, n, tc.name+": Apply", func() error { return ipt.Apply(rs) })
				for fi, f := range []Family{FamilyIPv4, FamilyIPv6} {
					got, chains := parseIstioSave(saveNat(t, n, fl, f))
					if fi == 1 && !tc.v6 {
						if len(chains) > 0 || len(got) > 0 {
							t.Errorf("%s: ip6tables holds rules although IPv6 is off: %v", tc.name, got)
						}
						continue
					}
					if !slices.Equal(chains, tc.chains()) {
						t.Errorf("%s: %s chains %v, want %v", tc.name, iptCommand(f), chains, tc.chains())
					}
					if d := diffChains(tc.want(fi), got); d != "" {
						t.Errorf("%s: %s in the kernel differs from istio-iptables:\n%s", tc.name, iptCommand(f), d)
					}
				}
				checked++
			}
			if checked == 0 {
				t.Error("no case applied")
			}
		})
	}
}
