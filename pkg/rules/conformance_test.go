package rules

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// The conformance table: istio-iptables' 27 test cases (Istio master,
// tools/istio-iptables/pkg/capture/run_test.go), each with its config in
// our terms and the nat rules istio-iptables writes for it, per family,
// as facts read from Istio's goldens and written down here in our own
// form. Presentation is ignored (module loads such as -m tcp, the order
// of options within a rule, comments, counters, how chains are declared,
// the order of chains); the order of rules within a chain is not.
//
// A case whose differ is set is a known difference, with the reason; the
// test then asserts that the difference is still there, so that fixing
// it means moving the case to the identical side of the table.

// Istio's fixed layout: the chains every case declares and the rules
// every case starts with.
var istioChains = []string{"ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT"}

type istioCase struct {
	name string
	// opts on top of istio-iptables' test config: -u 1337 -g 1337,
	// everything else at its default (no -i, no -b: nothing captured).
	opts OptionText
	// v6: the case enables IPv6 (EnableIPv6); otherwise only iptables
	// is written.
	v6 bool
	// pre, inbound: PREROUTING and ISTIO_INBOUND after Istio's fixed
	// tunnel-port rule; outHead: ISTIO_OUTPUT before the passthrough
	// RETURN; owners: the UIDs and GIDs of the owner block; outTail:
	// ISTIO_OUTPUT after the owner block. {lo} is 127.0.0.1/32 or ::1/128,
	// {pass} 127.0.0.6/32 or ::6/128. Per family: index 0 IPv4, 1 IPv6.
	pre, inbound, outHead, outTail [2][]string
	uids, gids                     []string
	// noLoRet: the "-o lo ! owner RETURN" rules are left out (a
	// loopback CIDR is included); lo overrides {lo} for IPv4.
	noLoRet bool
	lo      string
	// tproxy: TPROXY mode with these inbound ports ("*" for all); the
	// inbound capture is then in mangle, the nat table keeps only the
	// tunnel-port RETURN in ISTIO_INBOUND.
	tproxy string
	// dns: the pod's nameservers (Istio's DNSServersV4/V6). With
	// --redirect-dns and at least one, Istio writes ISTIO_OUTPUT_DNS in
	// nat (compared) and conntrack zones in raw (which we do not write:
	// such a case differs by its raw table only).
	dns []string
	// differ: why egress-cni's rules are not identical ("" = identical);
	// rejects: Build refuses the config, with an error containing this.
	differ, rejects string
}

func both(rules ...string) [2][]string   { return [2][]string{rules, rules} }
func v4only(rules ...string) [2][]string { return [2][]string{rules, nil} }

const (
	diffInclExc = "an include CIDR wholly inside an exclude CIDR is refused: the exclude RETURNs first, so the include could never match (Istio writes both rules)"
)

