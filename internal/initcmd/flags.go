// Package initcmd is egress-init: a drop-in for istio-iptables in an init
// container. It takes istio-iptables' flags and environment variables
// (Istio master's names, defaults and precedence), builds the pod ruleset
// with pkg/rules and applies it with the chosen backend.
package initcmd

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Action is what a run does.
type Action int

const (
	ActionApply Action = iota
	ActionDryRun
	ActionCheck
	ActionCleanup
)

// Invocation is a parsed command line.
type Invocation struct {
	Action  Action
	Config  rules.Config
	Backend rules.BackendName
	NetNS   string
	// Validate runs Istio's validation probe after the rules are in
	// place (--run-validation); SkipRuleApply applies nothing first.
	Validate      bool
	SkipRuleApply bool
	ProbePort     uint16
	ProbeTimeout  time.Duration
	// ForceApply, Reconcile and CNIMode are accepted for compatibility;
	// see the usage of each flag.
	ForceApply, Reconcile, CNIMode bool
	Log                            LogOptions
}

// runOption is a flag of egress-init that is not a capture option: what
// to do, where, and how to log. It has the registry's shape (flag names,
// env name, default) so that the flag set is built the same way.
type runOption struct {
	name, short string
	aliases     []string
	env         string
	kind        rules.OptionKind
	def, usage  string
	// list: the flag may be repeated (--log_target); values are joined
	// with commas.
	list bool
}

// Names of the run options.
const (
	optDryRun              = "dry-run"
	optSkipRuleApply       = "skip-rule-apply"
	optRunValidation       = "run-validation"
	optProbePort           = "iptables-probe-port"
	optProbeTimeout        = "probe-timeout"
	optNetworkNamespace    = "network-namespace"
	optCNIMode             = "cni-mode"
	optReconcile           = "reconcile"
	optCleanupOnly         = "cleanup-only"
	optForceApply          = "force-apply"
	optNativeNftables      = "native-nftables"
	optForceIptablesBinary = "force-iptables-binary"
	optBackend             = "backend"
	optCheck               = "check"
	optLogOutputLevel      = "log_output_level"
	optLogAsJSON           = "log_as_json"
	optLogCaller           = "log_caller"
	optLogStacktraceLevel  = "log_stacktrace_level"
	optLogTarget           = "log_target"
	optVKlog               = "vklog"
)

// runOptions: istio-iptables' own (with its env names), then ours, then
// pilot-agent's logging flags (no env, as in pilot-agent).
var runOptions = []runOption{
	{name: optDryRun, short: "n", env: "DRY_RUN", kind: rules.OptBool, def: "false", usage: "print the ruleset in the backend's syntax and change nothing"},
	{name: optSkipRuleApply, env: "SKIP_RULE_APPLY", kind: rules.OptBool, def: "false", usage: "apply no rules (with --run-validation: only validate what the CNI plugin set up)"},
	{name: optRunValidation, env: "RUN_VALIDATION", kind: rules.OptBool, def: "false", usage: "validate the capture as Istio does: exit 126 unless a probe to 127.0.0.6:<probe port> reaches the proxy ports"},
	{name: optProbePort, env: "IPTABLES_PROBE_PORT", def: "15002", usage: "the original port of the validation probe"},
	{name: optProbeTimeout, env: "PROBE_TIMEOUT", def: "5s", usage: "how long validation waits for its probe"},
	{name: optNetworkNamespace, aliases: []string{"netns"}, env: "NETWORK_NAMESPACE", usage: "network namespace path to program (default: the namespace egress-init runs in)"},
	{name: optCNIMode, env: "CNI_MODE", kind: rules.OptBool, def: "false", usage: "accepted for compatibility: egress-init needs no host xtables lock (its backends are atomic)"},
	{name: optReconcile, env: "RECONCILE", kind: rules.OptBool, def: "false", usage: "accepted for compatibility: apply always replaces the rules we own with the desired ones"},
	{name: optCleanupOnly, env: "CLEANUP_ONLY", kind: rules.OptBool, def: "false", usage: "remove our rules and exit"},
	{name: optForceApply, env: "FORCE_APPLY", kind: rules.OptBool, def: "false", usage: "accepted for compatibility: apply is atomic and idempotent, so it always applies"},
	{name: optNativeNftables, env: "NATIVE_NFTABLES", kind: rules.OptBool, def: "false", usage: "use the nftables backend (same as --backend nftables)"},
	{name: optForceIptablesBinary, env: "FORCE_IPTABLES_BINARY", usage: "legacy or nft: use that iptables flavour (same as --backend iptables-legacy or iptables-nft)"},
	{name: optBackend, def: "auto", usage: "auto, nftables, iptables-nft or iptables-legacy"},
	{name: optCheck, kind: rules.OptBool, def: "false", usage: "compare the live rules with the desired ones; exit 1 on drift"},
	{name: optLogOutputLevel, def: "default:info", usage: "minimum level per scope, <scope>:<level>,... (levels debug, info, warn, error, fatal, none); the default or all scope sets ours"},
	{name: optLogAsJSON, kind: rules.OptBool, def: "false", usage: "log as JSON"},
	{name: optLogCaller, usage: "comma-separated scopes that log the caller; default or all turns it on"},
	{name: optLogStacktraceLevel, def: "default:none", usage: "accepted for compatibility (checked, no stack traces are logged)"},
	{name: optLogTarget, list: true, usage: "where to log: stdout, stderr or a file path (repeatable; default stderr)"},
	{name: optVKlog, def: "0", usage: "accepted for compatibility (klog verbosity; egress-init does not use klog)"},
}

