package rules

import (
	"fmt"
	"net/netip"
	"slices"
)

// Loopback addresses of Istio's layout. 127.0.0.6 (::6) is the source the
// proxy uses for inbound passthrough connections to the app.
var (
	v4Passthrough = netip.MustParsePrefix("127.0.0.6/32")
	v6Passthrough = netip.MustParsePrefix("::6/128")
	v4Localhost   = netip.MustParsePrefix("127.0.0.1/32")
	v6Localhost   = netip.MustParsePrefix("::1/128")
)

const loopback = "lo"

// Build turns a validated Config into the Ruleset. It is pure and
// deterministic: the same Config always gives the same Ruleset, which is
// what makes Apply idempotent and Check meaningful.
//
// The layout follows istio-iptables' rules rule for rule (see DESIGN.md
// and the conformance table, conformance_test.go): the nat outbound
// chain is
//
//  1. excluded outbound ports RETURN, tcp and udp
//  2. -o lo -s 127.0.0.6 RETURN
//  3. per proxy UID: -o lo ! -d 127.0.0.1 tcp ! --dport 15008 uid -> ISTIO_IN_REDIRECT
//     -o lo ! uid RETURN (not with a loopback CIDR included); uid RETURN
//  4. the same for each proxy GID
//  5. owner groups: none of the included GIDs RETURN, or each excluded
//     GID RETURN
//  6. (DNS capture) -j ISTIO_OUTPUT_DNS, which redirects tcp and udp 53
//     to 15053: to every address with CaptureAllDNS, else to the
//     nameservers in DNSServers (no nameserver: no DNS capture); the
//     owner rules then keep port 53 apart, and raw holds the conntrack
//     zones (dnsZones)
//  7. -d 127.0.0.1 (the loopback CIDR) RETURN
//  8. excluded CIDRs RETURN
//  9. included ports -> ISTIO_REDIRECT
//  10. everything, or the included CIDRs -> ISTIO_REDIRECT
//
// PREROUTING holds -k's rules and the excluded interfaces before the
// inbound jump; mangle holds --drop-invalid.
func Build(cfg Config) (*Ruleset, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	rs := &Ruleset{Families: cfg.Families}
	fams := familiesOf(cfg.Families)
	// The app's loopback range (ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR).
	v4Loop := v4Localhost
	if cfg.IPv4LoopbackCIDR != nil {
		v4Loop = *cfg.IPv4LoopbackCIDR
	}
	localhost := func(f Family) netip.Prefix {
		if f == FamilyIPv6 {
			return v6Localhost
		}
		return v4Loop
	}
	// A loopback address among the included CIDRs means the app's own
	// loopback traffic to it must be captured: istio-iptables then drops
	// the "-o lo ! owner RETURN" rules.
	includesLoopback := slices.ContainsFunc(cfg.OutboundIncludeCIDRs, func(p netip.Prefix) bool { return p.Addr().IsLoopback() })

	addPortSet := func(name string, ports []PortRange) bool {
		if len(ports) == 0 {
			return false
		}
		rs.Sets = append(rs.Sets, &Set{Name: name, Type: SetPorts, Ports: slices.Clone(ports)})
		return true
	}
	addAddrSets := func(v4name, v6name string, ps []netip.Prefix) (v4, v6 bool) {
		var a4, a6 []netip.Prefix
		for _, p := range ps {
			if p.Addr().Is4() {
				a4 = append(a4, p)
			} else {
				a6 = append(a6, p)
			}
		}
		if len(a4) > 0 && cfg.Families.HasV4() {
			rs.Sets = append(rs.Sets, &Set{Name: v4name, Type: SetIPv4, Prefixes: a4})
			v4 = true
		}
		if len(a6) > 0 && cfg.Families.HasV6() {
			rs.Sets = append(rs.Sets, &Set{Name: v6name, Type: SetIPv6, Prefixes: a6})
			v6 = true
		}
		return v4, v6
	}

	// Base chains.
	pre := &Chain{Name: BasePrerouting, Hook: &Hook{Name: "prerouting", Priority: -100, IPTChain: "PREROUTING"}}
	out := &Chain{Name: BaseOutput, Hook: &Hook{Name: "output", Priority: -100, IPTChain: "OUTPUT"}}
	// -k: inbound traffic from a virtual interface (a VM's) is treated
	// as outbound: the captured destinations go to ISTIO_REDIRECT, the
	// rest is not captured at all. istio-iptables inserts these rules at
	// the head of PREROUTING one by one, so the last interface comes first.
	virt := slices.Clone(cfg.RerouteVirtualInterfaces)
	slices.Reverse(virt)
	if cfg.OutboundIncludeAll {
		for _, i := range virt {
			pre.Rules = append(pre.Rules, Rule{IIF: i, Verdict: jump(ChainRedirect)})
		}
	} else {
		incl := slices.Clone(cfg.OutboundIncludeCIDRs)
		slices.Reverse(incl)
		for _, p := range incl {
			if !familyEnabled(cfg.Families, familyOf(p)) {
				continue
			}
			for _, i := range virt {
				pre.Rules = append(pre.Rules, Rule{Family: familyOf(p), IIF: i, Dst: PtrTo(p), Verdict: jump(ChainRedirect)})
			}
		}
	}
	for _, i := range virt {
		pre.Rules = append(pre.Rules, Rule{IIF: i, Verdict: ret()})
	}
	for _, i := range cfg.ExcludeInterfaces {
		pre.Rules = append(pre.Rules, Rule{IIF: i, Verdict: ret()})
		out.Rules = append(out.Rules, Rule{OIF: i, Verdict: ret()})
	}
	inboundCapture := cfg.InboundIncludeAll || len(cfg.InboundIncludePorts) > 0
	tproxy := cfg.Mode == ModeTPROXY
	if inboundCapture && !tproxy {
		pre.Rules = append(pre.Rules, Rule{Proto: ProtoTCP, Verdict: jump(ChainInbound)})
	}
	out.Rules = append(out.Rules, Rule{Verdict: jump(ChainOutput)})

	// ISTIO_INBOUND.
	// The tunnel-port RETURN is there even when inbound capture is off,
	// as istio-iptables writes it.
	in := &Chain{Name: ChainInbound, Rules: []Rule{{Proto: ProtoTCP, DPort: single(cfg.InboundTunnelPort), Verdict: ret()}}}
	if inboundCapture && !tproxy {
		if cfg.InboundIncludeAll {
			if addPortSet(SetInExcludePort, cfg.InboundExcludePorts) {
				in.Rules = append(in.Rules, Rule{Proto: ProtoTCP, DPortSet: SetInExcludePort, Verdict: ret()})
			}
			in.Rules = append(in.Rules, Rule{Proto: ProtoTCP, Verdict: jump(ChainInRedirect)})
		} else {
			addPortSet(SetInIncludePort, cfg.InboundIncludePorts)
			in.Rules = append(in.Rules, Rule{Proto: ProtoTCP, DPortSet: SetInIncludePort, Verdict: jump(ChainInRedirect)})
		}
	}
	inRedir := &Chain{Name: ChainInRedirect, Rules: []Rule{{Proto: ProtoTCP, Verdict: redirect(cfg.InboundPort)}}}
	redir := &Chain{Name: ChainRedirect, Rules: []Rule{{Proto: ProtoTCP, Verdict: redirect(cfg.ProxyPort)}}}

	// ISTIO_OUTPUT.
	o := &Chain{Name: ChainOutput}
	// -o: excluded ports RETURN for TCP and UDP, as istio-iptables does.
	if addPortSet(SetOutExcludePort, cfg.OutboundExcludePorts) {
		o.Rules = append(o.Rules, Rule{Proto: ProtoTCP, DPortSet: SetOutExcludePort, Verdict: ret()},
			Rule{Proto: ProtoUDP, DPortSet: SetOutExcludePort, Verdict: ret()})
	}
	for _, f := range fams {
		o.Rules = append(o.Rules, Rule{Family: f, OIF: loopback, Src: PtrTo(passthrough(f)), Verdict: ret()})
	}
	owner := func(uid, gid *uint32, neg bool) Rule {
		r := Rule{UID: uid, GID: gid}
		if uid != nil {
			r.UIDNot = neg
		} else {
			r.GIDNot = neg
		}
		return r
	}
	// DNS capture: to every address with CaptureAllDNS, else to the
	// pod's nameservers; with neither, istio-iptables turns it off, and
	// so do we. With it, the owner rules keep port 53 apart, as Istio's
	// do: the proxy's TCP DNS to a loopback resolver is not sent inbound
	// (no loop through 15006), and the app's DNS on lo is not RETURNed
	// before ISTIO_OUTPUT_DNS captures it.
	var dns4, dns6 []netip.Prefix
	for _, a := range cfg.DNSServers {
		p := netip.PrefixFrom(a, a.BitLen())
		if a.Is4() && cfg.Families.HasV4() {
			dns4 = append(dns4, p)
		} else if a.Is6() && cfg.Families.HasV6() {
			dns6 = append(dns6, p)
		}
	}
	dns := cfg.RedirectDNS && (cfg.CaptureAllDNS || len(dns4)+len(dns6) > 0)
	ownerRules := func(uid, gid *uint32) {
		for _, f := range fams {
			r := owner(uid, gid, false)
			r.Family, r.OIF, r.Dst, r.DstNot = f, loopback, PtrTo(localhost(f)), true
			r.Proto, r.DPort, r.DPortNot = ProtoTCP, single(cfg.InboundTunnelPort), true
			if dns && uid != nil {
				// istio-iptables excepts 53 in the UID rules only.
				r.DPort, r.DPortNot, r.DPortsNot = nil, false, []uint16{53, cfg.InboundTunnelPort}
			}
			r.Verdict = jump(ChainInRedirect)
			o.Rules = append(o.Rules, r)
		}
		if !includesLoopback {
			r := owner(uid, gid, true)
			r.OIF, r.Verdict = loopback, ret()
			if dns {
				r.Proto, r.DPort, r.DPortNot = ProtoTCP, single(53), true
			}
			o.Rules = append(o.Rules, r)
		}
		r := owner(uid, gid, false)
		r.Verdict = ret()
		o.Rules = append(o.Rules, r)
	}
	for _, u := range cfg.ProxyUIDs {
		ownerRules(PtrTo(u), nil)
	}
	for _, g := range cfg.ProxyGIDs {
		ownerRules(nil, PtrTo(g))
	}
	// Owner groups: with an include list, every other group RETURNs; with
	// an exclude list, those groups RETURN.
	if len(cfg.OwnerGroupsInclude) > 0 {
		o.Rules = append(o.Rules, Rule{GIDsNot: slices.Clone(cfg.OwnerGroupsInclude), Verdict: ret()})
	} else {
		for _, g := range cfg.OwnerGroupsExclude {
			o.Rules = append(o.Rules, Rule{GID: PtrTo(g), Verdict: ret()})
		}
	}
	var outDNS *Chain
	if dns {
		outDNS = &Chain{Name: ChainOutputDNS}
		if cfg.CaptureAllDNS {
			o.Rules = append(o.Rules, Rule{Verdict: jump(ChainOutputDNS)})
			outDNS.Rules = append(outDNS.Rules,
				Rule{Proto: ProtoTCP, DPort: single(53), Verdict: redirect(cfg.DNSPort)},
				Rule{Proto: ProtoUDP, DPort: single(53), Verdict: redirect(cfg.DNSPort)})
		} else {
			if len(dns4) > 0 {
				o.Rules = append(o.Rules, Rule{Family: FamilyIPv4, Verdict: jump(ChainOutputDNS)})
			}
			if len(dns6) > 0 {
				o.Rules = append(o.Rules, Rule{Family: FamilyIPv6, Verdict: jump(ChainOutputDNS)})
			}
			for _, proto := range []Proto{ProtoTCP, ProtoUDP} {
				for _, p := range append(slices.Clone(dns4), dns6...) {
					outDNS.Rules = append(outDNS.Rules, Rule{Family: familyOf(p), Dst: PtrTo(p), Proto: proto, DPort: single(53), Verdict: redirect(cfg.DNSPort)})
				}
			}
		}
	}
	for _, f := range fams {
		o.Rules = append(o.Rules, Rule{Family: f, Dst: PtrTo(localhost(f)), Verdict: ret()})
	}
	ex4, ex6 := addAddrSets(SetOutExcludeV4, SetOutExcludeV6, cfg.OutboundExcludeCIDRs)
	if ex4 {
		o.Rules = append(o.Rules, Rule{Family: FamilyIPv4, DstSet: SetOutExcludeV4, Verdict: ret()})
	}
	if ex6 {
		o.Rules = append(o.Rules, Rule{Family: FamilyIPv6, DstSet: SetOutExcludeV6, Verdict: ret()})
	}
	if addPortSet(SetOutIncludePort, cfg.OutboundIncludePorts) {
		o.Rules = append(o.Rules, Rule{Proto: ProtoTCP, DPortSet: SetOutIncludePort, Verdict: jump(ChainRedirect)})
	}
	if cfg.OutboundIncludeAll {
		o.Rules = append(o.Rules, Rule{Verdict: jump(ChainRedirect)})
	} else {
		in4, in6 := addAddrSets(SetOutIncludeV4, SetOutIncludeV6, cfg.OutboundIncludeCIDRs)
		if in4 {
			o.Rules = append(o.Rules, Rule{Family: FamilyIPv4, DstSet: SetOutIncludeV4, Verdict: jump(ChainRedirect)})
		}
		if in6 {
			o.Rules = append(o.Rules, Rule{Family: FamilyIPv6, DstSet: SetOutIncludeV6, Verdict: jump(ChainRedirect)})
		}
	}

	rs.Chains = []*Chain{pre, out, in, inRedir, redir, o}
	if outDNS != nil {
		rs.Chains = append(rs.Chains, outDNS)
		rs.Chains = append(rs.Chains, dnsZones(cfg, dns4, dns6)...)
	}
	rs.Chains = append(rs.Chains, mangleChains(cfg, rs, inboundCapture, fams, localhost, addPortSet)...)
	// Build's output must always pass the model check; failing here is a
	// bug in Build, reported rather than applied.
	if err := rs.Validate(); err != nil {
		return nil, fmt.Errorf("internal error: built an invalid ruleset: %w", err)
	}
	return rs, nil
}