// Owner groups are written as GIDs: Istio's cases name two groups (java,
// ftp) that egress-init resolves to numbers through the image's group
// database before building, as iptables itself stores them.
func istioCases() []istioCase {
	return []istioCase{
		{name: "ipv6-empty-inbound-ports", v6: true, opts: OptionText{FieldInboundIncludePorts: ""}},
		{name: "ip-range", opts: OptionText{FieldOutboundExcludeCIDRs: "1.1.0.0/16", FieldOutboundIncludeCIDRs: "9.9.0.0/16", FieldRedirectDNS: "true", FieldProxyGID: "1,2", FieldProxyUID: "3,4"},
			uids: []string{"3", "4"}, gids: []string{"1", "2"}, dns: []string{"127.0.0.53"},
			outTail: v4only("-A ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN", "-A ISTIO_OUTPUT -d 9.9.0.0/16 -j ISTIO_REDIRECT")},
		{name: "tproxy", v6: true, opts: OptionText{FieldMode: "TPROXY", FieldInboundIncludePorts: "*", FieldOutboundExcludeCIDRs: "1.1.0.0/16",
			FieldOutboundIncludeCIDRs: "9.9.0.0/16", FieldRedirectDNS: "true", FieldExcludeInterfaces: "not-istio-nic"},
			dns: []string{"127.0.0.53"}, tproxy: "*",
			pre: both("-A PREROUTING -i not-istio-nic -j RETURN"), outHead: both("-A OUTPUT -o not-istio-nic -j RETURN"),
			outTail: v4only("-A ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN", "-A ISTIO_OUTPUT -d 9.9.0.0/16 -j ISTIO_REDIRECT")},
		{name: "ipv6-inbound-ports", v6: true, opts: OptionText{FieldInboundIncludePorts: "4000,5000"},
			pre:     both("-A PREROUTING -p tcp -j ISTIO_INBOUND"),
			inbound: both("-A ISTIO_INBOUND -p tcp --dport 4000 -j ISTIO_IN_REDIRECT", "-A ISTIO_INBOUND -p tcp --dport 5000 -j ISTIO_IN_REDIRECT")},
		{name: "ipv6-virt-interfaces", v6: true, opts: OptionText{FieldInboundIncludePorts: "4000,5000", FieldRerouteVirtualInterfaces: "eth0,eth1"},
			pre:     both("-A PREROUTING -i eth1 -j RETURN", "-A PREROUTING -i eth0 -j RETURN", "-A PREROUTING -p tcp -j ISTIO_INBOUND"),
			inbound: both("-A ISTIO_INBOUND -p tcp --dport 4000 -j ISTIO_IN_REDIRECT", "-A ISTIO_INBOUND -p tcp --dport 5000 -j ISTIO_IN_REDIRECT")},
		{name: "ipv6-ipnets", v6: true, opts: OptionText{FieldInboundIncludePorts: "4000,5000", FieldInboundExcludePorts: "6000,7000,",
			FieldRerouteVirtualInterfaces: "eth0,eth1", FieldOutboundExcludeCIDRs: "2001:db8::/32", FieldOutboundIncludeCIDRs: "2001:db8::/32"},
			rejects: "item 3 of the list is empty",
			differ:  "a list with an empty item (-d '6000,7000,') is refused rather than read as 6000,7000; " + diffInclExc},
		{name: "ipv6-uid-gid", v6: true, opts: OptionText{FieldInboundIncludePorts: "4000,5000", FieldInboundExcludePorts: "6000,7000",
			FieldRerouteVirtualInterfaces: "eth0,eth1", FieldProxyGID: "1,2", FieldProxyUID: "3,4", FieldOutboundExcludeCIDRs: "2001:db8::/32", FieldOutboundIncludeCIDRs: "2001:db8::/32"},
			rejects: "entirely covered", differ: diffInclExc},
		{name: "ipv6-outbound-ports", v6: true, opts: OptionText{FieldInboundIncludePorts: "", FieldOutboundIncludePorts: "32000,31000"},
			outTail: both("-A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT", "-A ISTIO_OUTPUT -p tcp --dport 31000 -j ISTIO_REDIRECT")},
		{name: "empty"},
		{name: "kube-virt-interfaces", opts: OptionText{FieldRerouteVirtualInterfaces: "eth1,eth2", FieldOutboundIncludeCIDRs: "*"},
			pre: v4only("-A PREROUTING -i eth2 -j ISTIO_REDIRECT", "-A PREROUTING -i eth1 -j ISTIO_REDIRECT",
				"-A PREROUTING -i eth2 -j RETURN", "-A PREROUTING -i eth1 -j RETURN"),
			outTail: v4only("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")},
		{name: "ipnets", opts: OptionText{FieldOutboundIncludeCIDRs: "10.0.0.0/8"},
			outTail: v4only("-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT")},
		{name: "ipnets-with-kube-virt-interfaces", opts: OptionText{FieldRerouteVirtualInterfaces: "eth1,eth2", FieldOutboundIncludeCIDRs: "10.0.0.0/8"},
			pre: v4only("-A PREROUTING -i eth2 -d 10.0.0.0/8 -j ISTIO_REDIRECT", "-A PREROUTING -i eth1 -d 10.0.0.0/8 -j ISTIO_REDIRECT",
				"-A PREROUTING -i eth2 -j RETURN", "-A PREROUTING -i eth1 -j RETURN"),
			outTail: v4only("-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT")},
		{name: "inbound-ports-include", opts: OptionText{FieldInboundIncludePorts: "32000,31000"},
			pre:     v4only("-A PREROUTING -p tcp -j ISTIO_INBOUND"),
			inbound: v4only("-A ISTIO_INBOUND -p tcp --dport 32000 -j ISTIO_IN_REDIRECT", "-A ISTIO_INBOUND -p tcp --dport 31000 -j ISTIO_IN_REDIRECT")},
		{name: "inbound-ports-wildcard", opts: OptionText{FieldInboundIncludePorts: "*"},
			pre: v4only("-A PREROUTING -p tcp -j ISTIO_INBOUND"), inbound: v4only("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")},
		{name: "inbound-ports-tproxy", opts: OptionText{FieldInboundIncludePorts: "32000,31000", FieldMode: "TPROXY"}, tproxy: "32000,31000"},
		{name: "inbound-ports-wildcard-tproxy", opts: OptionText{FieldInboundIncludePorts: "*", FieldMode: "TPROXY"}, tproxy: "*"},
		{name: "dns-uid-gid", v6: true, opts: OptionText{FieldRedirectDNS: "true", FieldProxyGID: "1,2", FieldProxyUID: "3,4"},
			uids: []string{"3", "4"}, gids: []string{"1", "2"}, dns: []string{"127.0.0.53", "::127.0.0.53"}},
		// REDIRECT_DNS without CAPTURE_ALL_DNS and without a nameserver:
		// Istio turns DNS capture off, and so do we.
		{name: "ipv6-dns-uid-gid", v6: true, opts: OptionText{FieldRedirectDNS: "true", FieldProxyGID: "1,2", FieldProxyUID: "3,4"},
			uids: []string{"3", "4"}, gids: []string{"1", "2"}},
		{name: "outbound-owner-groups", opts: OptionText{EnvOwnerGroups: "1001,202"},
			outTail: v4only("-A ISTIO_OUTPUT -m owner ! --gid-owner 1001 -m owner ! --gid-owner 202 -j RETURN")},
		{name: "outbound-owner-groups-exclude", opts: OptionText{EnvOwnerGroupsExclude: "888,21"},
			outTail: v4only("-A ISTIO_OUTPUT -m owner --gid-owner 888 -j RETURN", "-A ISTIO_OUTPUT -m owner --gid-owner 21 -j RETURN")},
		{name: "ipv6-dns-outbound-owner-groups", v6: true, opts: OptionText{FieldRedirectDNS: "true", EnvOwnerGroups: "1001,202"},
			outTail: both("-A ISTIO_OUTPUT -m owner ! --gid-owner 1001 -m owner ! --gid-owner 202 -j RETURN")},
		{name: "ipv6-dns-outbound-owner-groups-exclude", v6: true, opts: OptionText{FieldRedirectDNS: "true", EnvOwnerGroupsExclude: "888,21"},
			outTail: both("-A ISTIO_OUTPUT -m owner --gid-owner 888 -j RETURN", "-A ISTIO_OUTPUT -m owner --gid-owner 21 -j RETURN")},
		{name: "outbound-ports-include", opts: OptionText{FieldOutboundIncludePorts: "32000,31000"},
			outTail: v4only("-A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT", "-A ISTIO_OUTPUT -p tcp --dport 31000 -j ISTIO_REDIRECT")},
		{name: "loopback-outbound-iprange", opts: OptionText{FieldOutboundIncludeCIDRs: "127.1.2.3/32", FieldRedirectDNS: "true", FieldProxyGID: "1,2", FieldProxyUID: "3,4"},
			uids: []string{"3", "4"}, gids: []string{"1", "2"}, noLoRet: true, dns: []string{"127.0.0.53"},
			outTail: v4only("-A ISTIO_OUTPUT -d 127.1.2.3/32 -j ISTIO_REDIRECT")},
		{name: "basic-exclude-nic", opts: OptionText{FieldExcludeInterfaces: "not-istio-nic"},
			pre: v4only("-A PREROUTING -i not-istio-nic -j RETURN"), outHead: v4only("-A OUTPUT -o not-istio-nic -j RETURN")},
		{name: "drop-invalid", opts: OptionText{FieldDropInvalid: "true"}},
		{name: "host-ipv4-loopback-cidr", opts: OptionText{EnvIPv4LoopbackCIDR: "127.0.0.1/8"}, lo: "127.0.0.1/8"},
	}
}

