package node

import "strings"

// Reason says which rule of the node layer dropped a packet. The words
// are a public contract: they are the "reason" of the agent's audit log
// and of egress_cni_node_dropped_packets_total, and each names a chain
// (drop_<reason with underscores>) and its counters. Never rename them.
type Reason string

const (
	// ReasonNotAGateway: a registered pod's own packet toward the
	// outside of the cluster, and the pod is not a registered egress
	// gateway on this egress node.
	ReasonNotAGateway Reason = "not-a-gateway"
	// ReasonNoIdentity: a forwarded packet toward the outside whose
	// interface and source are no registered pod's (an unregistered
	// pod, a host-bypassing attachment, another node's traffic).
	ReasonNoIdentity Reason = "no-identity"
	// ReasonForgedSource: a registered pod interface sent a source
	// address that is not its pod's.
	ReasonForgedSource Reason = "forged-source"
	// ReasonStolenAddress: a registered pod's address arrived on an
	// interface that is not that pod's.
	ReasonStolenAddress Reason = "stolen-address"
	// ReasonReversePath: the source is not routed back through the
	// interface the packet came in on (strict reverse path).
	ReasonReversePath Reason = "reverse-path"
	// ReasonSourceRoute: an IPv4 packet with a source-route option.
	ReasonSourceRoute Reason = "source-route"
	// ReasonIPOptions: an IPv4 packet with any other options (or a
	// source route the kernel's option parser does not recognise as
	// one) to a unicast address.
	ReasonIPOptions Reason = "ip-options"
	// ReasonLoopback: a packet to 127.0.0.0/8 that did not arrive on lo
	// (with route_localnet on, the node would deliver it to its
	// localhost-only services).
	ReasonLoopback Reason = "loopback"
	// ReasonBadEtherType: a frame from a veth bridge port that is not
	// untagged IPv4, IPv6 or ARP.
	ReasonBadEtherType Reason = "bad-ethertype"
	// ReasonVLANWrapped: an IP packet in a VLAN tag on a bridge port.
	ReasonVLANWrapped Reason = "vlan-wrapped"
	// ReasonBridgeBypass: a frame from a pod's bridge port bridged to a
	// port that is no pod's (a NIC or tunnel enslaved to the bridge).
	ReasonBridgeBypass Reason = "bridge-bypass"
	// ReasonReflection: an ICMP or ICMPv6 error the node itself would
	// send to a destination outside the cluster (it answers a packet the
	// kernel handled before our source checks: an IPv6 Hop-by-Hop
	// option, an IPv4 fragment queue that expired).
	ReasonReflection Reason = "reflection"
)

// Families of the per-reason drop counters.
const (
	FamilyIPv4  = "ipv4"
	FamilyIPv6  = "ipv6"
	FamilyOther = "other" // a frame that is neither (bridge table)
)

// AuditPrefix starts the NFLOG prefix of every drop; the reason follows.
const AuditPrefix = "egress-cni:"

// DefaultAuditGroup is the NFLOG group the drops are sent to;
// DefaultAuditRate and DefaultAuditBurst its kernel rate limit, per
// reason chain (packets per second).
const (
	DefaultAuditGroup = 9964
	DefaultAuditRate  = 100
	DefaultAuditBurst = 20
	// AuditSnaplen is how much of each packet NFLOG copies: the network
	// and transport headers, with up to 212 bytes of IPv6 extension
	// headers before the port (a longer chain is reported as truncated
	// by the audit).
	AuditSnaplen = 256
)

// ReasonOfPrefix returns the reason an NFLOG prefix carries, or "".
func ReasonOfPrefix(prefix string) Reason {
	r, ok := strings.CutPrefix(strings.TrimRight(prefix, "\x00"), AuditPrefix)
	if !ok {
		return ""
	}
	return Reason(r)
}
