package node

import (
	"fmt"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// auditSpec is a drop chain: every drop of the node layer is a goto to
// one, which sends the packet to NFLOG (rate limited), counts it per
// reason and family, and drops it, counting it in the table's dropped
// or forged counter as well. A goto, not a jump: a flushed drop chain
// ends in the calling base chain's policy, which is drop.
type auditSpec struct {
	family   nftables.TableFamily
	reason   Reason
	kind     string   // CounterDropped or CounterForged
	families []string // families counted
}

var auditSpecs = []auditSpec{
	{nftables.TableFamilyINet, ReasonSourceRoute, CounterForged, []string{FamilyIPv4}},
	{nftables.TableFamilyINet, ReasonIPOptions, CounterForged, []string{FamilyIPv4}},
	{nftables.TableFamilyINet, ReasonLoopback, CounterForged, []string{FamilyIPv4}},
	{nftables.TableFamilyINet, ReasonForgedSource, CounterForged, []string{FamilyIPv4, FamilyIPv6}},
	{nftables.TableFamilyINet, ReasonStolenAddress, CounterForged, []string{FamilyIPv4, FamilyIPv6}},
	{nftables.TableFamilyINet, ReasonReversePath, CounterForged, []string{FamilyIPv4, FamilyIPv6}},
	{nftables.TableFamilyINet, ReasonNotAGateway, CounterDropped, []string{FamilyIPv4, FamilyIPv6}},
	{nftables.TableFamilyINet, ReasonNoIdentity, CounterDropped, []string{FamilyIPv4, FamilyIPv6}},
	{nftables.TableFamilyINet, ReasonReflection, CounterForged, []string{FamilyIPv4, FamilyIPv6}},
	// A frame with one VLAN tag reads as plain IP in meta protocol (the
	// tag is taken off into the skb), so this reason has all three.
	{nftables.TableFamilyBridge, ReasonBadEtherType, CounterForged, []string{FamilyIPv4, FamilyIPv6, FamilyOther}},
	{nftables.TableFamilyBridge, ReasonVLANWrapped, CounterForged, []string{FamilyIPv4, FamilyIPv6}},
	{nftables.TableFamilyBridge, ReasonForgedSource, CounterForged, []string{FamilyIPv4, FamilyIPv6}},
	{nftables.TableFamilyBridge, ReasonStolenAddress, CounterForged, []string{FamilyIPv4, FamilyIPv6}},
	{nftables.TableFamilyBridge, ReasonBridgeBypass, CounterDropped, []string{FamilyIPv4, FamilyIPv6, FamilyOther}},
}

// Reasons lists every reason, in rule order.
func Reasons() []Reason {
	var out []Reason
	seen := map[Reason]bool{}
	for _, a := range auditSpecs {
		if !seen[a.reason] {
			seen[a.reason] = true
			out = append(out, a.reason)
		}
	}
	return out
}

// AuditChain is the name of a reason's drop chain.
func AuditChain(r Reason) string { return "drop_" + strings.ReplaceAll(string(r), "-", "_") }

// ReasonCounter is the name of a reason's counter for a family.
func ReasonCounter(r Reason, family string) string { return AuditChain(r) + "_" + family }

// gotoAudit ends a rule with the goto to a reason's drop chain.
func gotoAudit(r Reason) (string, expr.Any) {
	// [ immediate reg 0 goto drop_... ]
	return "goto " + AuditChain(r), &expr.Verdict{Kind: expr.VerdictGoto, Chain: AuditChain(r)}
}

// auditChain builds a reason's drop chain.
func (p *program) auditChain(a auditSpec) *chainSpec {
	cfg := p.cfg
	ch := &chainSpec{family: a.family, name: AuditChain(a.reason)}
	prefix := AuditPrefix + string(a.reason)
	ch.rules = append(ch.rules, (&rule{}).add(fmt.Sprintf("limit rate %d/second burst %d packets log prefix %q group %d snaplen %d",
		cfg.AuditRate, cfg.AuditBurst, prefix, cfg.AuditGroup, AuditSnaplen),
		// [ limit rate N/second burst B type packets flags 0x0 ]
		&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(cfg.AuditRate), Unit: expr.LimitTimeSecond, Burst: cfg.AuditBurst},
		// [ log prefix P group G snaplen 256 ]
		&expr.Log{Key: 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_SNAPLEN,
			Group: cfg.AuditGroup, Snaplen: AuditSnaplen, Data: []byte(prefix)}))
	for _, fam := range a.families {
		r := &rule{}
		switch {
		case fam == FamilyOther && a.family == nftables.TableFamilyBridge:
			matchProtoNot(r)
		case fam == FamilyOther:
			matchNfprotoNot(r)
		case a.family == nftables.TableFamilyBridge:
			matchProto(r, fam == FamilyIPv6)
		default:
			matchNfproto(r, fam == FamilyIPv6)
		}
		// [ objref type 1 name NAME ]
		ch.rules = append(ch.rules, r.add("counter name "+ReasonCounter(a.reason, fam), &expr.Objref{Type: 1, Name: ReasonCounter(a.reason, fam)}))
	}
	ch.rules = append(ch.rules, (&rule{}).add(counterDrop(a.kind)))
	return ch
}

// matchProtoNot matches a frame that is neither IPv4 nor IPv6.
func matchProtoNot(r *rule) *rule {
	for _, v6 := range []bool{false, true} {
		proto, name := uint16(unix.ETH_P_IP), "ip"
		if v6 {
			proto, name = unix.ETH_P_IPV6, "ip6"
		}
		// [ meta load protocol => reg 1 ] [ cmp neq reg 1 0x0008 ]
		r.add("meta protocol != "+name,
			&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.BigEndian.PutUint16(proto)})
	}
	return r
}

// matchNfprotoNot matches a packet that is neither IPv4 nor IPv6.
func matchNfprotoNot(r *rule) *rule {
	for _, p := range []struct {
		v    byte
		name string
	}{{unix.NFPROTO_IPV4, "ipv4"}, {unix.NFPROTO_IPV6, "ipv6"}} {
		// [ meta load nfproto => reg 1 ] [ cmp neq reg 1 0x02 ]
		r.add("meta nfproto != "+p.name,
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{p.v}})
	}
	return r
}