// config is the case's config: istio-iptables' defaults with the test's
// -u 1337 -g 1337, the case's options, and IPv4 only unless the case
// enables IPv6.
func (tc istioCase) config() (Config, error) {
	o := IstioIptablesDefaults()
	o[FieldProxyUID], o[FieldProxyGID] = "1337", "1337"
	o[FieldFamilies] = "ipv4"
	if tc.v6 {
		o[FieldFamilies] = "dual"
	}
	for k, v := range tc.opts {
		o[k] = v
	}
	cfg := DefaultConfig()
	if err := cfg.ApplyOptions(o); err != nil {
		return cfg, err
	}
	for _, d := range tc.dns {
		cfg.DNSServers = append(cfg.DNSServers, netip.MustParseAddr(d))
	}
	return cfg, cfg.Validate()
}

// dnsOn: Istio captures DNS for the case (--redirect-dns and a
// nameserver; the table has no --capture-all-dns case).
// build is config then Build: the case's Ruleset.
func (tc istioCase) build() (*Ruleset, error) {
	cfg, err := tc.config()
	if err != nil {
		return nil, err
	}
	return Build(cfg)
}

// mustBuild is build for a case that must build.
func (tc istioCase) mustBuild(t testing.TB) *Ruleset {
	t.Helper()
	rs, err := tc.build()
	if err != nil {
		t.Fatalf("%s: %v", tc.name, err)
	}
	return rs
}

func (tc istioCase) dnsOn() bool { return tc.opts[FieldRedirectDNS] == "true" && len(tc.dns) > 0 }

// servers reports whether the case has a nameserver of family index fi.
func (tc istioCase) servers(fi int) bool {
	for _, d := range tc.dns {
		if netip.MustParseAddr(d).Is6() == (fi == 1) {
			return true
		}
	}
	return false
}