func familiesOf(f Families) []Family {
	switch f {
	case IPv4Only:
		return []Family{FamilyIPv4}
	case IPv6Only:
		return []Family{FamilyIPv6}
	}
	return []Family{FamilyIPv4, FamilyIPv6}
}

func passthrough(f Family) netip.Prefix {
	if f == FamilyIPv6 {
		return v6Passthrough
	}
	return v4Passthrough
}

func familyOf(p netip.Prefix) Family {
	if p.Addr().Is6() {
		return FamilyIPv6
	}
	return FamilyIPv4
}

func ret() Verdict               { return Verdict{Kind: VerdictReturn} }
func jump(c string) Verdict      { return Verdict{Kind: VerdictJump, Chain: c} }
func redirect(p uint16) Verdict  { return Verdict{Kind: VerdictRedirect, Port: p} }
func single(p uint16) *PortRange { return &PortRange{p, p} }

// Chains of the raw and mangle tables. In nftables all our chains share
// one table, so raw's namesakes of nat chains get a prefix; iptables
// knows them by their Istio names.
const (
	chainRawPrerouting    = "raw_prerouting"
	chainRawOutput        = "raw_output"
	chainRawInbound       = "raw_" + ChainInbound
	chainRawOutputDNS     = "raw_" + ChainOutputDNS
	chainManglePrerouting = "mangle_prerouting"
)

