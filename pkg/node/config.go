// Package node enforces egress at the node: in each node's host network
// namespace, traffic forwarded from local pods may reach cluster
// destinations only, unless it comes from an egress-gateway pod, whose
// membership is bound to its own host-side interface. On egress nodes the
// gateways' traffic is masqueraded (or SNATed) out of the uplink.
//
// The rules live in tables of our own (inet and bridge egress_cni_node)
// and are programmed with google/nftables over netlink: no binary is run.
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

// DefaultPodInterfaces are the host-side interface patterns of common
// primary CNIs: the bridge of bridge/flannel, the per-pod veths of
// ptp/kindnet, Calico's cali* and the AWS VPC CNI's eni*. A trailing '*'
// is a prefix match.
var DefaultPodInterfaces = []string{"cni0", "veth*", "cali*", "eni*"}

// DefaultGatewayMark is the packet-mark bit that flags gateway traffic
// between our bridge hook, forward hook and NAT. Pick another bit with
// gatewayMark if a CNI on the node (Calico uses 0xffff0000 by default)
// uses this one.
const DefaultGatewayMark = 0x00004000

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
	Role          Role     `json:"role"`
	PodInterfaces []string `json:"podInterfaces,omitempty"`
	PodCIDRs      []string `json:"podCIDRs"`
	ServiceCIDRs  []string `json:"serviceCIDRs,omitempty"`
	NodeCIDRs     []string `json:"nodeCIDRs,omitempty"`
	Allow         []string `json:"allow,omitempty"`
	Uplink        string   `json:"uplink,omitempty"`
	EgressIP      string   `json:"egressIP,omitempty"`
	LogDrops      bool     `json:"logDrops,omitempty"`
	LogRate       uint32   `json:"logRate,omitempty"`
	GatewayMark   uint32   `json:"gatewayMark,omitempty"`
}

// Config is a validated node config.
type Config struct {
	Role          Role
	PodInterfaces []string
	// Allowed holds every destination pods may reach: pod, service and
	// node CIDRs and the explicit allow list, sorted.
	Allowed     []netip.Prefix
	Uplink      string
	EgressIP    netip.Addr // invalid: masquerade
	LogDrops    bool
	LogRate     uint32
	GatewayMark uint32
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
	c := &Config{Role: f.Role, LogDrops: f.LogDrops, LogRate: f.LogRate, GatewayMark: f.GatewayMark}
	switch f.Role {
	case RoleApp, RoleEgress:
	default:
		return nil, &rules.FieldError{Field: "role", Value: string(f.Role), Reason: `must be "app" or "egress"`}
	}
	c.PodInterfaces = f.PodInterfaces
	if len(c.PodInterfaces) == 0 {
		c.PodInterfaces = slices.Clone(DefaultPodInterfaces)
	}
	for _, p := range c.PodInterfaces {
		name := strings.TrimSuffix(p, "*")
		if name == "" || len(name) > 15 || strings.ContainsAny(name, "/: \t*") {
			return nil, &rules.FieldError{Field: "podInterfaces", Value: p, Reason: "not an interface name or name* prefix"}
		}
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
		for _, p := range c.PodInterfaces {
			if matchIf(p, f.Uplink) {
				return nil, &rules.FieldError{Field: "uplink", Value: f.Uplink, Reason: fmt.Sprintf("matches pod interface pattern %q; the uplink must not be treated as a pod", p)}
			}
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
	if c.GatewayMark == 0 {
		c.GatewayMark = DefaultGatewayMark
	}
	if c.GatewayMark&(c.GatewayMark-1) != 0 {
		return nil, &rules.FieldError{Field: "gatewayMark", Value: fmt.Sprintf("%#x", c.GatewayMark), Reason: "must be a single bit"}
	}
	return c, nil
}

func matchIf(pattern, name string) bool {
	if p, ok := strings.CutSuffix(pattern, "*"); ok {
		return strings.HasPrefix(name, p)
	}
	return pattern == name
}
