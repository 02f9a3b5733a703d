package rules

import (
	"net/netip"
	"strings"
	"testing"
)

// fieldErrCase is options and the FieldError they must give.
type fieldErrCase struct {
	name      string
	opts      OptionText
	field     string
	value     string
	reasonHas string
}

func TestParseErrorsNameFieldAndValue(t *testing.T) {
	cases := []fieldErrCase{
		{"prefix too long", OptionText{FieldOutboundExcludeCIDRs: "10.0.0.0/33"}, FieldOutboundExcludeCIDRs, "10.0.0.0/33", "out of range 0-32"},
		{"v6 prefix too long", OptionText{FieldOutboundExcludeCIDRs: "2001:db8::/129"}, FieldOutboundExcludeCIDRs, "2001:db8::/129", "out of range 0-128"},
		{"not a cidr", OptionText{FieldOutboundIncludeCIDRs: "abc"}, FieldOutboundIncludeCIDRs, "abc", "not a CIDR"},
		{"port too big", OptionText{FieldInboundExcludePorts: "15090,70000"}, FieldInboundExcludePorts, "70000", "between 1 and 65535"},
		{"port zero", OptionText{FieldProxyPort: "0"}, FieldProxyPort, "0", "between 1 and 65535"},
		{"port not a number", OptionText{FieldOutboundExcludePorts: "abc"}, FieldOutboundExcludePorts, "abc", "not a port"},
		{"port range reversed", OptionText{FieldOutboundExcludePorts: "9000-8000"}, FieldOutboundExcludePorts, "9000-8000", "below its start"},
		{"empty item", OptionText{FieldOutboundExcludeCIDRs: "10.0.0.0/8,,192.0.2.0/24"}, FieldOutboundExcludeCIDRs, "10.0.0.0/8,,192.0.2.0/24", "item 2"},
		{"trailing comma", OptionText{FieldInboundExcludePorts: "15090,"}, FieldInboundExcludePorts, "15090,", "item 2"},
		{"uid not a number", OptionText{FieldProxyUID: "istio-proxy"}, FieldProxyUID, "istio-proxy", "numeric"},
		{"uid -1", OptionText{FieldProxyUID: "4294967295"}, FieldProxyUID, "4294967295", "numeric"},
		{"gid negative", OptionText{FieldProxyGID: "-5"}, FieldProxyGID, "-5", "numeric"},
		{"mode", OptionText{FieldMode: "MAGIC"}, FieldMode, "MAGIC", "REDIRECT"},
		{"star mixed", OptionText{FieldOutboundIncludeCIDRs: "*,10.0.0.0/8"}, FieldOutboundIncludeCIDRs, "*,10.0.0.0/8", "only item"},
		{"star outbound ports", OptionText{FieldOutboundIncludePorts: "*"}, FieldOutboundIncludePorts, "*", "not allowed"},
		{"interface slash", OptionText{FieldExcludeInterfaces: "eth0/1"}, FieldExcludeInterfaces, "eth0/1", "interface name"},
		{"interface too long", OptionText{FieldExcludeInterfaces: "abcdefghijklmnop"}, FieldExcludeInterfaces, "abcdefghijklmnop", "1 to 15"},
		{"families", OptionText{FieldFamilies: "ipv5"}, FieldFamilies, "ipv5", "ipv4, ipv6 or dual"},
		{"zoned", OptionText{FieldOutboundExcludeCIDRs: "fe80::1%eth0"}, FieldOutboundExcludeCIDRs, "fe80::1%eth0", "zoned"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			before := cfg
			err := cfg.ApplyOptions(tc.opts)
			fe, ok := AsFieldError(err)
			if !ok {
				t.Fatalf("want a FieldError, got %v", err)
			}
			if fe.Field != tc.field || fe.Value != tc.value || !strings.Contains(fe.Reason, tc.reasonHas) {
				t.Fatalf("got field=%q value=%q reason=%q; want field=%q value=%q reason containing %q",
					fe.Field, fe.Value, fe.Reason, tc.field, tc.value, tc.reasonHas)
			}
			if !strings.Contains(err.Error(), tc.field) || !strings.Contains(err.Error(), tc.value) {
				t.Fatalf("message %q does not name field and value", err)
			}
			if cfg.ProxyPort != before.ProxyPort || len(cfg.OutboundExcludeCIDRs) != len(before.OutboundExcludeCIDRs) {
				t.Fatal("a failed ApplyOptions changed the config")
			}
		})
	}
}