// chains are the nat chains Istio declares for the case in family fi:
// ISTIO_OUTPUT_DNS only where a nameserver of the family is.
func (tc istioCase) chains(fi int) []string {
	if tc.dnsOn() && tc.servers(fi) {
		return []string{"ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS", "ISTIO_REDIRECT"}
	}
	return istioChains
}

// tableWant is Istio's chains and rules of table tb for family index fi.
func (tc istioCase) tableWant(fi int, tb string) ([]string, map[string][]string) {
	switch tb {
	case "nat":
		return tc.chains(fi), tc.want(fi)
	case "mangle":
		if tc.tproxy != "" {
			return tc.tproxyMangle(fi)
		}
		if tc.opts[FieldDropInvalid] != "true" {
			return nil, map[string][]string{}
		}
		return []string{"ISTIO_DROP"}, byChain([]string{
			"-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP",
			"-A ISTIO_DROP -j DROP",
		})
	}
	if !tc.dnsOn() {
		return nil, map[string][]string{}
	}
	// raw: the DNS conntrack zones.
	uids, gids := tc.uids, tc.gids
	if uids == nil {
		uids, gids = []string{"1337"}, []string{"1337"}
	}
	rules := []string{"-A OUTPUT -j ISTIO_OUTPUT_DNS"}
	for _, o := range []struct {
		match string
		ids   []string
	}{{"--uid-owner", uids}, {"--gid-owner", gids}} {
		for _, id := range o.ids {
			rules = append(rules,
				"-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner "+o.match+" "+id+" -j CT --zone 1",
				"-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner "+o.match+" "+id+" -j CT --zone 2")
		}
	}
	first := true
	for _, d := range tc.dns {
		a := netip.MustParseAddr(d)
		if a.Is6() != (fi == 1) {
			continue
		}
		if first {
			rules = append(rules, "-A PREROUTING -j ISTIO_INBOUND")
			first = false
		}
		p := netip.PrefixFrom(a, a.BitLen()).String()
		rules = append(rules,
			"-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d "+p+" -j CT --zone 2",
			"-A ISTIO_INBOUND -p udp --sport 53 -s "+p+" -j CT --zone 1")
	}
	if !tc.servers(fi) {
		return []string{"ISTIO_OUTPUT_DNS"}, byChain(rules)
	}
	return []string{"ISTIO_INBOUND", "ISTIO_OUTPUT_DNS"}, byChain(rules)
}

// tproxyMangle is istio-iptables' mangle table in TPROXY mode.
func (tc istioCase) tproxyMangle(fi int) ([]string, map[string][]string) {
	lo, pass := "127.0.0.1/32", "127.0.0.6/32"
	if fi == 1 {
		lo, pass = "::1/128", "::6/128"
	}
	var rules []string
	if c := tc.opts[FieldExcludeInterfaces]; c != "" {
		rules = append(rules, "-A PREROUTING -i "+c+" -j RETURN", "-A OUTPUT -o "+c+" -j RETURN")
	}
	rules = append(rules,
		"-A ISTIO_DIVERT -j MARK --set-mark 1337", "-A ISTIO_DIVERT -j ACCEPT",
		"-A ISTIO_TPROXY ! -d "+lo+" -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
		"-A PREROUTING -p tcp -j ISTIO_INBOUND",
		"-A ISTIO_INBOUND -p tcp -m mark --mark 1337 -j RETURN",
		"-A ISTIO_INBOUND -p tcp -s "+pass+" -i lo -j RETURN",
		"-A ISTIO_INBOUND -p tcp -i lo -m mark ! --mark 1338 -j RETURN")
	if tc.tproxy == "*" {
		rules = append(rules, "-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
			"-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY")
	} else {
		for _, p := range strings.Split(tc.tproxy, ",") {
			rules = append(rules, "-A ISTIO_INBOUND -p tcp --dport "+p+" -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
				"-A ISTIO_INBOUND -p tcp --dport "+p+" -j ISTIO_TPROXY")
		}
	}
	rules = append(rules, "-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark",
		"-A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN",
		"-A OUTPUT ! -d "+lo+" -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338",
		"-A OUTPUT ! -d "+lo+" -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338",
		"-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark")
	return []string{"ISTIO_DIVERT", "ISTIO_INBOUND", "ISTIO_TPROXY"}, byChain(rules)
}