// dnsZones are istio-iptables' raw-table conntrack zones for captured
// DNS: the proxy's queries (to port 53) and its answers to the app (from
// the DNS port) each get a zone, and so do the app's queries to the
// nameservers and their answers, so that conntrack never matches the
// app's redirected flow with the proxy's upstream one.
func dnsZones(cfg Config, dns4, dns6 []netip.Prefix) []*Chain {
	zone := func(z uint16) Verdict { return Verdict{Kind: VerdictCTZone, Zone: z} }
	pre := &Chain{Name: chainRawPrerouting, Table: TableRaw, Hook: &Hook{Name: "prerouting", Priority: -300, IPTChain: "PREROUTING"}}
	out := &Chain{Name: chainRawOutput, Table: TableRaw, Hook: &Hook{Name: "output", Priority: -300, IPTChain: "OUTPUT"},
		Rules: []Rule{{Verdict: jump(chainRawOutputDNS)}}}
	in := &Chain{Name: chainRawInbound, Table: TableRaw, IPTName: ChainInbound}
	od := &Chain{Name: chainRawOutputDNS, Table: TableRaw, IPTName: ChainOutputDNS}
	owner := func(uid, gid *uint32) {
		od.Rules = append(od.Rules,
			Rule{Proto: ProtoUDP, DPort: single(53), UID: uid, GID: gid, Verdict: zone(1)},
			Rule{Proto: ProtoUDP, SPort: single(cfg.DNSPort), UID: uid, GID: gid, Verdict: zone(2)})
	}
	for _, u := range cfg.ProxyUIDs {
		owner(PtrTo(u), nil)
	}
	for _, g := range cfg.ProxyGIDs {
		owner(nil, PtrTo(g))
	}
	if cfg.CaptureAllDNS {
		pre.Rules = append(pre.Rules, Rule{Verdict: jump(chainRawInbound)})
		od.Rules = append(od.Rules, Rule{Proto: ProtoUDP, DPort: single(53), Verdict: zone(2)})
		in.Rules = append(in.Rules, Rule{Proto: ProtoUDP, SPort: single(53), Verdict: zone(1)})
	} else {
		for _, servers := range [][]netip.Prefix{dns4, dns6} {
			if len(servers) == 0 {
				continue
			}
			pre.Rules = append(pre.Rules, Rule{Family: familyOf(servers[0]), Verdict: jump(chainRawInbound)})
			for _, s := range servers {
				od.Rules = append(od.Rules, Rule{Family: familyOf(s), Dst: PtrTo(s), Proto: ProtoUDP, DPort: single(53), Verdict: zone(2)})
				in.Rules = append(in.Rules, Rule{Family: familyOf(s), Src: PtrTo(s), Proto: ProtoUDP, SPort: single(53), Verdict: zone(1)})
			}
		}
	}
	return []*Chain{pre, out, in, od}
}

