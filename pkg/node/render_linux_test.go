package node

// Tests of the nftables rendering that need no kernel, but the Linux-only
// nftables constants.

import (
	"strings"
	"testing"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

func TestMergeRanges(t *testing.T) {
	cfg, err := Parse([]byte(`{"role":"app","podCIDRs":["10.244.0.0/16","10.244.1.0/24","10.245.0.0/16"],"serviceCIDRs":["10.96.0.0/12"],"allow":["255.255.255.0/24","2001:db8::/32"]}`))
	if err != nil {
		t.Fatal(err)
	}
	v4, v6 := splitFamilies(cfg.Allowed)
	got := rules.NFTSetElementTexts(&rules.Set{Type: rules.SetIPv4, Prefixes: v4})
	// 224.0.0.0/24 and the broadcast address are always allowed (LinkScope);
	// overlapping and adjacent ranges are merged.
	want := "10.96.0.0/12 10.244.0.0/15 224.0.0.0/24 255.255.255.0/24"
	if strings.Join(got, " ") != want {
		t.Fatalf("got %v want %s", got, want)
	}
	els := rules.NFTIntervalElements(&rules.Set{Type: rules.SetIPv4, Prefixes: v4})
	// A leading end element at 0, three closed ranges with an end element
	// each; the last runs to the top of the address space and has none.
	if len(els) != 8 || els[7].IntervalEnd {
		t.Fatalf("elements: %+v", els)
	}
	// 2001:db8::/32, fe80::/10 and ff02::/16: three closed ranges.
	if n := len(rules.NFTIntervalElements(&rules.Set{Type: rules.SetIPv6, Prefixes: v6})); n != 7 {
		t.Fatalf("v6 elements: %d", n)
	}
}

// Replies of connections opened from outside pass on app nodes and not,
// by default, on egress nodes, whose public address would otherwise
// carry any NodePort a pod "replies" through.
func TestIngressRepliesDefault(t *testing.T) {
	const reply = "ct direction reply ct state established ct label 126 accept"
	for _, tc := range []struct {
		json string
		want bool
	}{
		{`{"role":"app","podCIDRs":["10.244.0.0/16"]}`, true},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"ingressReplies":false}`, false},
		{`{"role":"egress","podCIDRs":["10.244.0.0/16"],"uplink":"eth0"}`, false},
		{`{"role":"egress","podCIDRs":["10.244.0.0/16"],"uplink":"eth0","ingressReplies":true}`, true},
	} {
		cfg, err := Parse([]byte(tc.json))
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Contains(Render(cfg), reply); got != tc.want {
			t.Errorf("%s: reply rule present = %v, want %v", tc.json, got, tc.want)
		}
	}
}