// want is the case's nat rules for family index fi, by chain, normalised.
func (tc istioCase) want(fi int) map[string][]string {
	lo, pass := "127.0.0.1/32", "127.0.0.6/32"
	if fi == 1 {
		lo, pass = "::1/128", "::6/128"
	} else if tc.lo != "" {
		lo = tc.lo
	}
	uids, gids := tc.uids, tc.gids
	if uids == nil {
		uids, gids = []string{"1337"}, []string{"1337"}
	}
	dns := tc.dnsOn()
	var servers []string
	for _, d := range tc.dns {
		a := netip.MustParseAddr(d)
		if a.Is6() == (fi == 1) {
			servers = append(servers, netip.PrefixFrom(a, a.BitLen()).String())
		}
	}
	var rules []string
	rules = append(rules, tc.pre[fi]...)
	rules = append(rules, "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN")
	rules = append(rules, tc.inbound[fi]...)
	rules = append(rules, "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
		"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006")
	rules = append(rules, tc.outHead[fi]...)
	rules = append(rules, "-A OUTPUT -j ISTIO_OUTPUT")
	rules = append(rules, "-A ISTIO_OUTPUT -o lo -s "+pass+" -j RETURN")
	for _, o := range []struct {
		match string
		ids   []string
	}{{"--uid-owner", uids}, {"--gid-owner", gids}} {
		for _, id := range o.ids {
			// With DNS, the UID rules except port 53 from the inbound
			// redirect, and every "! owner" RETURN spares TCP 53.
			ports, loRet := "! --dport 15008", "-o lo"
			if dns && o.match == "--uid-owner" {
				ports = "-m multiport ! --dports 53,15008"
			}
			if dns {
				loRet = "-o lo -p tcp ! --dport 53"
			}
			rules = append(rules, "-A ISTIO_OUTPUT -o lo ! -d "+lo+" -p tcp "+ports+" -m owner "+o.match+" "+id+" -j ISTIO_IN_REDIRECT")
			if !tc.noLoRet {
				rules = append(rules, "-A ISTIO_OUTPUT "+loRet+" -m owner ! "+o.match+" "+id+" -j RETURN")
			}
			rules = append(rules, "-A ISTIO_OUTPUT -m owner "+o.match+" "+id+" -j RETURN")
		}
	}
	tail := tc.outTail[fi]
	// Rules about addresses come after -d {lo} RETURN, group rules before.
	i := 0
	for i < len(tail) && strings.Contains(tail[i], "--gid-owner") {
		i++
	}
	rules = append(rules, tail[:i]...)
	if dns && len(servers) > 0 {
		rules = append(rules, "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS")
		for _, proto := range []string{"tcp", "udp"} {
			for _, s := range servers {
				rules = append(rules, "-A ISTIO_OUTPUT_DNS -p "+proto+" --dport 53 -d "+s+" -j REDIRECT --to-ports 15053")
			}
		}
	}
	rules = append(rules, "-A ISTIO_OUTPUT -d "+lo+" -j RETURN")
	rules = append(rules, tail[i:]...)
	return byChain(rules)
}

// byChain groups "-A CHAIN ..." lines by chain, each normalised.
func byChain(lines []string) map[string][]string {
	m := map[string][]string{}
	for _, l := range lines {
		chain, rule := normIPTRule(l)
		if chain != "" {
			m[chain] = append(m[chain], rule)
		}
	}
	return m
}

// normIPTRule reduces an "-A" line to what it means: module loads (-m
// tcp, -m owner, ...) and our comment dropped, prefixes masked, the
// options (with their "!") sorted, the target last.
func normIPTRule(l string) (chain, rule string) {
	f := strings.Fields(l)
	if len(f) < 2 || f[0] != "-A" {
		return "", ""
	}
	chain, f = f[1], f[2:]
	var opts []string
	var target string
	for i := 0; i < len(f); {
		neg := false
		if f[i] == "!" {
			neg, i = true, i+1
		}
		flag := f[i]
		i++
		var args []string
		for i < len(f) && (!strings.HasPrefix(f[i], "-") || isNumber(f[i])) && f[i] != "!" {
			args = append(args, f[i])
			i++
		}
		switch {
		case flag == "-m" && len(args) == 1 && args[0] != "multiport":
			continue // a module load; its options follow on their own
		case flag == "--comment":
			continue
		case flag == "-j":
			target = strings.Join(append([]string{"-j"}, args...), " ")
			// The target's own options come after it.
			for i < len(f) {
				target += " " + f[i]
				i++
			}
			target = normTarget(target)
			continue
		case flag == "--mark":
			args[0] = normMark(args[0])
		case flag == "-s" || flag == "-d":
			if p, err := netip.ParsePrefix(args[0]); err == nil {
				args[0] = p.Masked().String()
			}
		case flag == "--dport" || flag == "--dports":
			args[0] = strings.ReplaceAll(args[0], "-", ":")
		case flag == "--to-port":
			flag = "--to-ports"
		}
		o := flag + " " + strings.Join(args, " ")
		if neg {
			o = "! " + o
		}
		opts = append(opts, strings.TrimSpace(o))
	}
	sort.Strings(opts)
	return chain, strings.Join(append(opts, target), " ")
}

