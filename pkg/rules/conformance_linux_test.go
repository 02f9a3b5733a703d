//go:build linux

package rules

import (
	"context"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// saveAll is "*-save -t <table>" of every table we write, in n, without
// comments.
func saveAll(t *testing.T, n ns.NetNS, flavour BackendName, f Family) string {
	t.Helper()
	var b strings.Builder
	for _, tb := range iptTables {
		for _, l := range strings.SplitAfter(runIPT(t, n, flavour, f, "save", "", "-t", tb), "\n") {
			if !strings.HasPrefix(l, "#") {
				b.WriteString(l)
			}
		}
	}
	return b.String()
}

// TestIstioConformanceKernel applies every identical case of the
// conformance table with both iptables flavours in a namespace of its
// own, and reads the rules back with iptables-save: what the kernel
// holds is Istio's rules, rule for rule.
func TestIstioConformanceKernel(t *testing.T) {
	nstest.RequirePrivileged(t)
	for _, fl := range iptFlavours {
		t.Run(string(fl), func(t *testing.T) {
			n := nstest.NewNS(t)
			ipt := newIPTBackend(fl, BackendOptions{})
			checked := 0
			for _, tc := range istioCases() {
				if tc.differ != "" || tc.rejects != "" {
					continue
				}
				rs := tc.mustBuild(t)
				inNS(t, n, tc.name+": Apply", func() error { return ipt.Apply(context.Background(), rs) })
				for fi, f := range []Family{FamilyIPv4, FamilyIPv6} {
					text := saveAll(t, n, fl, f)
					if fi == 1 && !tc.v6 {
						for tb, st := range savedTables(text) {
							if len(st.chains) > 0 || len(st.rules) > 0 {
								t.Errorf("%s: ip6tables %s holds our rules although IPv6 is off: %v", tc.name, tb, st.rules)
							}
						}
						continue
					}
					if d := compareText(tc, fi, text); d != "" {
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

// TestIstioConformanceNFT applies every case of the table that Build
// accepts with the nftables backend in a namespace of its own and checks
// it back: the kernel takes Istio's layout (nat, raw, mangle, TPROXY) in
// nftables syntax as one batch, and Check finds it as built. Its
// verdicts are TestIstioConformanceTrace's.
func TestIstioConformanceNFT(t *testing.T) {
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	nft := newNFTBackend()
	applied := 0
	for _, tc := range istioCases() {
		if tc.rejects != "" {
			continue
		}
		rs := tc.mustBuild(t)
		inNS(t, n, tc.name+": Apply", func() error { return nft.Apply(context.Background(), rs) })
		inNS(t, n, tc.name+": Check", func() error { return nft.Check(context.Background(), rs) })
		applied++
	}
	if applied == 0 {
		t.Error("no case applied")
	}
}
