// Package node enforces egress at the node: in each node's host network
// namespace, traffic forwarded from local pods may reach cluster
// destinations only, unless it comes from an egress-gateway pod, whose
// membership is bound to its own host-side interface. On egress nodes the
// gateways' traffic is masqueraded (or SNATed) out of the uplink.
//
// The rules live in tables of our own (inet and bridge egress_cni_node)
// and are programmed with google/nftables over netlink: no binary is run.
//
// Platforms: the config (Parse, Config), the identity records and the
// drop reasons build and test on any OS; the programming, the rendering
// and the tracer use google/nftables' Linux constants and are in
// _linux.go files, with no stand-ins elsewhere.
package node

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Role of a node.
type Role string

const (
	RoleApp    Role = "app"
	RoleEgress Role = "egress"
)

// DefaultConnLabel is the conntrack label bit that marks a connection
// created by a registered egress gateway. Labels (128 bits per
// connection) are written by no component we know of on a Kubernetes
// node, unlike packet marks (kube-proxy's 0x4000 and 0x8000, Calico's
// 0xffff0000, Cilium's 0x0f00 and upper half) or the conntrack mark (the
// AWS VPC CNI's 0x80). Only our rules set this bit, and only on the first
// packet of a connection that comes from a gateway's own interface with
// its own address.
const DefaultConnLabel = 127

// IngressLabel is the conntrack label bit that marks a connection whose
// first packet came in from outside and crossed our forward chain, so
// that its replies may leave (ingressReplies): the bit below ConnLabel
// (above it for ConnLabel 0). A connection conntrack made while our
// tables were missing lacks it, and its replies stay in (the seventh
// red-team pass: one forged "outside to pod" packet in that window let
// the pod send out as replies after the repair, for as long as it kept
// the entry alive).
func (cfg *Config) IngressLabel() int {
	if cfg.ConnLabel == 0 {
		return 1
	}
	return cfg.ConnLabel - 1
}

// markOwners names who sets the packet-mark bits that a v1 config might
// still hold in gatewayMark, for the error that refuses the key.
var markOwners = []struct {
	mask  uint32
	owner string
}{
	{0x00004000, "kube-proxy's KUBE-MARK-MASQ (NodePort, externalIP, LoadBalancer and masqueradeAll traffic)"},
	{0x00008000, "kube-proxy's KUBE-MARK-DROP"},
	{0xffff0000, "Calico's default iptablesMarkMask and Cilium's identity bits"},
	{0x00000f00, "Cilium's magic mark nibble"},
}

// LinkScope is always allowed: destinations that never leave the link.
// On a bridge with br_netfilter, frames between two pods of the node pass
// the IP forward hook, and IPv6 neighbour discovery (to ff02::1:ffXX:XXXX)
// would otherwise be dropped, breaking IPv6 between pods of one node.
// Link-local unicast 169.254.0.0/16 is NOT here: it holds cloud metadata
// endpoints (169.254.169.254), which must be allowed explicitly.
var LinkScope = []netip.Prefix{
	netip.MustParsePrefix("224.0.0.0/24"),       // IPv4 local network control multicast
	netip.MustParsePrefix("255.255.255.255/32"), // IPv4 limited broadcast
	netip.MustParsePrefix("fe80::/10"),          // IPv6 link-local unicast
	netip.MustParsePrefix("ff02::/16"),          // IPv6 link-local multicast (neighbour discovery)
}