// normMark prints a mark (decimal, or hex as iptables-save prints it) in
// hex, without a full mask.
func normMark(v string) string {
	v = strings.TrimSuffix(v, "/0xffffffff")
	n, err := strconv.ParseUint(v, 0, 32)
	if err != nil {
		return v
	}
	return "0x" + strconv.FormatUint(n, 16)
}

// normTarget equates a target's Istio spelling with iptables-save's:
// MARK --set-mark N and --set-xmark N/0xffffffff; CONNMARK without and
// with its full masks; TPROXY with its options in any order and the
// wildcard --on-ip.
func normTarget(t string) string {
	f := strings.Fields(t)
	if len(f) < 2 {
		return t
	}
	opt := map[string]string{}
	for i := 2; i+1 < len(f); i++ {
		if strings.HasPrefix(f[i], "--") && !strings.HasPrefix(f[i+1], "--") {
			opt[f[i]] = f[i+1]
		}
	}
	switch f[1] {
	case "MARK":
		v := opt["--set-mark"]
		if v == "" {
			v = opt["--set-xmark"]
		}
		return "-j MARK --set-mark " + normMark(v)
	case "CONNMARK":
		if strings.Contains(t, "--save-mark") {
			return "-j CONNMARK --save-mark"
		}
		return "-j CONNMARK --restore-mark"
	case "TPROXY":
		return "-j TPROXY --on-port " + opt["--on-port"] + " --tproxy-mark " + normMark(opt["--tproxy-mark"])
	}
	return t
}

func isNumber(s string) bool { _, err := strconv.Atoi(s); return err == nil }

// savedTable is what a table holds of ours: declared chains and rules.
type savedTable struct {
	chains []string
	rules  map[string][]string
}

// savedTables reads our chains' declarations and rules out of
// iptables-save (or iptables-restore) text, per table.
func savedTables(text string) map[string]savedTable {
	lines := map[string][]string{}
	table := ""
	for _, l := range strings.Split(text, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, ":ISTIO_"), strings.HasPrefix(l, "-A "):
			lines[table] = append(lines[table], l)
		}
	}
	out := map[string]savedTable{}
	for tb, ls := range lines {
		var st savedTable
		var rules []string
		for _, l := range ls {
			if strings.HasPrefix(l, ":") {
				st.chains = append(st.chains, strings.Fields(l[1:])[0])
			} else {
				rules = append(rules, l)
			}
		}
		sort.Strings(st.chains)
		st.rules = byChain(rules)
		out[tb] = st
	}
	return out
}

// compareText compares the tables of one family, as iptables-save (or
// our rendering) prints them, with Istio's for the case. "" = identical.
func compareText(tc istioCase, fi int, text string) string {
	var out strings.Builder
	got := savedTables(text)
	for _, tb := range []string{"nat", "mangle", "raw"} {
		wantChains, wantRules := tc.tableWant(fi, tb)
		g := got[tb]
		if !slices.Equal(g.chains, wantChains) {
			fmt.Fprintf(&out, "%s chains %v, want %v\n", tb, g.chains, wantChains)
		}
		if d := diffChains(wantRules, g.rules); d != "" {
			fmt.Fprintf(&out, "%s:\n%s", tb, d)
		}
	}
	return out.String()
}

func diffChains(want, got map[string][]string) string {
	var b strings.Builder
	names := map[string]bool{}
	for c := range want {
		names[c] = true
	}
	for c := range got {
		names[c] = true
	}
	var sorted []string
	for c := range names {
		sorted = append(sorted, c)
	}
	sort.Strings(sorted)
	for _, c := range sorted {
		if !slices.Equal(want[c], got[c]) {
			fmt.Fprintf(&b, "chain %s:\n  want:\n    %s\n  got:\n    %s\n", c, strings.Join(want[c], "\n    "), strings.Join(got[c], "\n    "))
		}
	}
	return b.String()
}

// compareCase builds the case and compares it with Istio's rules; it
// returns "" when identical, else what differs.
func compareCase(t *testing.T, tc istioCase) (string, error) {
	t.Helper()
	rs, err := tc.build()
	if err != nil {
		return "", err
	}
	var out strings.Builder
	for fi, f := range []Family{FamilyIPv4, FamilyIPv6} {
		text, err := RenderIPTablesFamily(rs, f)
		if err != nil {
			t.Fatal(err)
		}
		if fi == 1 && !tc.v6 {
			if text != "" {
				out.WriteString("ip6tables rules although the case has IPv6 off\n")
			}
			continue
		}
		if d := compareText(tc, fi, text); d != "" {
			fmt.Fprintf(&out, "%s:\n%s", iptCommand(f), d)
		}
	}
	return out.String(), nil
}

