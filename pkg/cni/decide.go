package cni

import (
	"fmt"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Istio's annotations that we honour. Values use Istio's syntax.
const (
	AnnotationStatus           = "sidecar.istio.io/status"
	AnnotationInject           = "sidecar.istio.io/inject"
	AnnotationInterceptionMode = "sidecar.istio.io/interceptionMode"

	trafficPrefix                     = "traffic.sidecar.istio.io/"
	AnnotationIncludeOutboundIPRanges = trafficPrefix + "includeOutboundIPRanges"
	AnnotationExcludeOutboundIPRanges = trafficPrefix + "excludeOutboundIPRanges"
	AnnotationIncludeInboundPorts     = trafficPrefix + "includeInboundPorts"
	AnnotationExcludeInboundPorts     = trafficPrefix + "excludeInboundPorts"
	AnnotationIncludeOutboundPorts    = trafficPrefix + "includeOutboundPorts"
	AnnotationExcludeOutboundPorts    = trafficPrefix + "excludeOutboundPorts"
	AnnotationExcludeInterfaces       = trafficPrefix + "excludeInterfaces"
	// AnnotationKubevirtInterfaces asks for traffic from extra interfaces
	// to be captured. We do not support it, and refuse the pod rather than
	// start it with that traffic uncaptured.
	AnnotationKubevirtInterfaces = trafficPrefix + "kubevirtInterfaces"
)

// AnnotationFields maps each override annotation to the engine field it
// sets. It doubles as the relabel map for errors.
var AnnotationFields = map[string]string{
	AnnotationInterceptionMode:        rules.FieldMode,
	AnnotationIncludeOutboundIPRanges: rules.FieldOutboundIncludeCIDRs,
	AnnotationExcludeOutboundIPRanges: rules.FieldOutboundExcludeCIDRs,
	AnnotationIncludeInboundPorts:     rules.FieldInboundIncludePorts,
	AnnotationExcludeInboundPorts:     rules.FieldInboundExcludePorts,
	AnnotationIncludeOutboundPorts:    rules.FieldOutboundIncludePorts,
	AnnotationExcludeOutboundPorts:    rules.FieldOutboundExcludePorts,
	AnnotationExcludeInterfaces:       rules.FieldExcludeInterfaces,
}

// Pod is the pod's identity, from CNI_ARGS.
type Pod struct {
	Namespace, Name, InfraContainerID, UID string
}

// String is "namespace/name", or "" when the runtime is not Kubernetes.
func (p Pod) String() string {
	if p.Namespace == "" && p.Name == "" {
		return ""
	}
	return p.Namespace + "/" + p.Name
}

// ParseArgs reads the pod identity from CNI_ARGS
// ("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=n;…", any order).
// Unknown keys are ignored whatever IgnoreUnknown says: runtimes add keys
// over time, and none of them changes what we program.
func ParseArgs(s string) Pod {
	var p Pod
	for _, kv := range strings.Split(s, ";") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "K8S_POD_NAMESPACE":
			p.Namespace = v
		case "K8S_POD_NAME":
			p.Name = v
		case "K8S_POD_INFRA_CONTAINER_ID":
			p.InfraContainerID = v
		case "K8S_POD_UID":
			p.UID = v
		}
	}
	return p
}

// Decision is what ADD and CHECK do for one pod.
type Decision struct {
	// Capture says whether the pod gets rules.
	Capture bool
	// Reason says why, for logs: "captured", or why the pod is skipped.
	Reason string
	// Config and Ruleset are set when Capture is true.
	Config  rules.Config
	Ruleset *rules.Ruleset
	// Overrides lists the annotations that changed the config.
	Overrides []string
}

