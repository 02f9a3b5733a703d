// Package cni is the logic of the egress-cni chained CNI plugin: config
// parsing, the per-pod capture decision, and the ADD/DEL/CHECK/STATUS/GC
// commands. cmd/egress-cni only hands these functions to skel.
//
// The plugin runs after the node's primary plugin (bridge, Calico,
// Cilium…). ADD programs the pod's capture rules inside the pod's network
// namespace and passes the primary plugin's result through unchanged.
//
// Platforms: the config parser, the capture decision and the gateway
// annotation code build and test on any OS; the commands, which enter
// network namespaces, are in _linux.go files.
package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/egress-cni/egress-cni/pkg/node"
	"github.com/egress-cni/egress-cni/pkg/rules"
)

// PluginType is the "type" of our conflist entry and our binary's name.
const PluginType = "egress-cni"

// PodAnnotationsCapability is the capability that makes containerd (≥ 1.5)
// and CRI-O (≥ 1.29) deliver the pod's annotations in runtimeConfig. The
// conflist entry must declare it: "capabilities": {"<this>": true}.
const PodAnnotationsCapability = "io.kubernetes.cri.pod-annotations"

// Defaults of the keys that are ours, not the engine's.
const (
	DefaultLogFile           = "/var/log/egress-cni.log"
	DefaultLogLevel          = "info"
	DefaultCaptureAnnotation = "sidecar.istio.io/status"
)

// DefaultExcludeNamespaces are never captured unless the config says
// otherwise. kube-system holds the node agents (CNI daemons, kube-proxy,
// DNS) that must keep working when the mesh is down.
var DefaultExcludeNamespaces = []string{"kube-system"}

// Capture selection values of the "capture" key.
const (
	// CaptureAnnotated captures pods that carry captureAnnotation
	// (default sidecar.istio.io/status, which Istio's injector adds).
	CaptureAnnotated = "annotated"
	// CaptureAll captures every pod outside excludeNamespaces.
	CaptureAll = "all"
)

// NetConf is our conflist entry. Every optional key of the engine's
// Config is a camelCase key named after Istio's annotation suffix where
// one exists (traffic.sidecar.istio.io/excludeOutboundIPRanges →
// excludeOutboundIPRanges). Values are strings in Istio's syntax; numbers
// and JSON arrays of strings or numbers are accepted too, so
// "proxyPort": 15001 and "excludeOutboundIPRanges": ["10.0.0.0/8"] work.
// Unknown keys are an error: a typo must not silently leave a pod
// uncaptured.
type NetConf struct {
	types.PluginConf

	// RuntimeConfig carries the capabilities the runtime filled in. Only
	// PodAnnotationsCapability is read; other keys are ignored, since
	// which ones arrive depends on the whole conflist.
	RuntimeConfig map[string]json.RawMessage `json:"runtimeConfig,omitempty"`
	// Args is the CNI "args" convention. Accepted and ignored.
	Args json.RawMessage `json:"args,omitempty"`
	// Attachments is the pre-1.1 spelling of cni.dev/valid-attachments
	// that libcni still sends with GC. Accepted and ignored.
	Attachments json.RawMessage `json:"cni.dev/attachments,omitempty"`

	// CaptureOptions are the capture keys (every row of the option
	// registry, rules.CaptureOptions, with a ConfigKey), by option name.
	// ParseConfig reads them from the registry's keys.
	CaptureOptions rules.OptionText `json:"-"`
	Backend        *string          `json:"backend,omitempty"`

	// ExcludeNamespaces are never captured. nil means
	// DefaultExcludeNamespaces; [] means none.
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
	// Capture is CaptureAnnotated (default) or CaptureAll.
	Capture *string `json:"capture,omitempty"`
	// CaptureAnnotation selects pods under CaptureAnnotated.
	CaptureAnnotation *string `json:"captureAnnotation,omitempty"`
	// LogFile: nil means DefaultLogFile, "" disables logging, "stderr"
	// logs to the runtime (containerd records a failing plugin's stderr).
	LogFile *string `json:"logFile,omitempty"`
	// LogLevel is debug, info, warn or error.
	LogLevel *string `json:"logLevel,omitempty"`

	// NodeEnforcement makes ADD, DEL and GC maintain the node layer's
	// gateway sets (pkg/node) in the host namespace. Default false.
	NodeEnforcement *bool `json:"nodeEnforcement,omitempty"`
	// GatewaySelector says which pods are egress gateways; see
	// GatewaySelector. Only read with nodeEnforcement.
	GatewaySelector *GatewaySelectorConf `json:"gatewaySelector,omitempty"`
	// NodeConfig is the host path of the node rules' config, which the
	// installer keeps there. With it, an ADD on a node without the node
	// rules (after a reboot, before the installer runs again) applies
	// them first instead of failing. Only read with nodeEnforcement.
	NodeConfig *string `json:"nodeConfig,omitempty"`
	// StateDir is the host directory where ADD records each pod's
	// identity (namespace, name, container ID) for the agent's drop
	// audit, under pods/; DEL and GC remove the records. Default
	// node.DefaultStateDir; "" records none. Only read with
	// nodeEnforcement.
	StateDir *string `json:"stateDir,omitempty"`
}

