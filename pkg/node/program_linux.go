package node

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Names of what we own in the host namespace. They are a public contract
// (runbooks read the counters by name): never rename them.
const (
	Table = "egress_cni_node"

	// inet table
	ChainSource      = "source"      // filter hook prerouting priority -300 (raw): source validation
	ChainConn        = "conn"        // regular, egress role, jumped to from forward for new connections: the gateway label
	ChainForward     = "forward"     // filter hook forward: the exit judgement
	ChainPostrouting = "postrouting" // nat hook postrouting (egress role)
	ChainOutput      = "output"      // filter hook output priority -300: the node's own ICMP and ICMPv6 errors
	// bridge table
	ChainBridgePre = "prerouting" // filter hook prerouting priority -200: source validation per bridge port
	ChainBridgeFwd = "forward"    // filter hook forward: pod ports bridge only to pod ports

	SetAllowV4      = "allow_v4"
	SetAllowV6      = "allow_v6"
	SetPodIfaces    = "pod_ifaces"     // ifname: registered pod ports (bridge) or routed pod interfaces (inet)
	SetPodSourcesV4 = "pod_sources_v4" // ifname . ipv4_addr: what a pod's interface may emit
	SetPodSourcesV6 = "pod_sources_v6"
	SetPodAddrsV4   = "pod_addrs_v4" // ipv4_addr: every registered pod address of the node
	SetPodAddrsV6   = "pod_addrs_v6"
	SetGatewaysV4   = "gateways_v4" // ifname . ipv4_addr, inet table, egress role only
	SetGatewaysV6   = "gateways_v6"

	// CounterDropped counts packets toward the outside of the cluster
	// dropped at the exit: `nft list counter inet egress_cni_node dropped`.
	CounterDropped = "dropped"
	// CounterForged counts packets dropped for a source address their
	// interface may not use (inet and bridge tables).
	CounterForged = "forged"

	// LogPrefix starts the optional, rate-limited drop log line; the
	// kernel's line carries SRC=, the pod's address.
	LogPrefix = "egress-cni drop: "

	ifNameSize = 16
)

// Priorities of our base chains.
const (
	prioSource    = -300 // raw: before conntrack (-200) sees the packet
	prioForward   = -5
	prioNAT       = 100
	prioBridgePre = -200
)

// rule is one rule of the program: its nft text (shown by `show`, stored
// as the rule's comment so Check can name it) and its expressions. Both
// come from the same builder calls, so they cannot disagree.
type rule struct {
	text  []string
	exprs []expr.Any
}

func (r *rule) add(text string, e ...expr.Any) *rule {
	if text != "" {
		r.text = append(r.text, text)
	}
	r.exprs = append(r.exprs, e...)
	return r
}

func (r *rule) String() string { return strings.Join(r.text, " ") }

// chainSpec is a chain of the program.
type chainSpec struct {
	family nftables.TableFamily
	name   string
	hook   *nftables.ChainHook
	prio   int32
	typ    nftables.ChainType
	rules  []*rule
	// drop: the chain's policy is drop and its last rule is an explicit
	// verdict, so that `nft flush table` (or a flushed chain) fails
	// closed: with no rule left, the policy drops everything. Only
	// deleting the table opens the node, until the agent repairs it.
	drop bool
}

func (s *chainSpec) baseText() string {
	if s.hook == nil {
		return ""
	}
	hook := map[*nftables.ChainHook]string{nftables.ChainHookPrerouting: "prerouting", nftables.ChainHookForward: "forward",
		nftables.ChainHookPostrouting: "postrouting", nftables.ChainHookOutput: "output"}[s.hook]
	policy := "accept"
	if s.drop {
		policy = "drop"
	}
	return fmt.Sprintf("type %s hook %s priority %d; policy %s;", s.typ, hook, s.prio, policy)
}

// setSpec is a named set of the program. Dynamic sets hold per-pod
// elements written by the CNI plugin; Apply creates them and never
// flushes them.
type setSpec struct {
	table   *nftables.Table
	name    string
	keyType nftables.SetDatatype
	concat  bool
	// static: the allow sets, whose elements Apply replaces.
	static bool
}

func (s *setSpec) set() *nftables.Set {
	st := &nftables.Set{Table: s.table, Name: s.name, KeyType: s.keyType, Concatenation: s.concat}
	if s.keyType.Name == nftables.TypeIFName.Name {
		// nft prints (and reloads) a string key only when the set says
		// its byte order.
		st.KeyByteOrder = binaryutil.NativeEndian
	}
	if s.static {
		st.Interval = true
		st.Comment = formatComment
	}
	return st
}

// program is the whole desired node state, minus per-pod elements.
type program struct {
	cfg    *Config
	sets   []*setSpec
	chains []*chainSpec
}