// File is the node config file, JSON.
type File struct {
	Role Role `json:"role"`
	// PodInterfaces and GatewayMark are v1 keys. They are refused with
	// a message rather than as unknown keys: coverage no longer depends
	// on interface names, and no packet mark is used.
	PodInterfaces []string `json:"podInterfaces,omitempty"`
	PodCIDRs      []string `json:"podCIDRs"`
	ServiceCIDRs  []string `json:"serviceCIDRs,omitempty"`
	NodeCIDRs     []string `json:"nodeCIDRs,omitempty"`
	Allow         []string `json:"allow,omitempty"`
	Uplink        string   `json:"uplink,omitempty"`
	EgressIP      string   `json:"egressIP,omitempty"`
	LogDrops      bool     `json:"logDrops,omitempty"`
	LogRate       uint32   `json:"logRate,omitempty"`
	GatewayMark   *uint32  `json:"gatewayMark,omitempty"`
	// ConnLabel is the conntrack label bit (0-127) for gateway
	// connections; default DefaultConnLabel.
	ConnLabel *int `json:"connLabel,omitempty"`
	// IngressReplies lets replies of connections opened from outside
	// the cluster (NodePort, LoadBalancer, externalIP, hostPort ingress)
	// leave the node. Default true on app nodes, false on egress nodes:
	// an egress node's public address must not carry a NodePort a pod
	// "replies" through.
	IngressReplies *bool `json:"ingressReplies,omitempty"`
	// AuditGroup is the NFLOG group every drop is sent to (rate
	// limited), which the agent reads; default DefaultAuditGroup.
	AuditGroup *int `json:"auditGroup,omitempty"`
	// AuditRate and AuditBurst limit the packets sent to NFLOG, per
	// reason, per second; defaults DefaultAuditRate, DefaultAuditBurst.
	AuditRate  *int `json:"auditRate,omitempty"`
	AuditBurst *int `json:"auditBurst,omitempty"`
}

// Config is a validated node config.
type Config struct {
	Role Role
	// Allowed holds every destination pods may reach: pod, service and
	// node CIDRs and the explicit allow list, sorted.
	Allowed  []netip.Prefix
	Uplink   string
	EgressIP netip.Addr // invalid: masquerade
	LogDrops bool
	LogRate  uint32
	// ConnLabel is the conntrack label bit of gateway connections.
	ConnLabel int
	// IngressReplies: replies of connections the outside opened pass.
	IngressReplies bool
	// AuditGroup is the NFLOG group of the drops; AuditRate and
	// AuditBurst their kernel rate limit per reason chain.
	AuditGroup uint16
	AuditRate  uint32
	AuditBurst uint32
}

// Load reads and parses a node config file.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("could not read node config: %w", err)
	}
	cfg, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("node config %s: %w", path, err)
	}
	return cfg, nil
}

// Parse parses and validates a node config. Unknown keys are errors, so a
// typo does not silently fall back to a default.
func Parse(data []byte) (*Config, error) {
	var f File
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	return f.Config()
}

