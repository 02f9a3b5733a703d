package rules

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// The registry of capture options. Every option that shapes a pod's
// capture is one row here: its istio-iptables flag names, its environment
// variable, the pod annotations that override it, its key in our CNI
// config, its default and its parser. egress-init's flag set, the CNI
// plugin's config reader and its annotation reader are all built from
// this table, so an option is added, renamed or re-defaulted in one place.
//
// The names and defaults are istio-iptables' (Istio master,
// tools/istio-iptables/pkg/cmd/root.go and tools/common/config): Name is
// the long flag and the field name in errors, Env is the flag name
// upper-cased with '-' as '_' for the flags Istio reads from the
// environment, and EnvAliases are the other variables Istio reads for the
// same option; they are read after Env, so they win over it.
//
// There are two defaults. Default is what istio-iptables uses when a flag
// is absent ("" for -i and -b: capture nothing). PodDefault is what Istio's
// sidecar injector and istio-cni use for a pod that sets nothing (-i '*',
// -b '*', ...); DefaultConfig and the CNI plugin start from it.

// OptionKind is how an option's value is written.
type OptionKind uint8

const (
	// OptString is a string in Istio's syntax (a port, a list, a mode).
	OptString OptionKind = iota
	// OptBool is a boolean flag: "-x" alone means true.
	OptBool
)

// Option is one row of the registry.
type Option struct {
	// Name is istio-iptables' long flag name, also the Field of errors.
	// Rows without a flag (Istio reads some options from the
	// environment only) have Name == Env.
	Name string
	// Short is the one-letter flag, if any.
	Short string
	// Aliases are further long flag names of ours (older spellings).
	Aliases []string
	// NoFlag: the option has no command-line flag (environment only).
	NoFlag bool
	// Env is the environment variable, "" when Istio reads none.
	Env        string
	EnvAliases []string
	// Annotations are the pod annotations that override the option, the
	// first present one winning (as in Istio's injection template).
	Annotations []string
	// ConfigKey is the key in the egress-cni conflist entry, "" if none.
	ConfigKey string
	Kind      OptionKind
	// Default is istio-iptables' default; PodDefault the injector's.
	Default    string
	PodDefault string
	Usage      string
	// set parses v into c. Errors are *FieldError with Field == Name.
	set func(c *Config, v string) error
}

// Env names of the options Istio reads from the environment only.
const (
	EnvOwnerGroups        = "ISTIO_OUTBOUND_OWNER_GROUPS"
	EnvOwnerGroupsExclude = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"
	EnvIPv4LoopbackCIDR   = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"
)

// Annotation names used by the registry.
const (
	AnnotationInterceptionMode         = "sidecar.istio.io/interceptionMode"
	annTraffic                         = "traffic.sidecar.istio.io/"
	AnnotationIncludeOutboundIPRanges  = annTraffic + "includeOutboundIPRanges"
	AnnotationExcludeOutboundIPRanges  = annTraffic + "excludeOutboundIPRanges"
	AnnotationIncludeInboundPorts      = annTraffic + "includeInboundPorts"
	AnnotationExcludeInboundPorts      = annTraffic + "excludeInboundPorts"
	AnnotationIncludeOutboundPorts     = annTraffic + "includeOutboundPorts"
	AnnotationExcludeOutboundPorts     = annTraffic + "excludeOutboundPorts"
	AnnotationExcludeInterfaces        = annTraffic + "excludeInterfaces"
	AnnotationKubevirtInterfaces       = annTraffic + "kubevirtInterfaces"
	AnnotationRerouteVirtualInterfaces = "istio.io/reroute-virtual-interfaces"
)