// Decide is pure: from the settings, the pod and its annotations it
// decides whether to capture and builds the ruleset. Every error is a
// code-7 error whose message names the pod, the annotation or config key,
// and the value. Nothing is touched before Decide has succeeded, so a bad
// annotation leaves the namespace as the primary plugin made it.
func Decide(s *Settings, pod Pod, ann map[string]string) (Decision, error) {
	podName := pod.String()
	for _, ns := range s.ExcludeNamespaces {
		if pod.Namespace == ns {
			return Decision{Reason: fmt.Sprintf("namespace %s is in excludeNamespaces", ns)}, nil
		}
	}
	if v, ok := ann[AnnotationInject]; ok && isFalse(v) {
		return Decision{Reason: fmt.Sprintf("annotation %s=%q", AnnotationInject, v)}, nil
	}
	if s.Capture == CaptureAnnotated {
		if ann == nil {
			if pod.Namespace == "" {
				return Decision{Reason: "not a Kubernetes pod (no K8S_POD_NAMESPACE in CNI_ARGS) and no annotations"}, nil
			}
			// Fail closed: without annotations we cannot tell an
			// injected pod from another, and must not start an
			// injected one uncaptured.
			return Decision{}, withCode(types.ErrInvalidNetworkConfig, fmt.Errorf(
				"pod %s: the runtime delivered no pod annotations, so egress-cni cannot tell whether the pod must be captured, "+
					"and refuses to start it uncaptured: declare \"capabilities\": {%q: true} in the egress-cni conflist entry "+
					"and run containerd >= 1.5 or CRI-O >= 1.29, or set \"capture\": \"all\"", podName, PodAnnotationsCapability), "")
		}
		if _, ok := ann[s.CaptureAnnotation]; !ok {
			return Decision{Reason: fmt.Sprintf("no %s annotation", s.CaptureAnnotation)}, nil
		}
	}
	if s.Base.Mode == rules.ModeNone {
		if _, ok := ann[AnnotationInterceptionMode]; !ok {
			return Decision{Reason: "config interceptionMode is NONE"}, nil
		}
	}
	if v, ok := ann[AnnotationKubevirtInterfaces]; ok && strings.TrimSpace(v) != "" {
		return Decision{}, withCode(types.ErrInvalidNetworkConfig, &ConfigError{
			Pod: podName, Source: "annotation", Name: AnnotationKubevirtInterfaces, Value: v, Item: v,
			Reason: "is not supported by egress-cni; the pod is refused rather than started with that traffic uncaptured",
		}, "")
	}

	var o rules.Options
	values := map[string]*string{}
	var overrides []string
	relabel := map[string]string{}
	for k, v := range ConfigKeys {
		relabel[k] = v
	}
	for a, field := range AnnotationFields {
		v, ok := ann[a]
		if !ok {
			continue
		}
		val := v
		values[field] = &val
		relabel[field] = a
		overrides = append(overrides, a)
		set := v
		if a == AnnotationExcludeInboundPorts {
			// As istio-cni does: the proxy's own ports (status 15020,
			// health 15021, metrics 15090) stay excluded whatever the
			// annotation says, or readiness probes would hit the
			// inbound listener.
			set = appendList(v, portList(rules.DefaultInboundExcludePorts))
		}
		setOption(&o, field, &set)
	}
	slices.Sort(overrides)
	cfg := s.Base
	if err := cfg.ApplyOptions(o); err != nil {
		return Decision{}, configFieldError(podName, "annotation", relabel, values, err)
	}
	if cfg.Mode == rules.ModeNone {
		return Decision{Reason: fmt.Sprintf("annotation %s=%q", AnnotationInterceptionMode, *values[rules.FieldMode])}, nil
	}
	rs, err := rules.Build(cfg)
	if err != nil {
		// A cross-field error may involve a config key and an
		// annotation; name the field as the pod's author set it.
		src := "config key"
		if fe, ok := rules.AsFieldError(err); ok && values[fe.Field] != nil {
			src = "annotation"
		}
		return Decision{}, configFieldError(podName, src, relabel, values, err)
	}
	return Decision{Capture: true, Reason: "captured", Config: cfg, Ruleset: rs, Overrides: overrides}, nil
}

func setOption(o *rules.Options, field string, v *string) {
	switch field {
	case rules.FieldMode:
		o.Mode = v
	case rules.FieldOutboundIncludeCIDRs:
		o.OutboundIncludeCIDRs = v
	case rules.FieldOutboundExcludeCIDRs:
		o.OutboundExcludeCIDRs = v
	case rules.FieldInboundIncludePorts:
		o.InboundIncludePorts = v
	case rules.FieldInboundExcludePorts:
		o.InboundExcludePorts = v
	case rules.FieldOutboundIncludePorts:
		o.OutboundIncludePorts = v
	case rules.FieldOutboundExcludePorts:
		o.OutboundExcludePorts = v
	case rules.FieldExcludeInterfaces:
		o.ExcludeInterfaces = v
	}
}

// isFalse accepts the spellings Kubernetes users write for "no".
func isFalse(v string) bool {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "false", "no", "n", "off", "0":
		return true
	}
	return false
}

func appendList(list, more string) string {
	if strings.TrimSpace(list) == "" {
		return more
	}
	return strings.TrimRight(strings.TrimSpace(list), ",") + "," + more
}

func portList(ps []rules.PortRange) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