func TestIstioConformanceTable(t *testing.T) {
	cases := istioCases()
	if len(cases) != 27 {
		t.Fatalf("%d cases, want Istio's 27", len(cases))
	}
	identical := 0
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, err := compareCase(t, tc)
			switch {
			case tc.rejects != "":
				if err == nil || !strings.Contains(err.Error(), tc.rejects) {
					t.Errorf("want Build to refuse the config (%q), got %v", tc.rejects, err)
				}
			case err != nil:
				t.Fatalf("config: %v", err)
			case tc.differ == "" && d != "":
				t.Errorf("differs from istio-iptables:\n%s", d)
			case tc.differ != "" && d == "":
				t.Errorf("now identical to istio-iptables: move it out of the known differences (%s)", tc.differ)
			}
			if tc.differ == "" && tc.rejects == "" && d == "" && err == nil {
				identical++
			}
		})
	}
	t.Logf("identical to istio-iptables: %d of %d", identical, len(cases))
}

// TestNormIPTRule: the normaliser equates Istio's spelling and
// iptables-save's, and nothing else.
func TestNormIPTRule(t *testing.T) {
	same := [][2]string{
		{"-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
			"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"},
		{"-A OUTPUT -j ISTIO_OUTPUT", "-A OUTPUT -m comment --comment egress-cni -j ISTIO_OUTPUT"},
		{"-A ISTIO_OUTPUT -d 127.0.0.1/8 -j RETURN", "-A ISTIO_OUTPUT -d 127.0.0.0/8 -j RETURN"},
		{"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001", "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"},
	}
	for _, p := range same {
		c1, r1 := normIPTRule(p[0])
		c2, r2 := normIPTRule(p[1])
		if c1 != c2 || r1 != r2 {
			t.Errorf("not equated:\n%s: %s\n%s: %s", c1, r1, c2, r2)
		}
	}
	differ := [][2]string{
		{"-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN", "-A ISTIO_OUTPUT -o lo -m owner --uid-owner 1337 -j RETURN"},
		{"-A ISTIO_OUTPUT -p tcp --dport 53 -j RETURN", "-A ISTIO_OUTPUT -p udp --dport 53 -j RETURN"},
		{"-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN", "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT"},
		{"-A ISTIO_OUTPUT -j RETURN", "-A ISTIO_INBOUND -j RETURN"},
	}
	for _, p := range differ {
		c1, r1 := normIPTRule(p[0])
		c2, r2 := normIPTRule(p[1])
		if c1 == c2 && r1 == r2 {
			t.Errorf("equated: %q and %q", p[0], p[1])
		}
	}
}

// evalIstio runs a packet through Istio's rules of one family (as the
// table writes them, normalised) and returns the port it is redirected
// to, 0 if none: a small interpreter of the matches the table uses.
func evalIstio(t *testing.T, chains map[string][]string, p Packet) uint16 {
	t.Helper()
	start := "OUTPUT"
	if p.Hook == "prerouting" {
		start = "PREROUTING"
	}
	var run func(chain string, depth int) (port uint16, done bool)
	run = func(chain string, depth int) (uint16, bool) {
		if depth > 8 {
			t.Fatalf("jump loop at %s", chain)
		}
		for _, r := range chains[chain] {
			opts, target, _ := strings.Cut(r, "-j ")
			if !istioMatches(t, strings.Fields(opts), p) {
				continue
			}
			tf := strings.Fields(target)
			switch tf[0] {
			case "RETURN":
				return 0, false
			case "REDIRECT":
				n, _ := strconv.Atoi(tf[len(tf)-1])
				return uint16(n), true
			default:
				if port, done := run(tf[0], depth+1); done {
					return port, true
				}
			}
		}
		return 0, false
	}
	port, _ := run(start, 0)
	return port
}

func istioMatches(t *testing.T, f []string, p Packet) bool {
	t.Helper()
	for i := 0; i < len(f); i++ {
		neg := false
		if f[i] == "!" {
			neg, i = true, i+1
		}
		flag, arg := f[i], ""
		if i+1 < len(f) {
			arg = f[i+1]
		}
		i++
		var ok bool
		switch flag {
		case "-s", "-d":
			pfx := netip.MustParsePrefix(arg)
			a := p.Src
			if flag == "-d" {
				a = p.Dst
			}
			ok = pfx.Contains(a)
		case "-i":
			ok = p.IIF == arg
		case "-o":
			ok = p.OIF == arg
		case "-p":
			ok = p.Proto.String() == arg
		case "--dport":
			n, _ := strconv.Atoi(arg)
			ok = p.DPort == uint16(n)
		case "--dports":
			ok = slices.Contains(strings.Split(arg, ","), strconv.Itoa(int(p.DPort)))
		case "-m":
			ok = true // "-m multiport": the module; its match follows
		case "--uid-owner":
			n, _ := strconv.Atoi(arg)
			ok = p.Hook == "output" && p.UID == uint32(n)
		case "--gid-owner":
			n, _ := strconv.Atoi(arg)
			ok = p.Hook == "output" && p.GID == uint32(n)
		default:
			t.Fatalf("evalIstio: unknown match %s", flag)
		}
		if ok == neg {
			return false
		}
	}
	return true
}