// CaptureOptions is the registry, in the order options are applied.
var CaptureOptions = []Option{
	{Name: FieldProxyPort, Short: "p", Aliases: []string{"proxy-port"}, ConfigKey: "proxyPort",
		Default: "15001", PodDefault: "15001",
		Usage: "port to which all outbound TCP is redirected",
		set:   portSetter(FieldProxyPort, func(c *Config) *uint16 { return &c.ProxyPort })},
	{Name: FieldInboundPort, Short: "z", Env: "INBOUND_CAPTURE_PORT", ConfigKey: "inboundPort",
		Default: "15006", PodDefault: "15006",
		Usage: "port to which all inbound TCP is redirected",
		set:   portSetter(FieldInboundPort, func(c *Config) *uint16 { return &c.InboundPort })},
	{Name: FieldInboundTunnelPort, Short: "e", Env: "INBOUND_TUNNEL_PORT", ConfigKey: "inboundTunnelPort",
		Default: "15008", PodDefault: "15008",
		Usage: "inbound tunnel (HBONE) port, never captured",
		set:   portSetter(FieldInboundTunnelPort, func(c *Config) *uint16 { return &c.InboundTunnelPort })},
	{Name: FieldProxyUID, Short: "u", Env: "PROXY_UID", ConfigKey: "proxyUID",
		Default: "", PodDefault: "1337",
		Usage: "comma-separated UIDs (or user names) whose traffic is not captured (default: the UID of $ENVOY_USER, else 1337)",
		set: func(c *Config, v string) (err error) {
			c.ProxyUIDs, err = ParseIDList(FieldProxyUID, v)
			return err
		}},
	{Name: FieldProxyGID, Short: "g", Env: "PROXY_GID", ConfigKey: "proxyGID",
		Default: "", PodDefault: "1337",
		Usage: "comma-separated GIDs (or group names) whose traffic is not captured (default: the UIDs)",
		set: func(c *Config, v string) (err error) {
			c.ProxyGIDs, err = ParseIDList(FieldProxyGID, v)
			return err
		}},
	{Name: FieldMode, Short: "m", Env: "ISTIO_INBOUND_INTERCEPTION_MODE", Annotations: []string{AnnotationInterceptionMode},
		ConfigKey: "interceptionMode", Default: "", PodDefault: "REDIRECT",
		Usage: "inbound interception mode: REDIRECT or TPROXY (empty means REDIRECT)",
		set: func(c *Config, v string) (err error) {
			if strings.TrimSpace(v) == "" {
				c.Mode = ModeRedirect
				return nil
			}
			c.Mode, err = ParseMode(FieldMode, v)
			return err
		}},
	{Name: FieldTProxyMark, Short: "t", Env: "ISTIO_INBOUND_TPROXY_MARK",
		Default: "1337", PodDefault: "1337", Usage: "TPROXY mode: the packet mark of inbound connections",
		set: func(c *Config, v string) (err error) {
			c.TProxyMark, err = parseUint32(FieldTProxyMark, v)
			return err
		}},
	{Name: FieldTProxyRouteTable, Short: "r", Env: "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
		Default: "133", PodDefault: "133", Usage: "TPROXY mode: the route table of marked packets",
		set: func(c *Config, v string) (err error) {
			c.TProxyRouteTable, err = parseUint32(FieldTProxyRouteTable, v)
			return err
		}},
	{Name: FieldInboundIncludePorts, Short: "b", Env: "ISTIO_INBOUND_PORTS", Annotations: []string{AnnotationIncludeInboundPorts},
		ConfigKey: "includeInboundPorts", Default: "", PodDefault: "*",
		Usage: "comma-separated inbound ports to capture, or '*'; empty disables inbound capture",
		set: func(c *Config, v string) (err error) {
			c.InboundIncludeAll, c.InboundIncludePorts, err = ParsePortList(FieldInboundIncludePorts, v, true)
			return err
		}},
	{Name: FieldInboundExcludePorts, Short: "d", Env: "ISTIO_LOCAL_EXCLUDE_PORTS", Annotations: []string{AnnotationExcludeInboundPorts},
		ConfigKey: "excludeInboundPorts", Default: "", PodDefault: "15090,15021,15020",
		Usage: "comma-separated inbound ports never captured (with -b '*')",
		set: func(c *Config, v string) (err error) {
			_, c.InboundExcludePorts, err = ParsePortList(FieldInboundExcludePorts, v, false)
			return err
		}},
	{Name: FieldExcludeInterfaces, Short: "c", Env: "ISTIO_EXCLUDE_INTERFACES", Annotations: []string{AnnotationExcludeInterfaces},
		ConfigKey: "excludeInterfaces", Usage: "comma-separated interfaces whose traffic is never captured",
		set: func(c *Config, v string) (err error) {
			c.ExcludeInterfaces, err = ParseInterfaceList(FieldExcludeInterfaces, v)
			return err
		}},
	{Name: FieldOutboundIncludeCIDRs, Short: "i", Env: "ISTIO_SERVICE_CIDR", Annotations: []string{AnnotationIncludeOutboundIPRanges},
		ConfigKey: "includeOutboundIPRanges", Default: "", PodDefault: "*",
		Usage: "comma-separated outbound CIDRs to capture, or '*'; empty captures none",
		set: func(c *Config, v string) (err error) {
			c.OutboundIncludeAll, c.OutboundIncludeCIDRs, err = ParseCIDRList(FieldOutboundIncludeCIDRs, v)
			return err
		}},
	{Name: FieldOutboundExcludeCIDRs, Short: "x", Env: "ISTIO_SERVICE_EXCLUDE_CIDR", Annotations: []string{AnnotationExcludeOutboundIPRanges},
		ConfigKey: "excludeOutboundIPRanges", Usage: "comma-separated outbound CIDRs never captured",
		set: func(c *Config, v string) error {
			all, ps, err := ParseCIDRList(FieldOutboundExcludeCIDRs, v)
			if all {
				// "-x '*'" excludes everything: both families' default routes.
				ps = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
			}
			c.OutboundExcludeCIDRs = ps
			return err
		}},
	{Name: FieldOutboundIncludePorts, Short: "q", Env: "ISTIO_OUTBOUND_PORTS", Annotations: []string{AnnotationIncludeOutboundPorts},
		ConfigKey: "includeOutboundPorts", Usage: "comma-separated outbound ports always captured",
		set: func(c *Config, v string) (err error) {
			_, c.OutboundIncludePorts, err = ParsePortList(FieldOutboundIncludePorts, v, false)
			return err
		}},
	{Name: FieldOutboundExcludePorts, Short: "o", Env: "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", Annotations: []string{AnnotationExcludeOutboundPorts},
		ConfigKey: "excludeOutboundPorts", Usage: "comma-separated outbound ports never captured (TCP and UDP)",
		set: func(c *Config, v string) (err error) {
			_, c.OutboundExcludePorts, err = ParsePortList(FieldOutboundExcludePorts, v, false)
			return err
		}},
	{Name: FieldRerouteVirtualInterfaces, Short: "k", Env: "KUBE_VIRT_INTERFACES",
		Annotations: []string{AnnotationRerouteVirtualInterfaces, AnnotationKubevirtInterfaces}, ConfigKey: "kubevirtInterfaces",
		Usage: "comma-separated virtual interfaces whose inbound traffic is treated as outbound",
		set: func(c *Config, v string) (err error) {
			c.RerouteVirtualInterfaces, err = ParseInterfaceList(FieldRerouteVirtualInterfaces, v)
			return err
		}},
	{Name: FieldRedirectDNS, Env: "REDIRECT_DNS", EnvAliases: []string{"ISTIO_META_DNS_CAPTURE"}, ConfigKey: "redirectDNS",
		Kind: OptBool, Default: "false", PodDefault: "false", Usage: "capture DNS to the DNS port (15053)",
		set: boolSetter(FieldRedirectDNS, func(c *Config) *bool { return &c.RedirectDNS })},
	// The CNI plugin cannot read the pod's /etc/resolv.conf, so its
	// redirectDNS captures DNS to every address (PodDefault true);
	// egress-init reads the nameservers as istio-iptables does.
	{Name: FieldCaptureAllDNS, Env: "CAPTURE_ALL_DNS", Kind: OptBool, Default: "false", PodDefault: "true",
		Usage: "with --redirect-dns, capture DNS to every address, not only the nameservers of /etc/resolv.conf",
		set:   boolSetter(FieldCaptureAllDNS, func(c *Config) *bool { return &c.CaptureAllDNS })},
	{Name: FieldDropInvalid, Env: "DROP_INVALID", EnvAliases: []string{"INVALID_DROP"}, Kind: OptBool, ConfigKey: "dropInvalid",
		Default: "false", PodDefault: "false", Usage: "drop packets conntrack deems INVALID",
		set: boolSetter(FieldDropInvalid, func(c *Config) *bool { return &c.DropInvalid })},
	{Name: FieldDualStack, Env: "DUAL_STACK", EnvAliases: []string{"ISTIO_DUAL_STACK"}, Kind: OptBool,
		Default: "false", PodDefault: "false",
		Usage: "accepted for compatibility: both families are programmed unless --families says otherwise",
		set: func(_ *Config, v string) error {
			_, err := parseBool(FieldDualStack, v)
			return err
		}},
	{Name: EnvOwnerGroups, NoFlag: true, Env: EnvOwnerGroups, ConfigKey: "outboundOwnerGroups", Default: "*", PodDefault: "*",
		Usage: "groups (names or GIDs) whose traffic is captured, or '*'",
		set: func(c *Config, v string) error {
			if strings.TrimSpace(v) == "*" {
				c.OwnerGroupsInclude = nil
				return nil
			}
			ids, err := ParseIDList(EnvOwnerGroups, v)
			c.OwnerGroupsInclude = ids
			return err
		}},
	{Name: EnvOwnerGroupsExclude, NoFlag: true, Env: EnvOwnerGroupsExclude, ConfigKey: "outboundOwnerGroupsExclude",
		Usage: "groups (names or GIDs) whose traffic is not captured (with ISTIO_OUTBOUND_OWNER_GROUPS='*')",
		set: func(c *Config, v string) (err error) {
			c.OwnerGroupsExclude, err = ParseIDList(EnvOwnerGroupsExclude, v)
			return err
		}},
	{Name: EnvIPv4LoopbackCIDR, NoFlag: true, Env: EnvIPv4LoopbackCIDR, Default: "127.0.0.1/32", PodDefault: "127.0.0.1/32",
		Usage: "the IPv4 loopback range the app's loopback traffic goes to",
		set: func(c *Config, v string) error {
			p, err := parsePrefix(strings.TrimSpace(v))
			if err != nil {
				return fieldErr(EnvIPv4LoopbackCIDR, v, err.Error())
			}
			c.IPv4LoopbackCIDR = nil // nil is the default
			if p != defaultIPv4Loopback {
				c.IPv4LoopbackCIDR = &p
			}
			return nil
		}},
	{Name: FieldDNSPort, ConfigKey: "dnsPort", Default: "15053", PodDefault: "15053",
		Usage: "port DNS is redirected to with --redirect-dns",
		set:   portSetter(FieldDNSPort, func(c *Config) *uint16 { return &c.DNSPort })},
	{Name: FieldFamilies, ConfigKey: "families", Default: "dual", PodDefault: "dual",
		Usage: "IP families to program: ipv4, ipv6 or dual",
		set: func(c *Config, v string) (err error) {
			c.Families, err = ParseFamilies(FieldFamilies, v)
			return err
		}},
}