// Config validates the file and returns the Config.
func (f *File) Config() (*Config, error) {
	c := &Config{Role: f.Role, LogDrops: f.LogDrops, LogRate: f.LogRate, ConnLabel: DefaultConnLabel, IngressReplies: f.Role == RoleApp}
	if f.IngressReplies != nil {
		c.IngressReplies = *f.IngressReplies
	}
	switch f.Role {
	case RoleApp, RoleEgress:
	default:
		return nil, &rules.FieldError{Field: "role", Value: string(f.Role), Reason: `must be "app" or "egress"`}
	}
	if f.PodInterfaces != nil {
		return nil, &rules.FieldError{Field: "podInterfaces", Value: strings.Join(f.PodInterfaces, ","),
			Reason: "was removed in node format 2: every forwarded packet is judged whatever interface it came in on, and the CNI plugin registers each pod's host interface; delete the key"}
	}
	if f.GatewayMark != nil {
		why := "was removed in node format 2: gateway connections carry a conntrack label (connLabel), no packet mark; delete the key"
		for _, o := range markOwners {
			if *f.GatewayMark&o.mask != 0 {
				why += fmt.Sprintf(" (and %#x is %s)", *f.GatewayMark&o.mask, o.owner)
				break
			}
		}
		return nil, &rules.FieldError{Field: "gatewayMark", Value: fmt.Sprintf("%#x", *f.GatewayMark), Reason: why}
	}
	if f.ConnLabel != nil {
		if *f.ConnLabel < 0 || *f.ConnLabel > 127 {
			return nil, &rules.FieldError{Field: "connLabel", Value: fmt.Sprint(*f.ConnLabel), Reason: "must be a conntrack label bit, 0-127"}
		}
		c.ConnLabel = *f.ConnLabel
	}
	if len(f.PodCIDRs) == 0 {
		return nil, &rules.FieldError{Field: "podCIDRs", Value: "", Reason: "at least one pod CIDR is required"}
	}
	for _, l := range []struct {
		field string
		v     []string
	}{{"podCIDRs", f.PodCIDRs}, {"serviceCIDRs", f.ServiceCIDRs}, {"nodeCIDRs", f.NodeCIDRs}, {"allow", f.Allow}} {
		for _, s := range l.v {
			all, ps, err := rules.ParseCIDRList(l.field, s)
			if err != nil {
				return nil, err
			}
			if all || len(ps) != 1 {
				return nil, &rules.FieldError{Field: l.field, Value: s, Reason: "each list item must be exactly one CIDR ('*' would allow everything)"}
			}
			for _, p := range ps {
				if p.Bits() == 0 {
					return nil, &rules.FieldError{Field: l.field, Value: s, Reason: "a default route would allow the whole internet"}
				}
			}
			c.Allowed = append(c.Allowed, ps...)
		}
	}
	c.Allowed = append(c.Allowed, LinkScope...)
	slices.SortFunc(c.Allowed, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	c.Allowed = slices.Compact(c.Allowed)
	if f.Role == RoleEgress {
		if f.Uplink == "" {
			return nil, &rules.FieldError{Field: "uplink", Value: "", Reason: "an egress node needs the uplink interface its gateways' traffic leaves through"}
		}
	}
	if f.Uplink != "" {
		if _, err := rules.ParseInterfaceList("uplink", f.Uplink); err != nil || strings.Contains(f.Uplink, ",") {
			return nil, &rules.FieldError{Field: "uplink", Value: f.Uplink, Reason: "not an interface name"}
		}
		c.Uplink = f.Uplink
	}
	if f.EgressIP != "" {
		a, err := netip.ParseAddr(f.EgressIP)
		if err != nil || a.Zone() != "" {
			return nil, &rules.FieldError{Field: "egressIP", Value: f.EgressIP, Reason: "not an IP address"}
		}
		if f.Role != RoleEgress {
			return nil, &rules.FieldError{Field: "egressIP", Value: f.EgressIP, Reason: "only an egress node SNATs"}
		}
		c.EgressIP = a
	}
	if c.LogRate == 0 {
		c.LogRate = 10
	}
	c.AuditGroup, c.AuditRate, c.AuditBurst = DefaultAuditGroup, DefaultAuditRate, DefaultAuditBurst
	for _, l := range []struct {
		field    string
		v        *int
		min, max int
		to       func(int)
	}{
		{"auditGroup", f.AuditGroup, 0, 65535, func(n int) { c.AuditGroup = uint16(n) }},
		{"auditRate", f.AuditRate, 1, 1 << 20, func(n int) { c.AuditRate = uint32(n) }},
		{"auditBurst", f.AuditBurst, 1, 1 << 20, func(n int) { c.AuditBurst = uint32(n) }},
	} {
		if l.v == nil {
			continue
		}
		if *l.v < l.min || *l.v > l.max {
			return nil, &rules.FieldError{Field: l.field, Value: fmt.Sprint(*l.v), Reason: fmt.Sprintf("must be %d-%d", l.min, l.max)}
		}
		l.to(*l.v)
	}
	return c, nil
}

// splitFamilies splits prefixes into IPv4 and IPv6, keeping their order.
func splitFamilies(ps []netip.Prefix) (v4, v6 []netip.Prefix) {
	for _, p := range ps {
		if p.Addr().Is4() {
			v4 = append(v4, p)
		} else {
			v6 = append(v6, p)
		}
	}
	return v4, v6
}