func TestValidateErrors(t *testing.T) {
	cases := []fieldErrCase{
		{"v6 cidr in v4 config", OptionText{FieldFamilies: "ipv4", FieldOutboundExcludeCIDRs: "2001:db8::/32"}, FieldOutboundExcludeCIDRs, "2001:db8::/32", "IPv6 is disabled"},
		{"v4 cidr in v6 config", OptionText{FieldFamilies: "ipv6", FieldOutboundIncludeCIDRs: "192.0.2.0/24"}, FieldOutboundIncludeCIDRs, "192.0.2.0/24", "IPv4 is disabled"},
		{"include inside exclude", OptionText{FieldOutboundIncludeCIDRs: "10.1.0.0/16", FieldOutboundExcludeCIDRs: "10.0.0.0/8"}, FieldOutboundIncludeCIDRs, "10.1.0.0/16", "entirely covered"},
		{"same cidr both", OptionText{FieldOutboundIncludeCIDRs: "192.0.2.0/24", FieldOutboundExcludeCIDRs: "192.0.2.0/24"}, FieldOutboundIncludeCIDRs, "192.0.2.0/24", "entirely covered"},
		{"outbound port both", OptionText{FieldOutboundIncludePorts: "443", FieldOutboundExcludePorts: "400-500"}, FieldOutboundIncludePorts, "443", "overlaps"},
		{"inbound port both", OptionText{FieldInboundIncludePorts: "8080", FieldInboundExcludePorts: "8080"}, FieldInboundIncludePorts, "8080", "overlaps"},
		// TPROXY is built now (was refused): its mark must not be the proxy's 1338.
		{"tproxy mark", OptionText{FieldMode: "TPROXY", FieldTProxyMark: "1338"}, FieldTProxyMark, "1338", "other than 0 and 1338"},
		{"tproxy table", OptionText{FieldMode: "TPROXY", FieldTProxyRouteTable: "254"}, FieldTProxyRouteTable, "254", "252-255"},
		{"no proxy identity", OptionText{FieldProxyUID: "", FieldProxyGID: ""}, FieldProxyUID, "", "at least one"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			if err := cfg.ApplyOptions(tc.opts); err != nil {
				t.Fatalf("ApplyOptions: %v", err)
			}
			_, err := Build(cfg)
			fe, ok := AsFieldError(err)
			if !ok {
				t.Fatalf("want a FieldError from Build, got %v", err)
			}
			if fe.Field != tc.field || fe.Value != tc.value || !strings.Contains(fe.Reason, tc.reasonHas) {
				t.Fatalf("got %v; want field=%q value=%q reason containing %q", err, tc.field, tc.value, tc.reasonHas)
			}
		})
	}
}

func TestParseNormalizes(t *testing.T) {
	all, ps, err := ParseCIDRList("f", " 10.1.2.3/8, 192.0.2.7 ,10.0.0.0/8,2001:db8::1")
	if err != nil || all {
		t.Fatalf("all=%v err=%v", all, err)
	}
	want := []string{"10.0.0.0/8", "192.0.2.7/32", "2001:db8::1/128"}
	if len(ps) != len(want) {
		t.Fatalf("got %v want %v", ps, want)
	}
	for i := range want {
		if ps[i].String() != want[i] {
			t.Fatalf("got %v want %v", ps, want)
		}
	}
	_, ports, err := ParsePortList("f", "443, 80,8000:8080,80", false)
	// The user's order, as istio-iptables keeps it; the repeat is dropped.
	if err != nil || len(ports) != 3 || ports[0] != (PortRange{443, 443}) || ports[1] != (PortRange{80, 80}) || ports[2] != (PortRange{8000, 8080}) {
		t.Fatalf("ports=%v err=%v", ports, err)
	}
	all, _, err = ParseCIDRList("f", "*")
	if err != nil || !all {
		t.Fatalf("'*' all=%v err=%v", all, err)
	}
	// "-x ''" is an empty list, not an error.
	if _, ps, err := ParseCIDRList("f", ""); err != nil || ps != nil {
		t.Fatalf("empty: %v %v", ps, err)
	}
}

// packet builds an outbound TCP packet from an app socket.
func out(dst string, port uint16, uid uint32) Packet {
	d := netip.MustParseAddr(dst)
	src := netip.MustParseAddr("192.0.2.2")
	if d.Is6() {
		src = netip.MustParseAddr("2001:db8:1::2")
	}
	return Packet{Hook: "output", OIF: "eth0", Src: src, Dst: d, Proto: ProtoTCP, DPort: port, UID: uid, GID: uid}
}