// GatewaySelectorConf is the "gatewaySelector" key. Absent members keep
// their defaults; "" disables that half of the selector.
type GatewaySelectorConf struct {
	Namespace     *string `json:"namespace,omitempty"`
	PodNamePrefix *string `json:"podNamePrefix,omitempty"`
	Annotation    *string `json:"annotation,omitempty"`
	// AllowedNamespaces are the namespaces whose pods the annotation
	// may make gateways; without it the annotation is ignored.
	AllowedNamespaces []string `json:"allowedNamespaces,omitempty"`
}

// Settings is a parsed, validated NetConf.
type Settings struct {
	// Conf is the raw entry, with PrevResult parsed (nil if absent).
	Conf *NetConf
	// Base is the engine config before per-pod annotations.
	Base rules.Config
	// Set says which engine fields the config set (by rules.Field* name).
	Set               map[string]bool
	Backend           rules.BackendName
	ExcludeNamespaces []string
	Capture           string
	CaptureAnnotation string
	LogFile           string
	LogLevel          string
	// Annotations from runtimeConfig; nil when the runtime sent none
	// (not even null), non-nil and maybe empty when it did.
	Annotations map[string]string
	// NodeEnforcement: maintain the node's gateway sets.
	NodeEnforcement bool
	// Gateways selects the egress-gateway pods.
	Gateways GatewaySelector
	// NodeConfig: see NetConf.NodeConfig; "" means none.
	NodeConfig string
	// StateDir: see NetConf.StateDir; "" records no identities.
	StateDir string
}

// ConfigKeys maps the engine's field names to our config keys, for
// rules.Relabel. It is the ConfigKey column of the option registry.
var ConfigKeys = func() map[string]string {
	m := map[string]string{}
	for _, o := range rules.CaptureOptions {
		if o.ConfigKey != "" {
			m[o.Name] = o.ConfigKey
		}
	}
	return m
}()

// ConfigError is a rejected config value or annotation. ADD turns it into
// CNI error 7 (invalid network config).
type ConfigError struct {
	Pod string // "namespace/name", or "" for a config error
	// Source is "config key" or "annotation".
	Source string
	// Name is the key or annotation name.
	Name string
	// Value is the whole value as given; Item the offending part of it
	// (may equal Value).
	Value, Item string
	Reason      string
}

func (e *ConfigError) Error() string {
	var b strings.Builder
	if e.Pod != "" {
		fmt.Fprintf(&b, "pod %s: ", e.Pod)
	}
	fmt.Fprintf(&b, "invalid %s %s=%q", e.Source, e.Name, e.Value)
	if e.Item != "" && e.Item != e.Value {
		fmt.Fprintf(&b, " (item %q)", e.Item)
	}
	fmt.Fprintf(&b, ": %s", e.Reason)
	return b.String()
}

// flexString is a config value in Istio's string syntax that may also be
// written as a JSON number or an array of strings and numbers (joined with
// commas).
type flexString string

func (f *flexString) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	switch {
	case len(b) > 0 && b[0] == '"':
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*f = flexString(s)
	case len(b) > 0 && b[0] == '[':
		var items []json.RawMessage
		if err := json.Unmarshal(b, &items); err != nil {
			return err
		}
		parts := make([]string, len(items))
		for i, it := range items {
			var p flexString
			if err := p.UnmarshalJSON(it); err != nil {
				return err
			}
			if strings.Contains(string(p), ",") || bytes.HasPrefix(bytes.TrimSpace(it), []byte("[")) {
				return flexTypeError("list item " + string(it))
			}
			parts[i] = string(p)
		}
		*f = flexString(strings.Join(parts, ","))
	default:
		var n json.Number
		if err := json.Unmarshal(b, &n); err != nil {
			return flexTypeError(string(b))
		}
		if _, err := strconv.ParseUint(string(n), 10, 64); err != nil {
			return flexTypeError("number " + string(n))
		}
		*f = flexString(n)
	}
	return nil
}

// flexTypeError is an UnmarshalTypeError so that encoding/json adds the
// key's name to it.
func flexTypeError(what string) error {
	return &json.UnmarshalTypeError{Value: what, Type: reflect.TypeFor[string]()}
}