var (
	ifaceV4 = nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIPAddr)
	ifaceV6 = nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIP6Addr)
)

// podSets are the per-pod sets of a table.
func podSets(t *nftables.Table) []*setSpec {
	return []*setSpec{
		{table: t, name: SetPodIfaces, keyType: nftables.TypeIFName},
		{table: t, name: SetPodSourcesV4, keyType: ifaceV4, concat: true},
		{table: t, name: SetPodSourcesV6, keyType: ifaceV6, concat: true},
		{table: t, name: SetPodAddrsV4, keyType: nftables.TypeIPAddr},
		{table: t, name: SetPodAddrsV6, keyType: nftables.TypeIP6Addr},
	}
}

func gatewaySets() []*setSpec {
	return []*setSpec{
		{table: inetTable, name: SetGatewaysV4, keyType: ifaceV4, concat: true},
		{table: inetTable, name: SetGatewaysV6, keyType: ifaceV6, concat: true},
	}
}

func newProgram(cfg *Config) *program {
	p := &program{cfg: cfg}
	egress := cfg.Role == RoleEgress
	label := labelBytes(cfg.ConnLabel)

	p.sets = append(p.sets,
		&setSpec{table: inetTable, name: SetAllowV4, keyType: nftables.TypeIPAddr, static: true},
		&setSpec{table: inetTable, name: SetAllowV6, keyType: nftables.TypeIP6Addr, static: true})
	p.sets = append(p.sets, podSets(inetTable)...)
	if egress {
		p.sets = append(p.sets, gatewaySets()...)
	}
	p.sets = append(p.sets, podSets(bridgeTable)...)

	// 1. Source validation, in the raw prerouting hook: before conntrack
	// sees the packet, so a forged packet neither creates nor rides a
	// connection. A registered interface may emit only its pods'
	// addresses; a registered address may come only from its own
	// interface; anything else must arrive on the interface its source
	// is routed through (strict reverse path), every packet, whatever
	// its destination: the node itself answers a forged source too (an
	// echo reply carrying the payload, an ICMP error quoting it, Time
	// Exceeded for TTL 1, sent before the forward hook). Found by the
	// second red-team pass when this check ran on new forwarded
	// connections only.
	src := &chainSpec{family: nftables.TableFamilyINet, name: ChainSource, hook: nftables.ChainHookPrerouting, prio: prioSource, typ: nftables.ChainTypeFilter, drop: true}
	// IPv4 source routing: the kernel rewrites the destination after the
	// forward hook, so the exit would judge the node's own (allowed)
	// address while the packet leaves for the next hop in the option
	// (found by the third red-team pass, with accept_source_route on).
	// Nobody needs it (RFC 7126): dropped from everywhere.
	for _, o := range []struct {
		name string
		typ  uint8
	}{{"lsrr", 131}, {"ssrr", 137}} {
		r := matchNfproto(&rule{}, false)
		r.add("ip option "+o.name+" exists",
			// [ exthdr load ipv4 1b @ TYPE + 0 present => reg 1 ] [ cmp eq reg 1 1 ]
			&expr.Exthdr{Op: exthdrOpIPv4, Type: o.typ, Len: 1, Flags: unix.NFT_EXTHDR_F_PRESENT, DestRegister: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}})
		src.rules = append(src.rules, r.add(gotoAudit(ReasonSourceRoute)))
	}
	// Any other IPv4 options, to a unicast address. The exists match
	// above asks the kernel's option parser in its strict mode (options
	// given by a user), which rejects, so does not match, a source route
	// whose pointer is not 4 or whose length is odd, or one behind an
	// option the sending task may not set; the receive path accepts the
	// same packet and routes it by the option (found by the fourth
	// red-team pass: a routed pod's LSRR with pointer 8 reached the
	// internet, and an exhausted one made the node echo the payload out
	// by the reversed route). So the header length decides: nothing in a
	// cluster needs IPv4 options to a unicast address; IGMP's Router
	// Alert goes to multicast.
	src.rules = append(src.rules, matchIPv4Options(&rule{}).add(gotoAudit(ReasonIPOptions)))
	// 127.0.0.0/8 from anywhere but lo: with route_localnet on (kube-proxy's
	// iptables mode sets it) the node delivers it to services bound to
	// its localhost, which may relay (found by the fourth red-team pass).
	src.rules = append(src.rules, matchLoopbackDest(&rule{}).add(gotoAudit(ReasonLoopback)))
	for _, v6 := range []bool{false, true} {
		src.rules = append(src.rules, sourceRules(v6, func(r *rule) *rule { return matchNfproto(r, v6) })...)
	}
	// Link-scope multicast gets no pass of its own: neighbour discovery,
	// MLD and DAD come from link-local or :: sources, accepted above, or
	// from a global source on its own link, which the reverse-path check
	// accepts. Anything else to ff02::/16 is a forged source the node
	// would answer (found by the fourth red-team pass; the multicast
	// test in pkg/node fails with an ff02::/16 accept here).
	src.rules = append(src.rules, matchReversePathMissing(&rule{}).add(gotoAudit(ReasonReversePath)))
	src.rules = append(src.rules, acceptRule())
	p.chains = append(p.chains, src)

	// 2. Egress nodes: a gateway's new connection gets our conntrack
	// label, in a chain jumped to from the exit's first rule for new
	// connections (a chain of the forward hook rather than a base chain
	// of its own: one hook less per packet).
	conn := &chainSpec{family: nftables.TableFamilyINet, name: ChainConn}
	if egress {
		for _, v6 := range []bool{false, true} {
			r := matchNfproto(&rule{}, v6)
			matchGateway(r, v6)
			r.add(fmt.Sprintf("ct label set %d", cfg.ConnLabel),
				&expr.Immediate{Register: 1, Data: label},
				&expr.Ct{Key: expr.CtKeyLABELS, Register: 1, SourceRegister: true})
			conn.rules = append(conn.rules, r)
		}
		p.chains = append(p.chains, conn)
	}

	// 2b. What the node itself says to the outside about a packet it
	// was sent. The kernel handles an IPv6 Hop-by-Hop header in
	// ip6_rcv_core, before the prerouting hook: an unknown option of
	// type 0x80-0xff makes it drop the packet and answer its source
	// with a Parameter Problem quoting about 1,200 bytes of it. The
	// source chain never sees that packet, so a forged internet source
	// (from a routed pod, or inside an overlay the node decapsulates)
	// would get the pod's data from the node itself (found by the last
	// red-team pass). So the node's own ICMPv6 errors may go only to
	// cluster destinations; Packet Too Big excepted, which answers a
	// packet after its source was validated (path MTU discovery, from
	// the outside to a gateway too). Policy accept: this chain judges
	// nothing else the node sends.
	out := &chainSpec{family: nftables.TableFamilyINet, name: ChainOutput, hook: nftables.ChainHookOutput, prio: prioSource, typ: nftables.ChainTypeFilter}
	// What the node sends to its loopback addresses never leaves: its
	// ICMP errors to 127.0.0.1 or ::1 (ECONNREFUSED for a closed local
	// port) pass (the seventh red-team pass found them dropped as
	// reflection).
	out.rules = append(out.rules, loopbackAccept()...)
	out.rules = append(out.rules, matchICMPv6Error(&rule{}).add("ip6 daddr != @"+SetAllowV6,
		daddr(true), &expr.Lookup{SourceRegister: 1, SetName: SetAllowV6, Invert: true}).add(gotoAudit(ReasonReflection)))
	// IPv4 has the same hole one step later: conntrack's defragmenter
	// (prerouting -400) holds a first fragment with a forged internet
	// source, sent to one of the node's addresses, and when the queue
	// expires the kernel answers the source with a Time Exceeded quoting
	// ~550 bytes of it; the source chain never saw the fragment (found
	// by the red-team pass after the IPv6 fix). So the node's own ICMP
	// errors go only to cluster destinations too, but Fragmentation
	// Needed (path MTU discovery, answering a validated source).
	out.rules = append(out.rules, fragNeededAccept())
	for _, typ := range icmpv4Errors {
		r := matchICMPv4(&rule{}, typ)
		r.add("ip daddr != @"+SetAllowV4, daddr(false), &expr.Lookup{SourceRegister: 1, SetName: SetAllowV4, Invert: true})
		out.rules = append(out.rules, r.add(gotoAudit(ReasonReflection)))
	}
	// The node's own IPv4 packets with options leave for cluster
	// destinations only: a reversed source route, say, answering a
	// packet the source chain should have stopped. Multicast passes, as
	// in the source rule: IGMPv2 reports carry Router Alert to the group
	// (found by the fifth red-team pass).
	out.rules = append(out.rules, matchIPv4Options(&rule{}).add("ip daddr != @"+SetAllowV4,
		daddr(false), &expr.Lookup{SourceRegister: 1, SetName: SetAllowV4, Invert: true}).add(gotoAudit(ReasonReflection)))
	out.rules = append(out.rules, acceptRule())
	p.chains = append(p.chains, out)

	// 3. The exit: every forwarded packet, after DNAT, whatever it came
	// in on. Cluster destinations pass; the gateway passes in its own
	// labelled connection; replies of connections the outside opened
	// pass; everything else is dropped.
	fwd := &chainSpec{family: nftables.TableFamilyINet, name: ChainForward, hook: nftables.ChainHookForward, prio: prioForward, typ: nftables.ChainTypeFilter, drop: true}
	if egress {
		fwd.rules = append(fwd.rules, matchCtState(&rule{}, expr.CtStateBitNEW, "new").add("jump "+ChainConn,
			&expr.Verdict{Kind: expr.VerdictJump, Chain: ChainConn}))
	}
	if cfg.IngressReplies {
		// Every new connection whose original-direction packet crosses
		// this chain (it passed the source checks; if it is dropped
		// below, the entry is never confirmed) carries the ingress
		// label: rule (c) lets only such connections' replies out. A
		// connection still unanswered from a window without our tables
		// is labelled by its next original packet, which must pass the
		// source checks too (the eighth red-team pass found no use of
		// it: a pod-opened one only lets replies to the pod in).
		in := labelBytes(cfg.IngressLabel())
		fwd.rules = append(fwd.rules, matchCtState(&rule{}, expr.CtStateBitNEW, "new").add(fmt.Sprintf("ct label set %d", cfg.IngressLabel()),
			&expr.Immediate{Register: 1, Data: in},
			&expr.Ct{Key: expr.CtKeyLABELS, Register: 1, SourceRegister: true}))
	}
	for _, v6 := range []bool{false, true} {
		set, fam := SetAllowV4, "ip"
		if v6 {
			set, fam = SetAllowV6, "ip6"
		}
		r := matchNfproto(&rule{}, v6)
		r.add(fam+" daddr @"+set, daddr(v6), &expr.Lookup{SourceRegister: 1, SetName: set})
		fwd.rules = append(fwd.rules, r.add("accept", verdict(expr.VerdictAccept)))
	}
	if egress {
		for _, v6 := range []bool{false, true} {
			r := matchLabel(&rule{}, cfg.ConnLabel, label)
			matchNfproto(r, v6)
			matchGateway(r, v6)
			fwd.rules = append(fwd.rules, r.add("accept", verdict(expr.VerdictAccept)))
		}
	}
	if cfg.IngressReplies {
		r := (&rule{}).add("ct direction reply",
			// [ ct load direction => reg 1 ] [ cmp eq reg 1 0x01 ]
			&expr.Ct{Key: expr.CtKeyDIRECTION, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}})
		matchCtState(r, expr.CtStateBitESTABLISHED, "established")
		// Only connections whose first packet crossed this chain
		// (labelled above): not one conntrack made while our tables
		// were missing.
		matchLabel(r, cfg.IngressLabel(), labelBytes(cfg.IngressLabel()))
		fwd.rules = append(fwd.rules, r.add("accept", verdict(expr.VerdictAccept)))
	}
	if cfg.LogDrops {
		fwd.rules = append(fwd.rules, (&rule{}).add(fmt.Sprintf("limit rate %d/second log prefix %q", cfg.LogRate, LogPrefix),
			// [ limit rate N/second burst 5 type packets ]
			&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(cfg.LogRate), Unit: expr.LimitTimeSecond, Burst: 5},
			// [ log prefix ... ]
			// (level warn, nft's default, which the kernel fills in)
			&expr.Log{Key: 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_LEVEL, Level: expr.LogLevelWarning, Data: []byte(LogPrefix)}))
	}
	// A registered pod's own packet is not-a-gateway; anything else
	// (no pod's interface and address) has no identity.
	for _, v6 := range []bool{false, true} {
		sources, fam := SetPodSourcesV4, "ip"
		if v6 {
			sources, fam = SetPodSourcesV6, "ip6"
		}
		r := matchNfproto(&rule{}, v6)
		r.add("iifname . "+fam+" saddr @"+sources,
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			saddrTo(v6, 2),
			&expr.Lookup{SourceRegister: 1, SetName: sources})
		fwd.rules = append(fwd.rules, r.add(gotoAudit(ReasonNotAGateway)))
	}
	fwd.rules = append(fwd.rules, (&rule{}).add(gotoAudit(ReasonNoIdentity)))
	p.chains = append(p.chains, fwd)

	if egress {
		post := &chainSpec{family: nftables.TableFamilyINet, name: ChainPostrouting, hook: nftables.ChainHookPostrouting, prio: prioNAT, typ: nftables.ChainTypeNAT}
		if cfg.EgressIP.IsValid() {
			r := &rule{}
			matchIfname(r, "oifname", cfg.Uplink)
			matchNfproto(r, cfg.EgressIP.Is6())
			matchLabel(r, cfg.ConnLabel, label)
			fam, nfp := "ip", uint32(unix.NFPROTO_IPV4)
			if cfg.EgressIP.Is6() {
				fam, nfp = "ip6", unix.NFPROTO_IPV6
			}
			r.add("snat "+fam+" to "+cfg.EgressIP.String(),
				// [ immediate reg 1 ADDR ] [ nat snat FAM addr_min reg 1 ]
				&expr.Immediate{Register: 1, Data: cfg.EgressIP.AsSlice()},
				&expr.NAT{Type: expr.NATTypeSourceNAT, Family: nfp, RegAddrMin: 1, Specified: true})
			post.rules = append(post.rules, r)
		}
		// Masquerade what the SNAT rule did not take (the other family,
		// or everything when no egress IP is set).
		r := &rule{}
		matchIfname(r, "oifname", cfg.Uplink)
		matchLabel(r, cfg.ConnLabel, label)
		post.rules = append(post.rules, r.add("masquerade", &expr.Masq{}))
		p.chains = append(p.chains, post)
	}

	// 4. Bridged pods: the IP hooks see the bridge, not the pod's port,
	// so the same validation runs per bridge port here.
	br := &chainSpec{family: nftables.TableFamilyBridge, name: ChainBridgePre, hook: nftables.ChainHookPrerouting, prio: prioBridgePre, typ: nftables.ChainTypeFilter, drop: true}
	// A veth port (a pod's, registered or not) may send only untagged
	// IPv4, IPv6 and ARP. A frame with two VLAN priority tags reads as
	// VLAN in meta protocol here, while the host strips both and takes it
	// for plain IP from the bridge: it would skip every rule below
	// (found by the escape matrix). The outer EtherType is what counts.
	{
		r := (&rule{}).add(`meta iifkind "veth"`,
			// [ meta load iifkind => reg 1 ] [ cmp eq reg 1 "veth" ]
			&expr.Meta{Key: metaKeyIIFKIND, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifnameKey("veth")})
		for _, et := range []struct {
			name  string
			proto uint16
		}{{"ip", unix.ETH_P_IP}, {"ip6", unix.ETH_P_IPV6}, {"arp", unix.ETH_P_ARP}} {
			r.add("ether type != "+et.name,
				&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: 12, Len: 2},
				&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.BigEndian.PutUint16(et.proto)})
		}
		br.rules = append(br.rules, r.add(gotoAudit(ReasonBadEtherType)))
	}
	for _, v6 := range []bool{false, true} {
		// An IP packet in a VLAN tag on another kind of port (even
		// priority tag 0, which the host delivers as untagged) would not
		// match "ether type ip" below: drop it too.
		wrapped := matchProto(&rule{}, v6)
		etherType(wrapped, v6, true)
		br.rules = append(br.rules, wrapped.add(gotoAudit(ReasonVLANWrapped)))
		br.rules = append(br.rules, sourceRules(v6, func(r *rule) *rule { return etherType(r, v6, false) })...)
	}
	br.rules = append(br.rules, acceptRule())
	p.chains = append(p.chains, br)

	// 5. Bridged frames never reach the IP forward hook unless
	// br_netfilter is on: a frame from a pod port may be bridged only to
	// another pod port, never to a NIC or tunnel enslaved to the bridge.
	bfwd := &chainSpec{family: nftables.TableFamilyBridge, name: ChainBridgeFwd, hook: nftables.ChainHookForward, prio: 0, typ: nftables.ChainTypeFilter, drop: true}
	r := (&rule{}).add("iifname @"+SetPodIfaces,
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: SetPodIfaces})
	r.add("oifname != @"+SetPodIfaces,
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: SetPodIfaces, Invert: true})
	bfwd.rules = append(bfwd.rules, r.add(gotoAudit(ReasonBridgeBypass)), acceptRule())
	p.chains = append(p.chains, bfwd)

	// 6. The drop chains, one per reason and table, which every drop
	// above goes to.
	for _, a := range auditSpecs {
		p.chains = append(p.chains, p.auditChain(a))
	}
	return p
}