// optionsRuleset builds DefaultConfig with the istio-iptables options o.
func optionsRuleset(t *testing.T, o OptionText) *Ruleset {
	t.Helper()
	cfg := DefaultConfig()
	if err := cfg.ApplyOptions(o); err != nil {
		t.Fatal(err)
	}
	rs, err := Build(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// traceCase is a packet and the port Trace must redirect it to (0: none).
type traceCase struct {
	name string
	p    Packet
	want uint16
}

func checkTraces(t *testing.T, rs *Ruleset, cases []traceCase) {
	t.Helper()
	for _, tc := range cases {
		got, err := rs.Trace(tc.p)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got != tc.want {
			t.Errorf("%s: redirected to %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestTraceIstioDefaults(t *testing.T) {
	rs := optionsRuleset(t, OptionText{
		FieldOutboundExcludeCIDRs: "198.51.100.0/24,2001:db8:dead::/48",
		FieldOutboundExcludePorts: "3306",
		FieldInboundExcludePorts:  "15090,15021,15020,22",
	})
	lo := func(p Packet) Packet { p.OIF = "lo"; return p }
	in := func(dst string, port uint16) Packet {
		return Packet{Hook: "prerouting", IIF: "eth0", Src: netip.MustParseAddr("203.0.113.10"), Dst: netip.MustParseAddr(dst), Proto: ProtoTCP, DPort: port}
	}
	checkTraces(t, rs, []traceCase{
		{"app to internet", out("203.0.113.10", 80, 1000), 15001},
		{"app to internet v6", out("2001:db8:2::10", 443, 1000), 15001},
		{"proxy uid", out("203.0.113.10", 80, 1337), 0},
		{"proxy gid only", func() Packet { p := out("203.0.113.10", 80, 1000); p.GID = 1337; return p }(), 0},
		{"excluded cidr", out("198.51.100.9", 80, 1000), 0},
		{"excluded cidr v6", out("2001:db8:dead::9", 80, 1000), 0},
		{"excluded port", out("203.0.113.10", 3306, 1000), 0},
		{"udp is not redirected", func() Packet { p := out("203.0.113.10", 443, 1000); p.Proto = ProtoUDP; return p }(), 0},
		{"app loopback", lo(out("127.0.0.1", 9090, 1000)), 0},
		{"app to own pod ip via lo", lo(out("192.0.2.2", 9090, 1000)), 0},
		{"proxy to own pod ip via lo goes inbound", lo(out("192.0.2.2", 9090, 1337)), 15006},
		{"proxy to localhost", lo(out("127.0.0.1", 9090, 1337)), 0},
		{"proxy to tunnel port via lo", lo(out("192.0.2.2", 15008, 1337)), 0},
		{"inbound passthrough source", func() Packet {
			p := lo(out("192.0.2.2", 9090, 1337))
			p.Src = netip.MustParseAddr("127.0.0.6")
			return p
		}(), 0},
		{"inbound app port", in("192.0.2.2", 8080), 15006},
		{"inbound excluded port", in("192.0.2.2", 15021), 0},
		{"inbound extra excluded port", in("192.0.2.2", 22), 0},
		{"inbound tunnel port", in("192.0.2.2", 15008), 0},
	})
}

func TestTraceIncludeOnlyAndDNS(t *testing.T) {
	rs := optionsRuleset(t, OptionText{
		FieldOutboundIncludeCIDRs: "203.0.113.0/25",
		FieldOutboundExcludeCIDRs: "203.0.113.64/26",
		FieldOutboundIncludePorts: "8443",
		FieldInboundIncludePorts:  "8080,9000-9001",
		FieldInboundExcludePorts:  "",
		FieldExcludeInterfaces:    "eth1",
		FieldRedirectDNS:          "true",
	})
	udp := func(p Packet) Packet { p.Proto = ProtoUDP; return p }
	checkTraces(t, rs, []traceCase{
		{"included", out("203.0.113.10", 80, 1000), 15001},
		{"carved out of include", out("203.0.113.70", 80, 1000), 0},
		{"outside include", out("203.0.113.200", 80, 1000), 0},
		{"included port anywhere", out("198.51.100.1", 8443, 1000), 15001},
		{"dns udp", udp(out("198.51.100.53", 53, 1000)), 15053},
		{"dns tcp", out("198.51.100.53", 53, 1000), 15053},
		{"proxy dns", udp(out("198.51.100.53", 53, 1337)), 0},
		{"excluded interface", func() Packet { p := out("203.0.113.10", 80, 1000); p.OIF = "eth1"; return p }(), 0},
		{"inbound included", Packet{Hook: "prerouting", IIF: "eth0", Dst: netip.MustParseAddr("192.0.2.2"), Proto: ProtoTCP, DPort: 9001}, 15006},
		{"inbound not included", Packet{Hook: "prerouting", IIF: "eth0", Dst: netip.MustParseAddr("192.0.2.2"), Proto: ProtoTCP, DPort: 8081}, 0},
		{"inbound excluded iface", Packet{Hook: "prerouting", IIF: "eth1", Dst: netip.MustParseAddr("192.0.2.2"), Proto: ProtoTCP, DPort: 8080}, 0},
	})
}

func TestBuildDeterministic(t *testing.T) {
	cfg := DefaultConfig()
	if err := cfg.ApplyOptions(OptionText{FieldOutboundExcludeCIDRs: "10.0.0.0/8,192.0.2.0/24,2001:db8::/32"}); err != nil {
		t.Fatal(err)
	}
	a, err := Build(cfg)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := Build(cfg)
	if len(a.Chains) != len(b.Chains) || len(a.Sets) != len(b.Sets) {
		t.Fatal("two builds differ")
	}
	if a.Set(SetOutExcludeV4) == nil || a.Set(SetOutExcludeV6) == nil {
		t.Fatal("exclusions must be split into per-family sets")
	}
	if n := len(a.Set(SetOutExcludeV4).Prefixes); n != 2 {
		t.Fatalf("v4 exclusion set has %d elements, want 2", n)
	}
}

func TestIPv4OnlyHasNoV6Rules(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Families = IPv4Only
	rs, err := Build(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range rs.Chains {
		for _, r := range c.Rules {
			if r.Family == FamilyIPv6 {
				t.Fatalf("chain %s has an IPv6 rule in an IPv4-only ruleset", c.Name)
			}
		}
	}
}
