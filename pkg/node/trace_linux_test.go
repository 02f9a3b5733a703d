package node

import (
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Behaviour as data: packets through the node program's own expressions.
// No root: nothing touches the kernel.
func TestTracePacket(t *testing.T) {
	parse := func(s string) *Config {
		cfg, err := Parse([]byte(s))
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	const cidrs = `"podCIDRs":["198.51.100.0/25","2001:db8:1a::/64"],"nodeCIDRs":["192.0.2.0/29"]`
	app := parse(`{"role":"app",` + cidrs + `}`)
	egress := parse(`{"role":"egress","uplink":"uplink",` + cidrs + `}`)
	a := netip.MustParseAddr
	bridged := Pod{ContainerID: "c-app", Port: "veth1", L3: "cni0", IPs: []netip.Addr{a("198.51.100.2"), a("2001:db8:1a::2")}}
	neighbour := Pod{ContainerID: "c-nb", Port: "veth2", L3: "cni0", IPs: []netip.Addr{a("198.51.100.3")}}
	gw := Pod{ContainerID: "c-gw", Port: "lxc9", L3: "lxc9", IPs: []netip.Addr{a("198.51.100.9")}, Gateway: true}
	worker := Pod{ContainerID: "c-w", Port: "lxc8", L3: "lxc8", IPs: []netip.Addr{a("198.51.100.8")}}
	inet4, inet6 := a("203.0.113.10"), a("2001:db8:ff::10")
	tcp, udp := uint8(unix.IPPROTO_TCP), uint8(unix.IPPROTO_UDP)

	for _, tc := range []struct {
		name   string
		cfg    *Config
		pods   []Pod
		pkt    TracePacket
		accept bool
		reason Reason
		rule   string // the deciding rule's text, in full
	}{
		{"app pod -> internet tcp4", app, []Pod{bridged}, TracePacket{Port: "veth1", IIF: "cni0", OIF: "uplink", Src: a("198.51.100.2"), Dst: inet4, Proto: tcp, DPort: 8080, RPFOK: true},
			false, ReasonNotAGateway, "meta nfproto ipv4 iifname . ip saddr @pod_sources_v4 goto drop_not_a_gateway"},
		{"app pod -> internet tcp6", app, []Pod{bridged}, TracePacket{Port: "veth1", IIF: "cni0", OIF: "uplink", Src: a("2001:db8:1a::2"), Dst: inet6, Proto: tcp, DPort: 443, RPFOK: true},
			false, ReasonNotAGateway, "meta nfproto ipv6 iifname . ip6 saddr @pod_sources_v6 goto drop_not_a_gateway"},
		{"app pod -> pod on another node", app, []Pod{bridged}, TracePacket{Port: "veth1", IIF: "cni0", OIF: "uplink", Src: a("198.51.100.2"), Dst: a("198.51.100.70"), Proto: tcp, DPort: 8080, RPFOK: true},
			true, "", "meta nfproto ipv4 ip daddr @allow_v4 accept"},
		{"app pod -> neighbour on the bridge", app, []Pod{bridged, neighbour}, TracePacket{Port: "veth1", OPort: "veth2", Src: a("198.51.100.2"), Dst: a("198.51.100.3"), Proto: udp, DPort: 53},
			true, "", "accept"},
		{"app pod bridged to the bridge's NIC", app, []Pod{bridged}, TracePacket{Port: "veth1", OPort: "eth1", Src: a("198.51.100.2"), Dst: inet4, Proto: udp, DPort: 53},
			false, ReasonBridgeBypass, "iifname @pod_ifaces oifname != @pod_ifaces goto drop_bridge_bypass"},
		{"forged source from a bridged pod", app, []Pod{bridged}, TracePacket{Port: "veth1", IIF: "cni0", OIF: "uplink", Src: a("198.51.100.60"), Dst: inet4, Proto: udp, DPort: 8080},
			false, ReasonForgedSource, "ether type ip iifname @pod_ifaces goto drop_forged_source"},
		{"neighbour's address from a bridged pod", app, []Pod{bridged, neighbour}, TracePacket{Port: "veth1", IIF: "cni0", OIF: "uplink", Src: a("198.51.100.3"), Dst: inet4, Proto: udp, DPort: 8080},
			false, ReasonForgedSource, "ether type ip iifname @pod_ifaces goto drop_forged_source"},
		{"a pod's address from the uplink", app, []Pod{bridged}, TracePacket{IIF: "uplink", OIF: "cni0", Src: a("198.51.100.2"), Dst: a("198.51.100.3"), Proto: udp, DPort: 53, RPFOK: false},
			false, ReasonStolenAddress, "meta nfproto ipv4 ip saddr @pod_addrs_v4 goto drop_stolen_address"},
		{"spoofed internet source on a pod's bridge", app, []Pod{bridged}, TracePacket{IIF: "cni0", OIF: "uplink", Src: a("192.0.2.200"), Dst: inet4, Proto: udp, DPort: 53, RPFOK: false},
			false, ReasonReversePath, "fib saddr . iif oif missing goto drop_reverse_path"},
		{"unregistered interface -> internet", app, nil, TracePacket{IIF: "macvlan0", OIF: "uplink", Src: a("198.51.100.100"), Dst: inet4, Proto: tcp, DPort: 80, RPFOK: true},
			false, ReasonNoIdentity, "goto drop_no_identity"},
		{"source-routed packet", app, []Pod{bridged}, TracePacket{Port: "veth1", IIF: "cni0", OIF: "uplink", Src: a("198.51.100.2"), Dst: a("192.0.2.2"), Proto: udp, DPort: 53, SourceRoute: true, RPFOK: true},
			false, ReasonSourceRoute, "meta nfproto ipv4 ip option lsrr exists goto drop_source_route"},
		{"reply to an ingress connection (app node)", app, []Pod{bridged}, TracePacket{Port: "veth1", IIF: "cni0", OIF: "uplink", Src: a("198.51.100.2"), Dst: inet4, Proto: tcp, SPort: 30080, DPort: 40000, Established: true, Reply: true, RPFOK: true},
			true, "", "ct direction reply ct state established ct label 126 accept"},
		{"reply to an ingress connection (egress node: off)", egress, []Pod{worker}, TracePacket{IIF: "lxc8", OIF: "uplink", Src: a("198.51.100.8"), Dst: inet4, Proto: tcp, Established: true, Reply: true, RPFOK: true},
			false, ReasonNotAGateway, "meta nfproto ipv4 iifname . ip saddr @pod_sources_v4 goto drop_not_a_gateway"},
		{"gateway -> internet (new)", egress, []Pod{gw, worker}, TracePacket{IIF: "lxc9", OIF: "uplink", Src: a("198.51.100.9"), Dst: inet4, Proto: tcp, DPort: 443, RPFOK: true},
			true, "", "ct label 127 meta nfproto ipv4 iifname . ip saddr @gateways_v4 accept"},
		{"gateway's connection, later packet", egress, []Pod{gw}, TracePacket{IIF: "lxc9", OIF: "uplink", Src: a("198.51.100.9"), Dst: inet4, Proto: tcp, DPort: 443, Established: true, Label: true, RPFOK: true},
			true, "", "ct label 127 meta nfproto ipv4 iifname . ip saddr @gateways_v4 accept"},
		{"established packet the gateway did not open", egress, []Pod{gw}, TracePacket{IIF: "lxc9", OIF: "uplink", Src: a("198.51.100.9"), Dst: inet4, Proto: udp, DPort: 53, Established: true, RPFOK: true},
			false, ReasonNotAGateway, "meta nfproto ipv4 iifname . ip saddr @pod_sources_v4 goto drop_not_a_gateway"},
		{"ordinary pod on the egress node -> internet", egress, []Pod{gw, worker}, TracePacket{IIF: "lxc8", OIF: "uplink", Src: a("198.51.100.8"), Dst: inet4, Proto: udp, DPort: 53, RPFOK: true},
			false, ReasonNotAGateway, "meta nfproto ipv4 iifname . ip saddr @pod_sources_v4 goto drop_not_a_gateway"},
		{"gateway's address from another pod's interface", egress, []Pod{gw, worker}, TracePacket{IIF: "lxc8", OIF: "uplink", Src: a("198.51.100.9"), Dst: inet4, Proto: tcp, DPort: 443, RPFOK: true},
			false, ReasonForgedSource, "meta nfproto ipv4 iifname @pod_ifaces goto drop_forged_source"},
		{"a gateway on an app node is no gateway", app, []Pod{{ContainerID: "x", Port: "lxc9", L3: "lxc9", IPs: []netip.Addr{a("198.51.100.9")}}}, TracePacket{IIF: "lxc9", OIF: "uplink", Src: a("198.51.100.9"), Dst: inet4, Proto: tcp, DPort: 443, RPFOK: true},
			false, ReasonNotAGateway, "meta nfproto ipv4 iifname . ip saddr @pod_sources_v4 goto drop_not_a_gateway"},
	} {
		tr, err := tc.cfg.TracePacket(tc.pods, tc.pkt)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if tr.Accepted != tc.accept || tr.Reason != tc.reason || tr.Decided.Rule != tc.rule {
			var steps []string
			for _, s := range tr.Steps {
				steps = append(steps, s.String())
			}
			t.Errorf("%s: %s (%s) by %q; want accept=%v reason %q by %q\n  %s", tc.name, tr.Verdict(), tr.Reason, tr.Decided.Rule, tc.accept, tc.reason, tc.rule, strings.Join(steps, "\n  "))
			continue
		}
		// A drop goes through its reason's chain: NFLOG and the counters.
		if !tc.accept {
			wantCounter := ReasonCounter(tc.reason, map[bool]string{false: FamilyIPv4, true: FamilyIPv6}[tc.pkt.Src.Is6()])
			if !tr.Logged || !strings.Contains(strings.Join(tr.Counters, " "), wantCounter) {
				t.Errorf("%s: logged %v, counters %v; want NFLOG and %s", tc.name, tr.Logged, tr.Counters, wantCounter)
			}
		}
	}
	if _, err := app.TracePacket(nil, TracePacket{Src: a("198.51.100.2"), Dst: inet6}); err == nil {
		t.Error("mixed families accepted")
	}
}