// ParseConfig parses and validates stdin of a CNI call. Errors are a
// *types.Error: code 6 (decoding failure) for malformed JSON, code 7 for
// unknown keys and bad values.
func ParseConfig(stdin []byte) (*Settings, error) {
	conf := &NetConf{}
	// The capture keys come from the option registry; the rest of the
	// entry is decoded strictly, so that an unknown key is an error.
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("could not parse %s config: %v", PluginType, err), "")
	}
	opts, err := captureKeys(raw)
	if err != nil {
		return nil, err
	}
	rest, err := json.Marshal(raw)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("could not parse %s config: %v", PluginType, err), "")
	}
	dec := json.NewDecoder(bytes.NewReader(rest))
	dec.DisallowUnknownFields()
	if err := dec.Decode(conf); err != nil {
		if strings.HasPrefix(err.Error(), "json: unknown field") {
			return nil, types.NewError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("%s config: %v", PluginType, err),
				"unknown keys are rejected so that a typo cannot leave pods uncaptured; see docs/cni.md for the keys")
		}
		var ute *json.UnmarshalTypeError
		if errors.As(err, &ute) {
			return nil, types.NewError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("%s config: key %s: cannot use %s: want %s", PluginType, ute.Field, ute.Value, ute.Type), "")
		}
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("could not parse %s config: %v", PluginType, err), "")
	}
	conf.CaptureOptions = opts
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("%s config: %v", PluginType, err), "")
	}

	s := &Settings{
		Conf:              conf,
		Base:              rules.DefaultConfig(),
		Backend:           rules.BackendAuto,
		ExcludeNamespaces: slices.Clone(DefaultExcludeNamespaces),
		Capture:           CaptureAnnotated,
		CaptureAnnotation: DefaultCaptureAnnotation,
		LogFile:           DefaultLogFile,
		LogLevel:          DefaultLogLevel,
		Gateways:          DefaultGatewaySelector,
	}
	cfgErr := func(key, value, reason string) error {
		return &codedError{code: types.ErrInvalidNetworkConfig,
			err: &ConfigError{Source: "config key", Name: key, Value: value, Item: value, Reason: reason}}
	}

	s.Set = map[string]bool{}
	for name := range opts {
		s.Set[name] = true
	}
	if err := s.Base.ApplyOptions(opts); err != nil {
		return nil, configFieldError("", "config key", ConfigKeys, opts, err)
	}
	// A NONE interception mode skips every pod; there is nothing to
	// validate. Otherwise validate now, so a bad config fails every ADD
	// whatever the pod.
	if s.Base.Mode != rules.ModeNone {
		if err := s.Base.Validate(); err != nil {
			return nil, configFieldError("", "config key", ConfigKeys, opts, err)
		}
	}
	if conf.Backend != nil {
		b, err := rules.ParseBackendName("backend", *conf.Backend)
		if err != nil {
			return nil, cfgErr("backend", *conf.Backend, reasonOf(err))
		}
		s.Backend = b
	}
	if conf.ExcludeNamespaces != nil {
		s.ExcludeNamespaces = conf.ExcludeNamespaces
		for _, n := range s.ExcludeNamespaces {
			if strings.TrimSpace(n) == "" {
				return nil, cfgErr("excludeNamespaces", n, "namespace names cannot be empty")
			}
		}
	}
	if conf.Capture != nil {
		switch *conf.Capture {
		case CaptureAnnotated, CaptureAll:
			s.Capture = *conf.Capture
		default:
			return nil, cfgErr("capture", *conf.Capture, `must be "annotated" or "all"`)
		}
	}
	if conf.CaptureAnnotation != nil {
		if strings.TrimSpace(*conf.CaptureAnnotation) == "" {
			return nil, cfgErr("captureAnnotation", *conf.CaptureAnnotation, `cannot be empty; use "capture": "all" to capture every pod`)
		}
		s.CaptureAnnotation = *conf.CaptureAnnotation
	}
	if conf.LogFile != nil {
		s.LogFile = *conf.LogFile
	}
	if conf.LogLevel != nil {
		if _, err := parseLevel(*conf.LogLevel); err != nil {
			return nil, cfgErr("logLevel", *conf.LogLevel, err.Error())
		}
		s.LogLevel = *conf.LogLevel
	}
	if conf.NodeEnforcement != nil {
		s.NodeEnforcement = *conf.NodeEnforcement
	}
	if conf.NodeConfig != nil {
		if !filepath.IsAbs(*conf.NodeConfig) || filepath.Clean(*conf.NodeConfig) != *conf.NodeConfig {
			return nil, cfgErr("nodeConfig", *conf.NodeConfig, "must be a clean absolute path on the host")
		}
		s.NodeConfig = *conf.NodeConfig
	}
	s.StateDir = node.DefaultStateDir
	if conf.StateDir != nil {
		if *conf.StateDir != "" && (!filepath.IsAbs(*conf.StateDir) || filepath.Clean(*conf.StateDir) != *conf.StateDir) {
			return nil, cfgErr("stateDir", *conf.StateDir, `must be a clean absolute path on the host, or "" for none`)
		}
		s.StateDir = *conf.StateDir
	}
	if g := conf.GatewaySelector; g != nil {
		for _, m := range []struct {
			key string
			v   *string
			dst *string
		}{{"namespace", g.Namespace, &s.Gateways.Namespace}, {"podNamePrefix", g.PodNamePrefix, &s.Gateways.PodNamePrefix}, {"annotation", g.Annotation, &s.Gateways.Annotation}} {
			if m.v == nil {
				continue
			}
			if *m.v != strings.TrimSpace(*m.v) {
				return nil, cfgErr("gatewaySelector."+m.key, *m.v, "leading or trailing spaces")
			}
			*m.dst = *m.v
		}
		for _, ns := range g.AllowedNamespaces {
			if !validNamespace(ns) {
				return nil, cfgErr("gatewaySelector.allowedNamespaces", ns, "not a Kubernetes namespace name")
			}
		}
		s.Gateways.AllowedNamespaces = slices.Clone(g.AllowedNamespaces)
	}
	// Present means delivered, even as null: libcni passes a nil map
	// (a pod without annotations) as null. Absent means the runtime
	// does not deliver annotations, or the capability is not declared.
	if raw, ok := conf.RuntimeConfig[PodAnnotationsCapability]; ok {
		if err := json.Unmarshal(raw, &s.Annotations); err != nil {
			return nil, types.NewError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("runtimeConfig[%q] is not a map of strings: %v", PodAnnotationsCapability, err), "")
		}
		if s.Annotations == nil {
			s.Annotations = map[string]string{}
		}
	}
	return s, nil
}