// sourceRules are the per-family source checks of a registered pod
// interface (bridge port or routed veth) and of registered addresses.
func sourceRules(v6 bool, proto func(*rule) *rule) []*rule {
	sources, addrs, fam := SetPodSourcesV4, SetPodAddrsV4, "ip"
	if v6 {
		sources, addrs, fam = SetPodSourcesV6, SetPodAddrsV6, "ip6"
	}
	ok := proto(&rule{})
	ok.add("iifname . "+fam+" saddr @"+sources,
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		saddrTo(v6, 2),
		&expr.Lookup{SourceRegister: 1, SetName: sources})
	// accept, not return: in a base chain return means the policy,
	// which is drop (so that a flushed chain fails closed).
	ok.add("accept", verdict(expr.VerdictAccept))
	out := []*rule{ok}
	if v6 {
		// Link scope: a pod's link-local address (and :: for duplicate
		// address detection) is not in its CNI result, but neighbour
		// discovery and MLD need it; the exit still allows a link-local
		// source only toward the link scope.
		out = append(out, linkScopeAccepts(proto)...)
	}

	wrongSrc := proto(&rule{})
	wrongSrc.add("iifname @"+SetPodIfaces,
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: SetPodIfaces})
	wrongSrc.add(gotoAudit(ReasonForgedSource))

	stolen := proto(&rule{})
	stolen.add(fam+" saddr @"+addrs, saddrTo(v6, 1), &expr.Lookup{SourceRegister: 1, SetName: addrs})
	stolen.add(gotoAudit(ReasonStolenAddress))
	return append(out, wrongSrc, stolen)
}