// LookupOption returns the row of the option with the given Name.
func LookupOption(name string) *Option {
	for i := range CaptureOptions {
		if CaptureOptions[i].Name == name {
			return &CaptureOptions[i]
		}
	}
	return nil
}

// OptionText is the textual form of (part of) a Config, keyed by option
// Name: an absent key leaves the value alone, "" sets an empty list.
// Apply it with (*Config).ApplyOptions.
type OptionText map[string]string

// ApplyOptions parses each given option into c, in registry order. It
// stops at the first error and leaves c unchanged in that case. It does
// not call Validate.
func (c *Config) ApplyOptions(o OptionText) error {
	for k, v := range o {
		if LookupOption(k) == nil {
			return fieldErr(k, v, "not a capture option")
		}
	}
	n := c.clone()
	for i := range CaptureOptions {
		row := &CaptureOptions[i]
		v, ok := o[row.Name]
		if !ok {
			continue
		}
		if err := row.set(&n, v); err != nil {
			return err
		}
	}
	*c = n
	return nil
}

func (c *Config) clone() Config {
	n := *c
	n.ProxyUIDs = slices.Clone(c.ProxyUIDs)
	n.ProxyGIDs = slices.Clone(c.ProxyGIDs)
	n.OutboundIncludeCIDRs = slices.Clone(c.OutboundIncludeCIDRs)
	n.OutboundExcludeCIDRs = slices.Clone(c.OutboundExcludeCIDRs)
	n.OutboundIncludePorts = slices.Clone(c.OutboundIncludePorts)
	n.OutboundExcludePorts = slices.Clone(c.OutboundExcludePorts)
	n.InboundIncludePorts = slices.Clone(c.InboundIncludePorts)
	n.InboundExcludePorts = slices.Clone(c.InboundExcludePorts)
	n.ExcludeInterfaces = slices.Clone(c.ExcludeInterfaces)
	n.RerouteVirtualInterfaces = slices.Clone(c.RerouteVirtualInterfaces)
	n.OwnerGroupsInclude = slices.Clone(c.OwnerGroupsInclude)
	n.OwnerGroupsExclude = slices.Clone(c.OwnerGroupsExclude)
	n.DNSServers = slices.Clone(c.DNSServers)
	return n
}

