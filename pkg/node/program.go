package node

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Names of what we own in the host namespace. They are a public contract
// (runbooks read the counter by name): never rename them.
const (
	Table = "egress_cni_node"

	ChainForward     = "forward"     // inet, filter hook forward
	ChainFromPods    = "from_pods"   // inet, regular
	ChainPostrouting = "postrouting" // inet, nat hook postrouting (egress role)
	ChainBridgePre   = "prerouting"  // bridge, filter hook prerouting

	SetAllowV4    = "allow_v4"
	SetAllowV6    = "allow_v6"
	SetGatewaysV4 = "gateways_v4" // ifname . ipv4_addr, in both tables
	SetGatewaysV6 = "gateways_v6" // ifname . ipv6_addr, in both tables

	// CounterDropped counts packets from pods dropped for leaving the
	// cluster: `nft list counter inet egress_cni_node dropped`.
	CounterDropped = "dropped"

	// LogPrefix starts the optional, rate-limited drop log line; the
	// kernel's line carries SRC=, the pod's address.
	LogPrefix = "egress-cni drop: "

	ifNameSize = 16
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
	family   nftables.TableFamily
	name     string
	hook     *nftables.ChainHook
	prio     int32
	typ      nftables.ChainType
	rules    []*rule
	baseText string
}

// program is the whole desired node state, minus gateway membership,
// which is dynamic and only changed by gateway updates.
type program struct {
	cfg    *Config
	chains []*chainSpec
}

func newProgram(cfg *Config) *program {
	p := &program{cfg: cfg}
	mark := cfg.GatewayMark

	fwd := &chainSpec{family: nftables.TableFamilyINet, name: ChainForward, hook: nftables.ChainHookForward, prio: -5, typ: nftables.ChainTypeFilter,
		baseText: "type filter hook forward priority -5; policy accept;"}
	for _, pat := range cfg.PodInterfaces {
		r := &rule{}
		matchIfname(r, "iifname", pat)
		r.add("jump "+ChainFromPods, &expr.Verdict{Kind: expr.VerdictJump, Chain: ChainFromPods})
		fwd.rules = append(fwd.rules, r)
	}

	pods := &chainSpec{family: nftables.TableFamilyINet, name: ChainFromPods}
	// Replies of connections that the outside opened (ingress) and of
	// connections we accepted.
	pods.rules = append(pods.rules, (&rule{}).add("ct state established,related accept",
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
		accept()))
	// Bridged gateways were marked by the bridge table's prerouting hook,
	// where the ingress bridge port (the gateway's own veth) is known.
	pods.rules = append(pods.rules, matchMark(&rule{}, mark).add("accept", accept()))
	// Routed gateways (the veth itself faces the host): match here, and
	// mark for the NAT hook.
	for _, v6 := range []bool{false, true} {
		r := &rule{}
		matchNfproto(r, v6)
		matchGateway(r, v6)
		setMark(r, mark)
		pods.rules = append(pods.rules, r.add("accept", accept()))
	}
	for _, v6 := range []bool{false, true} {
		r := &rule{}
		matchNfproto(r, v6)
		set, fam := SetAllowV4, "ip"
		if v6 {
			set, fam = SetAllowV6, "ip6"
		}
		r.add(fam+" daddr @"+set, daddr(v6), &expr.Lookup{SourceRegister: 1, SetName: set})
		pods.rules = append(pods.rules, r.add("accept", accept()))
	}
	if cfg.LogDrops {
		pods.rules = append(pods.rules, (&rule{}).add(fmt.Sprintf("limit rate %d/second log prefix %q", cfg.LogRate, LogPrefix),
			// [ limit rate N/second burst 5 type packets ]
			&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(cfg.LogRate), Unit: expr.LimitTimeSecond, Burst: 5},
			// [ log prefix ... ]
			&expr.Log{Key: 1 << unix.NFTA_LOG_PREFIX, Data: []byte(LogPrefix)}))
	}
	pods.rules = append(pods.rules, (&rule{}).add(`counter name "`+CounterDropped+`" drop`,
		// [ objref type 1 name dropped ]
		&expr.Objref{Type: 1, Name: CounterDropped},
		&expr.Verdict{Kind: expr.VerdictDrop}))

	p.chains = append(p.chains, fwd, pods)

	if cfg.Role == RoleEgress {
		post := &chainSpec{family: nftables.TableFamilyINet, name: ChainPostrouting, hook: nftables.ChainHookPostrouting, prio: 100, typ: nftables.ChainTypeNAT,
			baseText: "type nat hook postrouting priority 100; policy accept;"}
		if cfg.EgressIP.IsValid() {
			r := &rule{}
			matchIfname(r, "oifname", cfg.Uplink)
			matchNfproto(r, cfg.EgressIP.Is6())
			matchMark(r, mark)
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
		matchMark(r, mark)
		post.rules = append(post.rules, r.add("masquerade", &expr.Masq{}))
		p.chains = append(p.chains, post)
	}

	br := &chainSpec{family: nftables.TableFamilyBridge, name: ChainBridgePre, hook: nftables.ChainHookPrerouting, prio: -200, typ: nftables.ChainTypeFilter,
		baseText: "type filter hook prerouting priority -200; policy accept;"}
	// Nobody else gets our bit: clear it first.
	br.rules = append(br.rules, (&rule{}).add(fmt.Sprintf("meta mark set meta mark & %#08x", ^mark),
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(^mark), Xor: make([]byte, 4)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1}))
	for _, v6 := range []bool{false, true} {
		r := &rule{}
		proto, name := uint16(unix.ETH_P_IP), "ip"
		if v6 {
			proto, name = unix.ETH_P_IPV6, "ip6"
		}
		r.add("meta protocol "+name,
			// [ meta load protocol => reg 1 ] [ cmp eq reg 1 0x0008 ]
			&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(proto)})
		matchGateway(r, v6)
		setMark(r, mark)
		br.rules = append(br.rules, r)
	}
	p.chains = append(p.chains, br)
	return p
}