// etherType matches the frame's EtherType (ether type ip), or with not
// its absence (ether type != ip).
func etherType(r *rule, v6, not bool) *rule {
	proto, name := uint16(unix.ETH_P_IP), "ip"
	if v6 {
		proto, name = unix.ETH_P_IPV6, "ip6"
	}
	op, text := expr.CmpOpEq, "ether type "+name
	if not {
		op, text = expr.CmpOpNeq, "ether type != "+name
	}
	// [ payload load 2b @ link header + 12 => reg 1 ] [ cmp eq reg 1 0x0008 ]
	return r.add(text,
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: 12, Len: 2},
		&expr.Cmp{Op: op, Register: 1, Data: binaryutil.BigEndian.PutUint16(proto)})
}

// exthdrOpIPv4 is NFT_EXTHDR_OP_IPV4 (IPv4 options), which
// google/nftables v0.3.0 does not name.
const exthdrOpIPv4 expr.ExthdrOp = 2

// metaKeyIIFKIND is NFT_META_IIFKIND (the input device's rtnl kind,
// "veth"), which google/nftables v0.3.0 does not name.
const metaKeyIIFKIND expr.MetaKey = 26

// matchProto matches the packet's L3 protocol (skb->protocol, which a
// VLAN tag does not hide).
func matchProto(r *rule, v6 bool) *rule {
	proto, name := uint16(unix.ETH_P_IP), "ip"
	if v6 {
		proto, name = unix.ETH_P_IPV6, "ip6"
	}
	// [ meta load protocol => reg 1 ] [ cmp eq reg 1 0x0008 ]
	return r.add("meta protocol "+name,
		&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(proto)})
}

