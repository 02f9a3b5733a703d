package main

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/egress-cni/egress-cni/pkg/node"
)

func TestParseDest(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want dest
	}{
		{"203.0.113.10:443/tcp", dest{netip.MustParseAddr("203.0.113.10"), 443, 6, "tcp"}},
		{"[2001:db8:ff::10]:53/udp", dest{netip.MustParseAddr("2001:db8:ff::10"), 53, 17, "udp"}},
		{"203.0.113.10/icmp", dest{netip.MustParseAddr("203.0.113.10"), 0, 1, "icmp"}},
		{"2001:db8:ff::10/icmp", dest{netip.MustParseAddr("2001:db8:ff::10"), 0, 58, "ipv6-icmp"}},
	} {
		got, err := parseDest(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("%s: got %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"203.0.113.10:443", "203.0.113.10:443/sctp", "203.0.113.10/tcp", "example.com:80/tcp", "203.0.113.10:0/udp", "nope/icmp"} {
		if _, err := parseDest(bad); err == nil || !strings.Contains(err.Error(), bad) {
			t.Errorf("%s: error %v does not name the value", bad, err)
		}
	}
}

func TestFindSource(t *testing.T) {
	a := netip.MustParseAddr
	pods := []node.Pod{{ContainerID: "c1", Port: "veth1", L3: "cni0", IPs: []netip.Addr{a("198.51.100.2"), a("2001:db8:1a::2")}}}
	ids := map[string]node.Identity{"c1": {ContainerID: "c1", Namespace: "team-a", Name: "curl-1"},
		"c9": {ContainerID: "c9", Namespace: "team-a", Name: "gone"}}
	for _, tc := range []struct {
		src  string
		v6   bool
		ip   string
		name string
	}{
		{"198.51.100.2", false, "198.51.100.2", "team-a/curl-1"},
		{"team-a/curl-1", false, "198.51.100.2", "team-a/curl-1"},
		{"team-a/curl-1", true, "2001:db8:1a::2", "team-a/curl-1"},
	} {
		p, ip, name, err := findSource(tc.src, pods, ids, tc.v6)
		if err != nil || p.ContainerID != "c1" || ip != a(tc.ip) || name != tc.name {
			t.Errorf("%s: %v %v %q %v", tc.src, p, ip, name, err)
		}
	}
	// An address no pod has: no pod, for -iif.
	if p, ip, _, err := findSource("192.0.2.9", pods, ids, false); err != nil || p.ContainerID != "" || ip != a("192.0.2.9") {
		t.Errorf("foreign address: %v %v %v", p, ip, err)
	}
	for src, says := range map[string]string{"team-a/nobody": "no identity record", "team-a/gone": "not registered", "curl-1": "NAMESPACE/NAME"} {
		if _, _, _, err := findSource(src, pods, ids, false); err == nil || !strings.Contains(err.Error(), says) || !strings.Contains(err.Error(), src) {
			t.Errorf("%s: error %v, want one naming it and saying %q", src, err, says)
		}
	}
}
