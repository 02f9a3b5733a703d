package rules

import "net/netip"

// The ruleset model: plain data, no I/O. Build fills it from a Config;
// each backend renders it. Chain, set and table names are a public
// contract (runbooks, dashboards and our own upgrade code look them up):
// never rename them.
const (
	// NFTTable is the nftables table we own, in the inet family.
	NFTTable = "egress_cni"

	ChainInbound    = "ISTIO_INBOUND"
	ChainInRedirect = "ISTIO_IN_REDIRECT"
	ChainRedirect   = "ISTIO_REDIRECT"
	ChainOutput     = "ISTIO_OUTPUT"
	// ChainOutputDNS holds the DNS redirects (with --redirect-dns).
	ChainOutputDNS = "ISTIO_OUTPUT_DNS"

	// Base chains. In nftables they are ours (in NFTTable); in iptables
	// they are the built-in nat chains of the same hook.
	BasePrerouting = "prerouting"
	BaseOutput     = "output"

	SetOutExcludeV4   = "out_exclude_v4"
	SetOutExcludeV6   = "out_exclude_v6"
	SetOutIncludeV4   = "out_include_v4"
	SetOutIncludeV6   = "out_include_v6"
	SetOutExcludePort = "out_exclude_ports"
	SetOutIncludePort = "out_include_ports"
	SetInExcludePort  = "in_exclude_ports"
	SetInIncludePort  = "in_include_ports"

	// Comment marks the rules we add to built-in iptables chains, so
	// that Apply and Remove find them without touching anyone else's.
	Comment = "egress-cni"

	// FormatVersion is the layout version of the rules we write.
	FormatVersion = 1
)

// Family of a rule. FamilyAny rules apply to IPv4 and IPv6.
type Family uint8

const (
	FamilyAny Family = iota
	FamilyIPv4
	FamilyIPv6
)

// Proto is the layer-4 protocol a rule matches.
type Proto uint8

const (
	ProtoAny Proto = iota
	ProtoTCP
	ProtoUDP
)

func (p Proto) String() string {
	switch p {
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	}
	return ""
}

// SetType is the element type of a set.
type SetType uint8

const (
	SetIPv4 SetType = iota + 1
	SetIPv6
	SetPorts
)

// Ruleset is the whole desired state of one pod's capture.
type Ruleset struct {
	Families Families
	// TProxyRoute, in TPROXY mode, is the policy route that delivers
	// marked packets locally: "ip rule fwmark Mark lookup Table" and
	// "ip route add local default dev lo table Table", per family. The
	// firewall backends do not write it; egress-init does (ApplyTProxyRoute).
	TProxyRoute *TProxyRoute
	// Chains in dependency order: base chains first, then regular chains.
	Chains []*Chain
	Sets   []*Set
}

// TProxyRoute is TPROXY mode's mark and route table.
type TProxyRoute struct {
	Mark, Table uint32
}

// Chain returns the chain with the given name, or nil.
func (rs *Ruleset) Chain(name string) *Chain {
	for _, c := range rs.Chains {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// Set returns the set with the given name, or nil.
func (rs *Ruleset) Set(name string) *Set {
	for _, s := range rs.Sets {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// Chain is a list of rules. Base chains have a Hook.
type Chain struct {
	// Name is unique in the ruleset (and is the nftables chain's name).
	Name string
	// Table is the iptables table: TableNAT (""), TableRaw or
	// TableMangle. In nftables every chain is in our one table; the
	// table decides a base chain's type and priority.
	Table string
	// IPTName is the chain's iptables name when it differs from Name
	// (raw's ISTIO_INBOUND, a namesake of nat's).
	IPTName string
	Hook    *Hook
	Rules   []Rule
}

// iptables tables we write.
const (
	TableNAT    = ""
	TableRaw    = "raw"
	TableMangle = "mangle"
)

// tableName is the table's iptables name.
func tableName(t string) string {
	if t == TableNAT {
		return "nat"
	}
	return t
}

// iptName is the chain's iptables name.
func (c *Chain) iptName() string {
	switch {
	case c.Hook != nil:
		return c.Hook.IPTChain
	case c.IPTName != "":
		return c.IPTName
	}
	return c.Name
}

// Hook attaches a base chain to the kernel.
type Hook struct {
	// Name is "prerouting" or "output".
	Name string
	// Priority is nftables' numeric priority (dstnat and srcnat are -100
	// and 100). iptables ignores it.
	Priority int32
	// IPTChain is the built-in iptables chain of the same hook.
	IPTChain string
}

// Set is a named set of addresses or ports. Prefixes are sorted and free
// of duplicates but may overlap; renderers that need disjoint intervals
// merge them.
type Set struct {
	Name     string
	Type     SetType
	Prefixes []netip.Prefix
	Ports    []PortRange
}

// Empty reports whether the set has no element.
func (s *Set) Empty() bool { return len(s.Prefixes) == 0 && len(s.Ports) == 0 }

// VerdictKind is what a matching rule does.
type VerdictKind uint8

const (
	VerdictReturn VerdictKind = iota + 1
	VerdictJump
	VerdictRedirect
	// VerdictDrop drops the packet (mangle: --drop-invalid).
	VerdictDrop
	// VerdictCTZone puts the connection in a conntrack zone and goes on
	// (raw: the DNS zones).
	VerdictCTZone
	// The TPROXY mode's mangle verdicts: accept; set the packet mark
	// (and go on); save the packet mark to the connection mark, or
	// restore it (and go on); hand the packet to the socket on Port of
	// this host, marking it with Mark (and accept).
	VerdictAccept
	VerdictSetMark
	VerdictConnmarkSave
	VerdictConnmarkRestore
	VerdictTProxy
)

// Verdict of a rule.
type Verdict struct {
	Kind  VerdictKind
	Chain string // VerdictJump
	Port  uint16 // VerdictRedirect
	Zone  uint16 // VerdictCTZone
	Mark  uint32 // VerdictSetMark, VerdictTProxy
}

// Rule is one match-and-verdict. Every nil or zero field matches
// anything. Fields are listed in the order renderers emit them.
type Rule struct {
	// Family restricts the rule to IPv4 or IPv6. A rule with an address
	// or an address set always has a family.
	Family Family
	IIF    string
	OIF    string
	Src    *netip.Prefix
	Dst    *netip.Prefix
	DstNot bool
	// CTInvalid matches packets conntrack deems INVALID; CTEstablished
	// those of a RELATED or ESTABLISHED connection.
	CTInvalid     bool
	CTEstablished bool
	// Mark matches the packet mark (MarkNot negates it), ConnMark the
	// connection mark.
	Mark     *uint32
	MarkNot  bool
	ConnMark *uint32
	// DstSet names an address set of the rule's family.
	DstSet string
	Proto  Proto
	DPort  *PortRange
	// DPortNot negates DPort.
	DPortNot bool
	// DPortSet names a port set. Proto must be set.
	DPortSet string
	// DPortsNot matches a destination port that is none of these (Istio's
	// "-m multiport ! --dports 53,15008"). Proto must be set; it cannot
	// be combined with DPort or DPortSet.
	DPortsNot []uint16
	// SPort matches the source port. Proto must be set.
	SPort  *PortRange
	UID    *uint32
	UIDNot bool
	GID    *uint32
	GIDNot bool
	// GIDsNot matches a socket whose GID is none of these (Istio's
	// owner-group include list: the traffic of every other group
	// RETURNs). It cannot be combined with GID.
	GIDsNot []uint32
	Verdict Verdict
}

// PtrTo returns a pointer to v, for the optional fields of Rule.
func PtrTo[T any](v T) *T { return &v }