// conformancePackets probes every path the table's cases touch.
func conformancePackets(f Family) []Packet {
	a := func(v4, v6 string) netip.Addr {
		if f == FamilyIPv6 {
			return netip.MustParseAddr(v6)
		}
		return netip.MustParseAddr(v4)
	}
	pod, ext, lo, pass := a("192.0.2.2", "2001:db8:1::2"), a("203.0.113.10", "2001:db8:2::10"), a("127.0.0.1", "::1"), a("127.0.0.6", "::6")
	out := func(oif string, dst netip.Addr, proto Proto, port uint16, uid, gid uint32) Packet {
		src := pod
		if oif == "lo" {
			src = lo
		}
		return Packet{Hook: "output", OIF: oif, Src: src, Dst: dst, Proto: proto, DPort: port, UID: uid, GID: gid}
	}
	in := func(iif string, dst netip.Addr, port uint16) Packet {
		return Packet{Hook: "prerouting", IIF: iif, Src: ext, Dst: dst, Proto: ProtoTCP, DPort: port}
	}
	ps := []Packet{
		out("eth0", ext, ProtoTCP, 80, 1000, 1000),
		out("eth0", ext, ProtoUDP, 80, 1000, 1000),
		out("eth0", a("10.1.2.3", "2001:db8::10"), ProtoTCP, 80, 1000, 1000),
		out("eth0", a("9.9.1.1", "2001:db8:9::1"), ProtoTCP, 80, 1000, 1000),
		out("eth0", a("1.1.1.1", "2001:db8:1:1::1"), ProtoTCP, 80, 1000, 1000),
		out("eth0", ext, ProtoTCP, 32000, 1000, 1000),
		out("eth0", ext, ProtoTCP, 31000, 1000, 1000),
	}
	// The owner matches: proxy UID and GID, other UIDs and groups.
	for _, ug := range [][2]uint32{{1337, 1337}, {3, 1000}, {1000, 2}, {1000, 202}, {1000, 1001}, {1000, 888}, {1000, 21}} {
		ps = append(ps, out("eth0", ext, ProtoTCP, 80, ug[0], ug[1]))
	}
	ps = append(ps,
		out("eth0", a("10.96.0.10", "2001:db8::a"), ProtoUDP, 53, 1000, 1000),
		out("not-istio-nic", ext, ProtoTCP, 80, 1000, 1000),
		out("lo", lo, ProtoTCP, 8080, 1000, 1000),
		out("lo", a("127.1.2.3", "::1"), ProtoTCP, 8080, 1000, 1000))
	for _, ug := range [][2]uint32{{1000, 1000}, {1337, 1337}, {3, 1000}, {4, 1000}} {
		ps = append(ps, out("lo", pod, ProtoTCP, 8080, ug[0], ug[1]))
	}
	ps = append(ps,
		out("lo", pod, ProtoTCP, 15008, 1337, 1337),
		out("lo", lo, ProtoTCP, 8080, 1337, 1337),
		in("eth0", pod, 8080),
		in("eth0", pod, 4000),
		in("eth0", pod, 31000),
		in("eth0", pod, 15008),
		in("eth0", pod, 15021),
		in("eth1", a("10.1.2.3", "2001:db8::10"), 80),
		in("eth2", ext, 80),
		in("eth0", ext, 80),
		in("not-istio-nic", pod, 8080))
	lp := out("lo", pod, ProtoTCP, 8080, 1337, 1337)
	lp.Src = pass
	return append(ps, lp)
}

// TestIstioConformanceTrace: for every identical case, the model (which
// the nftables backend renders in its own syntax, with sets) gives each
// probe packet the verdict Istio's rules give it.
func TestIstioConformanceTrace(t *testing.T) {
	for _, tc := range istioCases() {
		if tc.differ != "" || tc.rejects != "" {
			continue
		}
		t.Run(tc.name, func(t *testing.T) {
			rs := tc.mustBuild(t)
			redirected := 0
			for fi, f := range []Family{FamilyIPv4, FamilyIPv6} {
				if fi == 1 && !tc.v6 {
					continue
				}
				want := tc.want(fi)
				for _, p := range conformancePackets(f) {
					got, err := rs.Trace(p)
					if err != nil {
						t.Fatal(err)
					}
					w := evalIstio(t, want, p)
					if got != w {
						t.Errorf("%+v: redirected to %d, Istio's rules to %d", p, got, w)
					}
					if w != 0 {
						redirected++
					}
				}
			}
			if redirected == 0 {
				t.Error("no probe is redirected: the probes do not exercise the case")
			}
		})
	}
}