func verdict(k expr.VerdictKind) *expr.Verdict { return &expr.Verdict{Kind: k} }

// acceptRule ends a policy-drop chain in steady state.
func acceptRule() *rule { return (&rule{}).add("accept", verdict(expr.VerdictAccept)) }

func counterDrop(name string) (string, expr.Any, expr.Any) {
	// [ objref type 1 name NAME ] [ immediate reg 0 drop ]
	return "counter name " + name + " drop", &expr.Objref{Type: 1, Name: name}, verdict(expr.VerdictDrop)
}

// labelBytes is the 16-byte conntrack label bitmap with bit n set, as
// the kernel stores it (an array of native-endian 32-bit words).
func labelBytes(n int) []byte {
	b := make([]byte, 16)
	copy(b[(n/32)*4:], binaryutil.NativeEndian.PutUint32(1<<(n%32)))
	return b
}

func matchLabel(r *rule, n int, label []byte) *rule {
	// [ ct load label => reg 1 ] [ bitwise reg 1 = (reg 1 & LABEL) ^ 0 ] [ cmp neq reg 1 0 ]
	return r.add(fmt.Sprintf("ct label %d", n),
		&expr.Ct{Key: expr.CtKeyLABELS, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 16, Mask: label, Xor: make([]byte, 16)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 16)})
}