// optValue is a flag.Value that records the value into the parse's map.
type optValue struct {
	name   string
	bool   bool
	list   bool
	values map[string]string
	set    map[string]bool
}

func (v *optValue) String() string { return "" }
func (v *optValue) Set(s string) error {
	if v.bool {
		if _, err := strconv.ParseBool(s); err != nil {
			return fmt.Errorf("must be true or false")
		}
	}
	if v.list && v.set[v.name] && v.values[v.name] != "" {
		s = v.values[v.name] + "," + s
	}
	v.values[v.name], v.set[v.name] = s, true
	return nil
}
func (v *optValue) IsBoolFlag() bool { return v.bool }

// Parse parses istio-iptables-compatible arguments (without the program
// name), with the process's environment. Nothing is touched: the caller
// applies only after Parse succeeded.
func Parse(args []string, stderr io.Writer) (*Invocation, error) {
	return ParseEnv(args, os.LookupEnv, stderr)
}

// source says where an option's value came from, for error messages.
type source struct {
	env string // the environment variable, "" for a flag or the default
}

// ParseEnv is Parse with the environment given. Precedence is Istio's:
// a flag wins over the environment, an alias variable (ISTIO_META_DNS_CAPTURE)
// over the flag's own variable (REDIRECT_DNS), and that over the default.
// Every error names the flag or the variable, and the value.
func ParseEnv(args []string, lookupEnv func(string) (string, bool), stderr io.Writer) (*Invocation, error) {
	// pilot-agent's subcommand word, as Istio's injector renders it.
	if len(args) > 0 && args[0] == "istio-iptables" {
		args = args[1:]
	}
	values := map[string]string{}
	from := map[string]source{}
	fromFlag := map[string]bool{}

	fs := flag.NewFlagSet("egress-init", flag.ContinueOnError)
	fs.SetOutput(stderr)
	register := func(name, short string, aliases []string, kind rules.OptionKind, list bool, usage string) {
		v := &optValue{name: name, bool: kind == rules.OptBool, list: list, values: values, set: fromFlag}
		fs.Var(v, name, usage)
		if short != "" {
			fs.Var(v, short, usage+" (same as --"+name+")")
		}
		for _, a := range aliases {
			fs.Var(v, a, usage+" (same as --"+name+")")
		}
	}
	fromEnv := func(name, def, env string, aliases []string) {
		values[name] = def
		for _, e := range append([]string{env}, aliases...) {
			if e == "" {
				continue
			}
			if v, ok := lookupEnv(e); ok {
				values[name], from[name] = v, source{env: e}
			}
		}
	}
	for i := range rules.CaptureOptions {
		o := &rules.CaptureOptions[i]
		fromEnv(o.Name, o.Default, o.Env, o.EnvAliases)
		if o.NoFlag {
			continue
		}
		usage := o.Usage
		if o.Default != "" && o.Kind != rules.OptBool {
			usage += fmt.Sprintf(" (default %q)", o.Default)
		}
		if o.Env != "" {
			usage += " [$" + o.Env + "]"
		}
		register(o.Name, o.Short, o.Aliases, o.Kind, false, usage)
	}
	for _, o := range runOptions {
		fromEnv(o.name, o.def, o.env, nil)
		usage := o.usage
		if o.def != "" && o.kind != rules.OptBool {
			usage += fmt.Sprintf(" (default %q)", o.def)
		}
		if o.env != "" {
			usage += " [$" + o.env + "]"
		}
		register(o.name, o.short, o.aliases, o.kind, o.list, usage)
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	for name := range fromFlag {
		delete(from, name)
	}
	inv, err := parseValues(values, from, lookupEnv)
	if err != nil {
		return nil, relabelEnv(err, from)
	}
	return inv, nil
}

// relabelEnv names the environment variable in an error about a value
// that came from the environment.
func relabelEnv(err error, from map[string]source) error {
	fe, ok := rules.AsFieldError(err)
	if !ok {
		return err
	}
	if s, ok := from[fe.Field]; ok && s.env != "" {
		return &rules.FieldError{Field: fe.Field + " (from $" + s.env + ")", Value: fe.Value, Reason: fe.Reason}
	}
	return err
}

func boolOpt(values map[string]string, name string) (bool, error) {
	b, err := strconv.ParseBool(strings.TrimSpace(values[name]))
	if err != nil {
		return false, &rules.FieldError{Field: name, Value: values[name], Reason: "must be true or false"}
	}
	return b, nil
}

func parseValues(values map[string]string, from map[string]source, lookupEnv func(string) (string, bool)) (*Invocation, error) {
	bools := map[string]bool{}
	for _, o := range runOptions {
		if o.kind != rules.OptBool {
			continue
		}
		b, err := boolOpt(values, o.name)
		if err != nil {
			return nil, err
		}
		bools[o.name] = b
	}
	n := 0
	for _, b := range []bool{bools[optDryRun], bools[optCleanupOnly], bools[optCheck]} {
		if b {
			n++
		}
	}
	if n > 1 {
		return nil, errors.New("--dry-run, --cleanup-only and --check are mutually exclusive")
	}
	inv := &Invocation{
		Backend:       rules.BackendAuto,
		NetNS:         values[optNetworkNamespace],
		Validate:      bools[optRunValidation],
		SkipRuleApply: bools[optSkipRuleApply],
		ForceApply:    bools[optForceApply],
		Reconcile:     bools[optReconcile],
		CNIMode:       bools[optCNIMode],
	}
	switch {
	case bools[optDryRun]:
		inv.Action = ActionDryRun
	case bools[optCleanupOnly]:
		inv.Action = ActionCleanup
	case bools[optCheck]:
		inv.Action = ActionCheck
	}
	var err error
	if inv.ProbePort, err = rules.ParsePort(optProbePort, values[optProbePort]); err != nil {
		return nil, err
	}
	if inv.ProbeTimeout, err = time.ParseDuration(strings.TrimSpace(values[optProbeTimeout])); err != nil || inv.ProbeTimeout <= 0 {
		return nil, &rules.FieldError{Field: optProbeTimeout, Value: values[optProbeTimeout], Reason: "must be a positive duration such as 5s"}
	}
	if inv.Backend, err = backendOf(values, bools[optNativeNftables]); err != nil {
		return nil, err
	}
	if inv.Log, err = parseLogOptions(values); err != nil {
		return nil, err
	}

	// istio-iptables' derived defaults: an empty -u is the UID of
	// $ENVOY_USER (istio-proxy), else 1337; an empty -g is the -u list.
	// Names are looked up in this image's user and group databases.
	opts := rules.OptionText{}
	for _, o := range rules.CaptureOptions {
		opts[o.Name] = values[o.Name]
	}
	if strings.TrimSpace(opts[rules.FieldProxyUID]) == "" {
		opts[rules.FieldProxyUID] = envoyUID(lookupEnv)
		delete(from, rules.FieldProxyUID)
	}
	if strings.TrimSpace(opts[rules.FieldProxyGID]) == "" {
		opts[rules.FieldProxyGID] = opts[rules.FieldProxyUID]
		from[rules.FieldProxyGID] = from[rules.FieldProxyUID]
	}
	for _, f := range []struct {
		name  string
		group bool
	}{{rules.FieldProxyUID, false}, {rules.FieldProxyGID, true}, {rules.EnvOwnerGroups, true}, {rules.EnvOwnerGroupsExclude, true}} {
		v, err := resolveIDs(f.name, opts[f.name], f.group)
		if err != nil {
			return nil, err
		}
		opts[f.name] = v
	}
	cfg := rules.DefaultConfig()
	if err := cfg.ApplyOptions(opts); err != nil {
		return nil, err
	}
	// As istio-iptables: DNS is captured to the pod's nameservers, read
	// from /etc/resolv.conf, unless --capture-all-dns; with none, DNS
	// capture is off.
	if cfg.RedirectDNS && !cfg.CaptureAllDNS {
		servers, err := nameservers(resolvConf)
		if err != nil {
			return nil, fmt.Errorf("--%s: %w", rules.FieldRedirectDNS, err)
		}
		cfg.DNSServers = servers
	}
	// NONE means "no capture": Run reports it and applies nothing, so
	// there is nothing to validate. Cleanup needs no valid config either,
	// and neither does validation alone.
	if inv.Action != ActionCleanup && cfg.Mode != rules.ModeNone && !(inv.SkipRuleApply && inv.Action == ActionApply) {
		if err := cfg.Validate(); err != nil {
			return nil, err
		}
	}
	inv.Config = cfg
	return inv, nil
}

// envoyUID is istio-iptables' default proxy UID.
func envoyUID(lookupEnv func(string) (string, bool)) string {
	name, ok := lookupEnv("ENVOY_USER")
	if !ok {
		name = "istio-proxy"
	}
	if u, err := user.Lookup(name); err == nil {
		return u.Uid
	}
	return strconv.Itoa(rules.DefaultProxyUID)
}

// resolveIDs replaces user or group names in a list by their numeric IDs.
// "*" (owner groups) is kept.
func resolveIDs(field, list string, group bool) (string, error) {
	if strings.TrimSpace(list) == "*" {
		return list, nil
	}
	items := strings.Split(list, ",")
	for i, it := range items {
		it = strings.TrimSpace(it)
		if it == "" {
			continue // the parser reports empty items
		}
		if _, err := strconv.ParseUint(it, 10, 32); err == nil {
			continue
		}
		if group {
			g, err := user.LookupGroup(it)
			if err != nil {
				return "", &rules.FieldError{Field: field, Value: it, Reason: "not a numeric GID, and no group of that name in this image"}
			}
			items[i] = g.Gid
		} else {
			u, err := user.Lookup(it)
			if err != nil {
				return "", &rules.FieldError{Field: field, Value: it, Reason: "not a numeric UID, and no user of that name in this image"}
			}
			items[i] = u.Uid
		}
	}
	return strings.Join(items, ","), nil
}

// backendOf resolves --backend, --native-nftables and
// --force-iptables-binary, which must agree.
func backendOf(values map[string]string, native bool) (rules.BackendName, error) {
	b, err := rules.ParseBackendName(optBackend, values[optBackend])
	if err != nil {
		return "", err
	}
	pick := func(flag string, n rules.BackendName) error {
		if b != rules.BackendAuto && b != n {
			return fmt.Errorf("--%s asks for backend %s, but another flag asks for %s", flag, n, b)
		}
		b = n
		return nil
	}
	var forced rules.BackendName
	switch v := strings.TrimSpace(values[optForceIptablesBinary]); v {
	case "":
	case "legacy":
		forced = rules.BackendIPTablesLegacy
	case "nft":
		forced = rules.BackendIPTablesNFT
	default:
		return "", &rules.FieldError{Field: optForceIptablesBinary, Value: v, Reason: "must be legacy or nft"}
	}
	// As in istio-iptables, --native-nftables wins over
	// --force-iptables-binary, which only picks among iptables binaries.
	switch {
	case native:
		err = pick(optNativeNftables, rules.BackendNFTables)
	case forced != "":
		err = pick(optForceIptablesBinary, forced)
	}
	return b, err
}

// resolvConf is the file the nameservers are read from.
var resolvConf = "/etc/resolv.conf"

// nameservers returns the nameserver addresses of a resolv.conf.
func nameservers(path string) ([]netip.Addr, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("could not read the nameservers: %w", err)
	}
	var out []netip.Addr
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil {
			continue // as resolvers do: an unparsable entry is skipped
		}
		if a = a.WithZone(""); !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out, nil
}