// captureKeys takes the registry's config keys out of raw, as options.
// Values are strings in Istio's syntax, numbers, or lists of them
// (flexString); boolean options take JSON booleans. null is absent.
func captureKeys(raw map[string]json.RawMessage) (rules.OptionText, error) {
	opts := rules.OptionText{}
	for _, o := range rules.CaptureOptions {
		v, ok := raw[o.ConfigKey]
		if o.ConfigKey == "" || !ok {
			continue
		}
		delete(raw, o.ConfigKey)
		if string(bytes.TrimSpace(v)) == "null" {
			continue
		}
		if o.Kind == rules.OptBool {
			var b bool
			if err := json.Unmarshal(v, &b); err != nil {
				return nil, types.NewError(types.ErrInvalidNetworkConfig,
					fmt.Sprintf("%s config: key %s: cannot use %s: want a boolean", PluginType, o.ConfigKey, bytes.TrimSpace(v)), "")
			}
			opts[o.Name] = strconv.FormatBool(b)
			continue
		}
		var f flexString
		if err := f.UnmarshalJSON(v); err != nil {
			what := string(bytes.TrimSpace(v))
			var ute *json.UnmarshalTypeError
			if errors.As(err, &ute) {
				what = ute.Value
			}
			return nil, types.NewError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("%s config: key %s: cannot use %s: want a string in Istio's syntax, a non-negative integer, or a list of them", PluginType, o.ConfigKey, what), "")
		}
		opts[o.Name] = string(f)
	}
	return opts, nil
}

// configFieldError turns an engine *FieldError into a code-7 *types.Error
// whose message uses our names (config key or annotation) and quotes the
// whole value as given as well as the offending item.
func configFieldError(pod, source string, names map[string]string, values rules.OptionText, err error) error {
	fe, ok := rules.AsFieldError(rules.Relabel(err, names))
	if !ok {
		return types.NewError(types.ErrInvalidNetworkConfig, prefixPod(pod, err.Error()), "")
	}
	ce := &ConfigError{Pod: pod, Source: source, Name: fe.Field, Value: fe.Value, Item: fe.Value, Reason: fe.Reason}
	// Find the original field to quote the full value.
	orig, _ := rules.AsFieldError(err)
	if v, ok := values[orig.Field]; ok {
		ce.Value = v
	}
	return &codedError{code: types.ErrInvalidNetworkConfig, err: ce}
}

func prefixPod(pod, msg string) string {
	if pod == "" {
		return msg
	}
	return "pod " + pod + ": " + msg
}

func reasonOf(err error) string {
	if fe, ok := rules.AsFieldError(err); ok {
		return fe.Reason
	}
	return err.Error()
}

// validNamespace: an RFC 1123 label, as Kubernetes requires of a
// namespace name.
func validNamespace(s string) bool {
	if s == "" || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
			return false
		}
	}
	return true
}