func matchCtState(r *rule, bit uint32, name string) *rule {
	// [ ct load state => reg 1 ] [ bitwise reg 1 = (reg 1 & BIT) ^ 0 ] [ cmp neq reg 1 0 ]
	return r.add("ct state "+name,
		&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(bit), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)})
}

// matchIfname matches iifname/oifname exactly.
func matchIfname(r *rule, key, name string) {
	k := expr.MetaKeyIIFNAME
	if key == "oifname" {
		k = expr.MetaKeyOIFNAME
	}
	// [ meta load oifname => reg 1 ] [ cmp eq reg 1 NAME ]
	r.add(fmt.Sprintf("%s %q", key, name),
		&expr.Meta{Key: k, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifnameKey(name)})
}

// matchIPv4Options matches an IPv4 packet with options (a header longer
// than 20 bytes) to a destination outside 224.0.0.0/4 (IGMP's Router
// Alert goes to multicast groups, and the kernel follows no source route
// to one).
func matchIPv4Options(r *rule) *rule {
	matchNfproto(r, false).add("ip hdrlength != 5",
		// [ payload load 1b @ network header + 0 => reg 1 ] [ bitwise reg 1 = (reg 1 & 0x0f) ^ 0x00 ] [ cmp neq reg 1 0x05 ]
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 0, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x0f}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{5}})
	return r.add("ip daddr != 224.0.0.0/4",
		// [ payload load 1b @ network header + 16 => reg 1 ] [ bitwise reg 1 = (reg 1 & 0xf0) ^ 0x00 ] [ cmp neq reg 1 0xe0 ]
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0xf0}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0xe0}})
}

