package rules

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Mode is the inbound interception mode, as Istio's -m flag and the
// sidecar.istio.io/interceptionMode annotation spell it.
type Mode string

const (
	// ModeRedirect captures with nat REDIRECT.
	ModeRedirect Mode = "REDIRECT"
	// ModeTPROXY captures inbound TCP with mangle TPROXY (the original
	// destination and source kept) and a fwmark route table.
	ModeTPROXY Mode = "TPROXY"
	// ModeNone means "do not capture". Build refuses it: entry points
	// decide to skip the pod before building a ruleset.
	ModeNone Mode = "NONE"
)

// Families selects which IP families get rules.
type Families uint8

const (
	// DualStack programs IPv4 and IPv6. It is the default: a pod that
	// is only captured for IPv4 has an open IPv6 bypass.
	DualStack Families = iota
	IPv4Only
	IPv6Only
)

func (f Families) String() string {
	switch f {
	case IPv4Only:
		return "ipv4"
	case IPv6Only:
		return "ipv6"
	default:
		return "dual"
	}
}

// HasV4 reports whether IPv4 rules are programmed.
func (f Families) HasV4() bool { return f != IPv6Only }

// HasV6 reports whether IPv6 rules are programmed.
func (f Families) HasV6() bool { return f != IPv4Only }

// PortRange is an inclusive range of TCP/UDP ports. A single port has
// From == To.
type PortRange struct {
	From, To uint16
}

func (p PortRange) String() string {
	if p.From == p.To {
		return fmt.Sprint(p.From)
	}
	return fmt.Sprintf("%d-%d", p.From, p.To)
}

func (p PortRange) overlaps(o PortRange) bool { return p.From <= o.To && o.From <= p.To }

// Config is the typed, validated description of one pod's capture. Build
// turns it into a Ruleset. The zero value is not useful: start from
// DefaultConfig.
type Config struct {
	// ProxyPort receives captured outbound TCP (Istio -p, 15001).
	ProxyPort uint16
	// InboundPort receives captured inbound TCP (Istio -z, 15006).
	InboundPort uint16
	// InboundTunnelPort is never captured inbound (HBONE, 15008).
	InboundTunnelPort uint16
	// ProxyUIDs and ProxyGIDs identify the proxy's own traffic, which
	// bypasses capture (Istio -u and -g, 1337).
	ProxyUIDs []uint32
	ProxyGIDs []uint32
	// Mode is the inbound interception mode (REDIRECT or TPROXY).
	Mode Mode

	// OutboundIncludeAll is Istio's -i '*': capture every destination
	// not excluded. When false, only OutboundIncludeCIDRs are captured.
	OutboundIncludeAll   bool
	OutboundIncludeCIDRs []netip.Prefix
	// OutboundExcludeCIDRs are never captured (-x). They win over the
	// include list, so a smaller range carved out of an included one is
	// the normal way to exempt a destination.
	OutboundExcludeCIDRs []netip.Prefix
	// OutboundIncludePorts are always captured (-q), whatever the
	// destination; OutboundExcludePorts never are (-o).
	OutboundIncludePorts []PortRange
	OutboundExcludePorts []PortRange

	// InboundIncludeAll is Istio's -b '*'. Otherwise only
	// InboundIncludePorts are captured inbound; an empty list disables
	// inbound capture.
	InboundIncludeAll   bool
	InboundIncludePorts []PortRange
	// InboundExcludePorts are not captured when InboundIncludeAll is set
	// (-d). Istio ignores them otherwise, and so do we.
	InboundExcludePorts []PortRange

	// ExcludeInterfaces: traffic in or out of these is never captured (-c).
	ExcludeInterfaces []string

	// RedirectDNS captures DNS (udp and tcp 53) to DNSPort (15053).
	RedirectDNS bool
	DNSPort     uint16

	Families Families

	// The options below complete istio-iptables' set (see the registry,
	// options.go).

	// TProxyMark and TProxyRouteTable are TPROXY mode's mark and route
	// table (-t 1337, -r 133).
	TProxyMark       uint32
	TProxyRouteTable uint32
	// RerouteVirtualInterfaces (-k): inbound traffic from these
	// interfaces is treated as outbound.
	RerouteVirtualInterfaces []string
	// CaptureAllDNS: with RedirectDNS, capture DNS to every address
	// rather than to the nameservers in DNSServers.
	CaptureAllDNS bool
	// DNSServers are the pod's nameservers (from /etc/resolv.conf).
	DNSServers []netip.Addr
	// DropInvalid drops packets conntrack deems INVALID.
	DropInvalid bool
	// OwnerGroupsInclude: only traffic of these groups is captured; nil
	// means every group ('*'). OwnerGroupsExclude: traffic of these
	// groups is not captured.
	OwnerGroupsInclude []uint32
	OwnerGroupsExclude []uint32
	// IPv4LoopbackCIDR is the loopback range the app's loopback traffic
	// goes to (ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR); nil is the default,
	// 127.0.0.1/32.
	IPv4LoopbackCIDR *netip.Prefix
}

// Istio's defaults, as its sidecar injector passes them.
const (
	DefaultProxyPort         = 15001
	DefaultInboundPort       = 15006
	DefaultInboundTunnelPort = 15008
	DefaultProxyUID          = 1337
	DefaultDNSPort           = 15053
)

// DefaultInboundExcludePorts is the injector's -d 15090,15021,15020.
var DefaultInboundExcludePorts = []PortRange{{15090, 15090}, {15021, 15021}, {15020, 15020}}

// DefaultConfig returns the configuration that Istio's injector asks for:
// -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020.
// It is the PodDefault column of the option registry (options.go).
func DefaultConfig() Config {
	return podDefaults.clone()
}