// Chains of the mangle table.
const (
	chainMangleOutput  = "mangle_output"
	chainMangleInbound = "mangle_" + ChainInbound
)

// outboundMark is istio-iptables' mark of the proxy's loopback traffic in
// TPROXY mode (1338).
const outboundMark = 1338

// mangleChains: --drop-invalid, and TPROXY mode's inbound capture.
//
// --drop-invalid: mangle PREROUTING sends conntrack INVALID packets (an
// out-of-window segment, say) to ISTIO_DROP, which drops them, rather
// than let them reach a socket that answers with a reset.
//
// TPROXY, as istio-iptables: inbound TCP is handed to the inbound port
// (ISTIO_TPROXY) with its destination untouched and marked; marked
// connections' later packets are marked again (ISTIO_DIVERT) and the
// mark is kept in the connection (CONNMARK), so that the reply of the
// proxy's transparent socket goes back by the mark's route table
// (Ruleset.TProxyRoute). The proxy's own loopback traffic is marked 1338
// so that inbound on lo tells it from the app's.
func mangleChains(cfg Config, rs *Ruleset, inboundCapture bool, fams []Family, localhost func(Family) netip.Prefix, addPortSet func(string, []PortRange) bool) []*Chain {
	tproxy := cfg.Mode == ModeTPROXY
	if !cfg.DropInvalid && !tproxy {
		return nil
	}
	pre := &Chain{Name: chainManglePrerouting, Table: TableMangle, Hook: &Hook{Name: "prerouting", Priority: -150, IPTChain: "PREROUTING"}}
	var out *Chain
	if tproxy {
		out = &Chain{Name: chainMangleOutput, Table: TableMangle, Hook: &Hook{Name: "output", Priority: -150, IPTChain: "OUTPUT"}}
		for _, i := range cfg.ExcludeInterfaces {
			pre.Rules = append(pre.Rules, Rule{IIF: i, Verdict: ret()})
			out.Rules = append(out.Rules, Rule{OIF: i, Verdict: ret()})
		}
	}
	var chains []*Chain
	if cfg.DropInvalid {
		pre.Rules = append(pre.Rules, Rule{CTInvalid: true, Verdict: jump(ChainDrop)})
		chains = append(chains, &Chain{Name: ChainDrop, Table: TableMangle, Rules: []Rule{{Verdict: Verdict{Kind: VerdictDrop}}}})
	}
	if !tproxy {
		return append([]*Chain{pre}, chains...)
	}
	mark := cfg.TProxyMark
	in := &Chain{Name: chainMangleInbound, Table: TableMangle, IPTName: ChainInbound,
		Rules: []Rule{{Proto: ProtoTCP, Mark: PtrTo(mark), Verdict: ret()}}}
	for _, f := range fams {
		in.Rules = append(in.Rules, Rule{Family: f, Proto: ProtoTCP, Src: PtrTo(passthrough(f)), IIF: loopback, Verdict: ret()})
	}
	in.Rules = append(in.Rules, Rule{Proto: ProtoTCP, IIF: loopback, Mark: PtrTo(uint32(outboundMark)), MarkNot: true, Verdict: ret()})
	if inboundCapture {
		pre.Rules = append(pre.Rules, Rule{Proto: ProtoTCP, Verdict: jump(chainMangleInbound)})
		divert := &Chain{Name: ChainDivert, Table: TableMangle, Rules: []Rule{
			{Verdict: Verdict{Kind: VerdictSetMark, Mark: mark}},
			{Verdict: Verdict{Kind: VerdictAccept}},
		}}
		tp := &Chain{Name: ChainTProxy, Table: TableMangle}
		for _, f := range fams {
			tp.Rules = append(tp.Rules, Rule{Family: f, Dst: PtrTo(localhost(f)), DstNot: true, Proto: ProtoTCP,
				Verdict: Verdict{Kind: VerdictTProxy, Port: cfg.InboundPort, Mark: mark}})
		}
		if cfg.InboundIncludeAll {
			if addPortSet(SetInExcludePort, cfg.InboundExcludePorts) {
				in.Rules = append(in.Rules, Rule{Proto: ProtoTCP, DPortSet: SetInExcludePort, Verdict: ret()})
			}
			in.Rules = append(in.Rules,
				Rule{Proto: ProtoTCP, CTEstablished: true, Verdict: jump(ChainDivert)},
				Rule{Proto: ProtoTCP, Verdict: jump(ChainTProxy)})
		} else {
			// One pair per port, in istio-iptables' order.
			for _, p := range cfg.InboundIncludePorts {
				in.Rules = append(in.Rules,
					Rule{Proto: ProtoTCP, DPort: PtrTo(p), CTEstablished: true, Verdict: jump(ChainDivert)},
					Rule{Proto: ProtoTCP, DPort: PtrTo(p), Verdict: jump(ChainTProxy)})
			}
		}
		chains = append(chains, divert, tp)
		rs.TProxyRoute = &TProxyRoute{Mark: mark, Table: cfg.TProxyRouteTable}
	}
	pre.Rules = append(pre.Rules, Rule{Proto: ProtoTCP, Mark: PtrTo(mark), Verdict: Verdict{Kind: VerdictConnmarkSave}})
	out.Rules = append(out.Rules, Rule{Proto: ProtoTCP, OIF: loopback, Mark: PtrTo(mark), Verdict: ret()})
	owner := func(uid, gid *uint32) {
		for _, f := range fams {
			out.Rules = append(out.Rules, Rule{Family: f, Dst: PtrTo(localhost(f)), DstNot: true, Proto: ProtoTCP, OIF: loopback,
				UID: uid, GID: gid, Verdict: Verdict{Kind: VerdictSetMark, Mark: outboundMark}})
		}
	}
	for _, u := range cfg.ProxyUIDs {
		owner(PtrTo(u), nil)
	}
	for _, g := range cfg.ProxyGIDs {
		owner(nil, PtrTo(g))
	}
	out.Rules = append(out.Rules, Rule{Proto: ProtoTCP, ConnMark: PtrTo(mark), Verdict: Verdict{Kind: VerdictConnmarkRestore}})
	return append([]*Chain{pre, out, in}, chains...)
}