func matchNfproto(r *rule, v6 bool) *rule {
	p, name := byte(unix.NFPROTO_IPV4), "ipv4"
	if v6 {
		p, name = unix.NFPROTO_IPV6, "ipv6"
	}
	// [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x02 ]
	return r.add("meta nfproto "+name,
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}})
}

// matchICMPv4: meta nfproto ipv4 meta l4proto icmp icmp type typ.
func matchICMPv4(r *rule, typ byte) *rule {
	matchNfproto(r, false)
	return r.add("meta l4proto icmp",
		// [ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x01 ]
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMP}}).add(fmt.Sprintf("icmp type %d", typ),
		// [ payload load 1b @ transport header + 0 => reg 1 ] [ cmp eq reg 1 TYPE ]
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{typ}})
}

// matchGateway: iifname . ip saddr @gateways_v4 (or v6).
func matchGateway(r *rule, v6 bool) {
	set, fam := SetGatewaysV4, "ip"
	if v6 {
		set, fam = SetGatewaysV6, "ip6"
	}
	// [ meta load iifname => reg 1 ]
	// [ payload load Nb @ network header + OFF => reg 2 ]
	// [ lookup reg 1 set gateways_vX ]
	r.add("iifname . "+fam+" saddr @"+set,
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		saddrTo(v6, 2),
		&expr.Lookup{SourceRegister: 1, SetName: set})
}

func saddrTo(v6 bool, reg uint32) *expr.Payload {
	off, n := uint32(12), uint32(4)
	if v6 {
		off, n = 8, 16
	}
	// [ payload load Nb @ network header + OFF => reg N ]
	return &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}
}

func daddr(v6 bool) *expr.Payload {
	off, n := uint32(16), uint32(4)
	if v6 {
		off, n = 24, 16
	}
	// [ payload load Nb @ network header + OFF => reg 1 ]
	return &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}
}

func ifnameKey(name string) []byte {
	b := make([]byte, ifNameSize)
	copy(b, name)
	return b
}

// ifaceAddrKey is the concatenated set key ifname . address.
func ifaceAddrKey(iface string, ip netip.Addr) []byte {
	return append(ifnameKey(iface), ip.AsSlice()...)
}

// icmpv4Errors are the ICMP error types the node's output keeps in the
// cluster: unreachable, source quench, redirect, time exceeded,
// parameter problem.
var icmpv4Errors = []byte{3, 4, 5, 11, 12}

// linkScopeAccepts accept an IPv6 link-local source, to any destination
// (neighbour solicitations to a global address come from one), and the
// unspecified source to link-scope multicast (duplicate address
// detection). proto adds the family or interface match in front.
func linkScopeAccepts(proto func(*rule) *rule) []*rule {
	ll := proto(&rule{}).add("ip6 saddr fe80::/10 accept",
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 2},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 2, Mask: []byte{0xff, 0xc0}, Xor: []byte{0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0xfe, 0x80}},
		verdict(expr.VerdictAccept))
	dad := proto(&rule{}).add("ip6 saddr :: ip6 daddr ff02::/16 accept",
		saddrTo(true, 1), &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: make([]byte, 16)},
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0xff, 0x02}},
		verdict(expr.VerdictAccept))
	return []*rule{ll, dad}
}

// matchLoopbackDest matches IPv4 to 127.0.0.0/8 that did not come in on lo.
func matchLoopbackDest(r *rule) *rule {
	return matchNfproto(r, false).add(`iifname != "lo"`,
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ifnameKey("lo")}).add("ip daddr 127.0.0.0/8",
		// [ payload load 1b @ network header + 16 => reg 1 ] [ cmp eq reg 1 0x7f ]
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{127}})
}

// matchReversePathMissing matches a packet whose source is not routed
// back through the interface it came in on (strict reverse path).
func matchReversePathMissing(r *rule) *rule {
	return r.add("fib saddr . iif oif missing",
		// [ fib saddr . iif oif present => reg 1 ] [ cmp eq reg 1 0 ]
		&expr.Fib{Register: 1, FlagSADDR: true, FlagIIF: true, ResultOIF: true, FlagPRESENT: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: make([]byte, 4)})
}