func accept() *expr.Verdict { return &expr.Verdict{Kind: expr.VerdictAccept} }

// matchIfname matches iifname/oifname; a trailing '*' is a prefix match.
func matchIfname(r *rule, key, pattern string) {
	k := expr.MetaKeyIIFNAME
	if key == "oifname" {
		k = expr.MetaKeyOIFNAME
	}
	data := ifnameKey(pattern)
	if p, ok := strings.CutSuffix(pattern, "*"); ok {
		// A prefix match compares only the prefix's bytes.
		data = []byte(p)
	}
	// [ meta load iifname => reg 1 ] [ cmp eq reg 1 NAME ]
	r.add(fmt.Sprintf("%s %q", key, pattern),
		&expr.Meta{Key: k, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: data})
}

func matchNfproto(r *rule, v6 bool) {
	p, name := byte(unix.NFPROTO_IPV4), "ipv4"
	if v6 {
		p, name = unix.NFPROTO_IPV6, "ipv6"
	}
	// [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x02 ]
	r.add("meta nfproto "+name,
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}})
}

// matchGateway: iifname . ip saddr @gateways_v4 (or v6).
func matchGateway(r *rule, v6 bool) {
	set, fam := SetGatewaysV4, "ip"
	off, n := uint32(12), uint32(4)
	if v6 {
		set, fam, off, n = SetGatewaysV6, "ip6", 8, 16
	}
	// [ meta load iifname => reg 1 ]
	// [ payload load Nb @ network header + OFF => reg 2 ]
	// [ lookup reg 1 set gateways_vX ]
	r.add("iifname . "+fam+" saddr @"+set,
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 2, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
		&expr.Lookup{SourceRegister: 1, SetName: set})
}

func daddr(v6 bool) *expr.Payload {
	off, n := uint32(16), uint32(4)
	if v6 {
		off, n = 24, 16
	}
	// [ payload load Nb @ network header + OFF => reg 1 ]
	return &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}
}

func matchMark(r *rule, mark uint32) *rule {
	// [ meta load mark => reg 1 ] [ bitwise reg 1 = (reg 1 & MARK) ^ 0 ] [ cmp eq reg 1 MARK ]
	return r.add(fmt.Sprintf("meta mark & %#08x == %#08x", mark, mark),
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(mark), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)})
}

func setMark(r *rule, mark uint32) {
	// [ meta load mark => reg 1 ] [ bitwise reg 1 = (reg 1 & ~MARK) ^ MARK ] [ meta set mark with reg 1 ]
	r.add(fmt.Sprintf("meta mark set meta mark | %#08x", mark),
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(^mark), Xor: binaryutil.NativeEndian.PutUint32(mark)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1})
}

func ifnameKey(name string) []byte {
	b := make([]byte, ifNameSize)
	copy(b, name)
	return b
}

// gatewayKey is the concatenated set key ifname . address.
func gatewayKey(iface string, ip netip.Addr) []byte {
	return append(ifnameKey(iface), ip.AsSlice()...)
}