// podDefaults is DefaultConfig, built once from the PodDefault column.
var podDefaults = func() Config {
	var c Config
	for i := range CaptureOptions {
		row := &CaptureOptions[i]
		if err := row.set(&c, row.PodDefault); err != nil {
			panic(fmt.Sprintf("rules: PodDefault of %s: %v", row.Name, err))
		}
	}
	return c
}()

// IstioIptablesDefaults returns the options istio-iptables assumes when
// no flag and no environment variable is set (the Default column).
func IstioIptablesDefaults() OptionText {
	o := OptionText{}
	for _, row := range CaptureOptions {
		o[row.Name] = row.Default
	}
	return o
}

func portSetter(field string, dst func(*Config) *uint16) func(*Config, string) error {
	return func(c *Config, v string) (err error) {
		*dst(c), err = ParsePort(field, v)
		return err
	}
}

func boolSetter(field string, dst func(*Config) *bool) func(*Config, string) error {
	return func(c *Config, v string) (err error) {
		*dst(c), err = parseBool(field, v)
		return err
	}
}

func parseBool(field, v string) (bool, error) {
	b, err := strconv.ParseBool(strings.TrimSpace(v))
	if err != nil {
		return false, fieldErr(field, v, "must be true or false")
	}
	return b, nil
}

func parseUint32(field, v string) (uint32, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
	if err != nil {
		return 0, fieldErr(field, v, "not a number between 0 and 4294967295")
	}
	return uint32(n), nil
}