// matchICMPv6Error matches an ICMPv6 error other than Packet Too Big.
func matchICMPv6Error(r *rule) *rule {
	return matchNfproto(r, true).add("meta l4proto ipv6-icmp",
		// [ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x3a ]
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}}).add("icmpv6 type < 128",
		// [ payload load 1b @ transport header + 0 => reg 1 ] [ cmp lt reg 1 0x80 ]
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Cmp{Op: expr.CmpOpLt, Register: 1, Data: []byte{128}}).add("icmpv6 type != packet-too-big",
		// [ payload load 1b @ transport header + 0 => reg 1 ] [ cmp neq reg 1 0x02 ]
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{2}})
}

// fragNeededAccept accepts ICMP Fragmentation Needed (path MTU
// discovery, answering a validated source).
func fragNeededAccept() *rule {
	return matchICMPv4(&rule{}, 3).add("icmp code frag-needed",
		// [ payload load 1b @ transport header + 1 => reg 1 ] [ cmp eq reg 1 0x04 ]
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 1, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{4}}).add("accept", verdict(expr.VerdictAccept))
}

// failClosedChains are the chains of ApplyFailClosed's tables, for a node
// whose config could not be applied: no sets, no registrations, so
// nothing is forwarded (forward, and the bridge table's forward, policy
// drop, no rules); what the node
// receives must pass the source checks that need no config (IPv4
// options, loopback destinations, strict reverse path), and the node's
// own ICMP errors and IPv4 packets with options do not leave at all
// (there is no allow list to tell the cluster from the outside).
func failClosedChains() []*chainSpec {
	drop := func(r *rule) *rule { return r.add("drop", verdict(expr.VerdictDrop)) }
	src := &chainSpec{family: nftables.TableFamilyINet, name: ChainSource, hook: nftables.ChainHookPrerouting, prio: prioSource, typ: nftables.ChainTypeFilter}
	src.rules = append(src.rules, drop(matchIPv4Options(&rule{})), drop(matchLoopbackDest(&rule{})))
	src.rules = append(src.rules, linkScopeAccepts(func(r *rule) *rule { return matchNfproto(r, true) })...)
	src.rules = append(src.rules, drop(matchReversePathMissing(&rule{})))
	out := &chainSpec{family: nftables.TableFamilyINet, name: ChainOutput, hook: nftables.ChainHookOutput, prio: prioSource, typ: nftables.ChainTypeFilter}
	out.rules = append(out.rules, loopbackAccept()...)
	out.rules = append(out.rules, drop(matchICMPv6Error(&rule{})), fragNeededAccept())
	for _, typ := range icmpv4Errors {
		out.rules = append(out.rules, drop(matchICMPv4(&rule{}, typ)))
	}
	out.rules = append(out.rules, drop(matchIPv4Options(&rule{})))
	fwd := &chainSpec{family: nftables.TableFamilyINet, name: ChainForward, hook: nftables.ChainHookForward, prio: prioForward, typ: nftables.ChainTypeFilter, drop: true}
	// Frames bridged between two ports (a pod and a NIC enslaved to the
	// pod bridge, say) are not forwarded either (the sixth red-team
	// pass: without a bridge table an unregistered pod got out at L2).
	bfwd := &chainSpec{family: nftables.TableFamilyBridge, name: ChainBridgeFwd, hook: nftables.ChainHookForward, prio: 0, typ: nftables.ChainTypeFilter, drop: true}
	return []*chainSpec{src, out, fwd, bfwd}
}

// loopbackAccept accepts what the node sends to its loopback addresses
// (127.0.0.0/8, ::1) out of lo. Not all of lo: an error to another of
// the node's own addresses (a forged source the kernel answered before
// prerouting) still meets the reflection rules, in case NAT in output
// sends it on (the eighth red-team pass). The kernel refuses a loopback
// source from any other interface, so nobody outside gets an answer to
// 127.0.0.0/8 or ::1.
func loopbackAccept() []*rule {
	lo := func(r *rule) *rule {
		return r.add(`oifname "lo"`,
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifnameKey("lo")})
	}
	v4 := lo(matchNfproto(&rule{}, false)).add("ip daddr 127.0.0.0/8",
		// [ payload load 1b @ network header + 16 => reg 1 ] [ cmp eq reg 1 0x7f ]
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{127}}).add("accept", verdict(expr.VerdictAccept))
	v6 := lo(matchNfproto(&rule{}, true)).add("ip6 daddr ::1",
		daddr(true), &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: net.IPv6loopback}).add("accept", verdict(expr.VerdictAccept))
	return []*rule{v4, v6}
}