// Validate checks the cross-field rules that single-field parsing cannot:
// ports not zero, families of CIDRs, include/exclude conflicts. Field names
// in errors are the Istio flag long names; entry points that take the
// value from elsewhere (a CNI config key, an annotation) re-label them with
// FieldError.Relabel.
func (c *Config) Validate() error {
	for _, p := range []struct {
		field string
		v     uint16
	}{
		{FieldProxyPort, c.ProxyPort},
		{FieldInboundPort, c.InboundPort},
		{FieldInboundTunnelPort, c.InboundTunnelPort},
	} {
		if p.v == 0 {
			return fieldErr(p.field, "0", "port must be between 1 and 65535")
		}
	}
	if c.RedirectDNS && c.DNSPort == 0 {
		return fieldErr(FieldDNSPort, "0", "port must be between 1 and 65535")
	}
	switch c.Mode {
	case ModeRedirect:
	case ModeTPROXY:
		if c.TProxyMark == 0 || c.TProxyMark == outboundMark {
			return fieldErr(FieldTProxyMark, strconv.FormatUint(uint64(c.TProxyMark), 10), "must be a mark other than 0 and 1338 (the proxy's own)")
		}
		if c.TProxyRouteTable == 0 || c.TProxyRouteTable >= 252 && c.TProxyRouteTable <= 255 {
			return fieldErr(FieldTProxyRouteTable, strconv.FormatUint(uint64(c.TProxyRouteTable), 10), "must be a route table other than 0 and the kernel's 252-255")
		}
	case ModeNone:
		return fieldErr(FieldMode, string(c.Mode), "NONE means no capture; the caller must skip the pod instead of building rules")
	default:
		return fieldErr(FieldMode, string(c.Mode), "must be REDIRECT or TPROXY")
	}
	if err := c.validateIstioLimits(); err != nil {
		return err
	}
	if len(c.ProxyUIDs) == 0 && len(c.ProxyGIDs) == 0 {
		return fieldErr(FieldProxyUID, "", "at least one proxy UID or GID is required, or the proxy's own traffic loops back into itself")
	}
	for _, l := range []struct {
		field string
		v     []netip.Prefix
	}{
		{FieldOutboundIncludeCIDRs, c.OutboundIncludeCIDRs},
		{FieldOutboundExcludeCIDRs, c.OutboundExcludeCIDRs},
	} {
		for _, p := range l.v {
			if p.Addr().Is4() && !c.Families.HasV4() {
				return fieldErr(l.field, p.String(), "is an IPv4 CIDR but IPv4 is disabled (families=ipv6)")
			}
			if p.Addr().Is6() && !c.Families.HasV6() {
				return fieldErr(l.field, p.String(), "is an IPv6 CIDR but IPv6 is disabled (families=ipv4)")
			}
		}
	}
	// An include that is wholly inside an exclude can never match: the
	// exclude RETURNs first. That is a misconfiguration, not a carve-out.
	for _, in := range c.OutboundIncludeCIDRs {
		for _, ex := range c.OutboundExcludeCIDRs {
			if ex.Bits() <= in.Bits() && ex.Contains(in.Addr()) {
				return fieldErr(FieldOutboundIncludeCIDRs, in.String(),
					fmt.Sprintf("is entirely covered by excluded CIDR %s (--%s), so it would never be captured", ex, FieldOutboundExcludeCIDRs))
			}
		}
	}
	if err := portConflict(FieldOutboundIncludePorts, c.OutboundIncludePorts, FieldOutboundExcludePorts, c.OutboundExcludePorts); err != nil {
		return err
	}
	if c.InboundIncludeAll && len(c.InboundIncludePorts) > 0 {
		return fieldErr(FieldInboundIncludePorts, "*", "'*' cannot be combined with explicit ports")
	}
	if err := portConflict(FieldInboundIncludePorts, c.InboundIncludePorts, FieldInboundExcludePorts, c.InboundExcludePorts); err != nil {
		return err
	}
	for _, i := range c.ExcludeInterfaces {
		if err := validIfName(FieldExcludeInterfaces, i); err != nil {
			return err
		}
	}
	return nil
}

func portConflict(inField string, in []PortRange, exField string, ex []PortRange) error {
	for _, a := range in {
		for _, b := range ex {
			if a.overlaps(b) {
				return fieldErr(inField, a.String(), fmt.Sprintf("overlaps port %s of --%s; a port cannot be both included and excluded", b, exField))
			}
		}
	}
	return nil
}

const maxOwnerGroupsInclude = 64

var defaultIPv4Loopback = netip.MustParsePrefix("127.0.0.1/32")

// validateIstioLimits applies istio-iptables' own checks of the owner
// groups and the loopback range.
func (c *Config) validateIstioLimits() error {
	// As istio-iptables: the exclude list only applies with '*' (Build
	// ignores it otherwise), and at most 64 groups may be included.
	if len(c.OwnerGroupsInclude) > maxOwnerGroupsInclude {
		return fieldErr(EnvOwnerGroups, idList(c.OwnerGroupsInclude), fmt.Sprintf("at most %d groups may be listed", maxOwnerGroupsInclude))
	}
	if p := c.IPv4LoopbackCIDR; p != nil && (!p.Addr().Is4() || !netip.MustParsePrefix("127.0.0.0/8").Contains(p.Addr()) || p.Bits() < 8) {
		return fieldErr(EnvIPv4LoopbackCIDR, p.String(), "must be an IPv4 range within 127.0.0.0/8")
	}
	return nil
}

func idList(ids []uint32) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = strconv.FormatUint(uint64(id), 10)
	}
	return strings.Join(s, ",")
}
