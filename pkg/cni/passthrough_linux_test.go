package cni

import (
	"encoding/json"
	"net"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// An IPv6 pod's ADD puts Envoy's IPv6 passthrough source, ::6, on the
// pod's lo, as istio-iptables does (the proxy's inbound passthrough
// connections come from it, and the rules exempt it); an IPv4-only pod,
// or an IPv6 pod whose capture is IPv4 only, gets none; DEL removes it.
func TestAddPutsIPv6PassthroughOnLo(t *testing.T) {
	nstest.RequirePrivileged(t)
	p, _, _ := fakePlugin()
	withV6 := func(b []byte) []byte {
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		prev := m["prevResult"].(map[string]any)
		prev["ips"] = append(prev["ips"].([]any), map[string]any{"address": "2001:db8:5::5/64", "interface": 0})
		out, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	hasPassthrough := func(n ns.NetNS) bool {
		var found bool
		if err := n.Do(func(ns.NetNS) error {
			lo, err := netlink.LinkByName("lo")
			if err != nil {
				return err
			}
			addrs, err := netlink.AddrList(lo, netlink.FAMILY_V6)
			for _, a := range addrs {
				found = found || a.IP.Equal(net.ParseIP("::6"))
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return found
	}
	for _, tc := range []struct {
		name  string
		stdin []byte
		want  bool
	}{
		{"dual-stack pod", withV6(stdin("1.0.0", "", injected(), true)), true},
		{"IPv4-only pod", stdin("1.0.0", "", injected(), true), false},
		{"dual-stack pod, IPv4 capture only", withV6(stdin("1.0.0", `"families": "ipv4"`, injected(), true)), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := nstest.NewNS(t)
			args := &skel.CmdArgs{ContainerID: "c1", Netns: n.Path(), IfName: "eth0", Args: podArgs, StdinData: tc.stdin}
			if err := p.Add(args); err != nil {
				t.Fatal(err)
			}
			if got := hasPassthrough(n); got != tc.want {
				t.Errorf("::6 on lo: %v, want %v", got, tc.want)
			}
			// ADD again (a retried ADD): still fine, still one address.
			if err := p.Add(args); err != nil {
				t.Fatalf("second ADD: %v", err)
			}
			// DEL takes it off again: the reference loopback plugin
			// refuses a lo with a non-loopback address at the next ADD.
			if err := p.Del(args); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if hasPassthrough(n) {
				t.Error("::6 still on lo after DEL")
			}
		})
	}
}

// DEL of a pod whose namespace has IPv6 off (no ::6 could be there)
// succeeds.
func TestDelWithIPv6Disabled(t *testing.T) {
	nstest.RequirePrivileged(t)
	p, _, _ := fakePlugin()
	n := nstest.NewNS(t)
	for _, k := range []string{"net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.lo.disable_ipv6"} {
		nstest.Sysctl(t, n, k, "1")
	}
	args := &skel.CmdArgs{ContainerID: "c1", Netns: n.Path(), IfName: "eth0", Args: podArgs, StdinData: stdin("1.0.0", "", injected(), true)}
	if err := p.Add(args); err != nil {
		t.Fatal(err)
	}
	if err := p.Del(args); err != nil {
		t.Fatalf("DEL with IPv6 disabled: %v", err)
	}
}
