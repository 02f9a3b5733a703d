package cni

import (
	"fmt"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Istio's annotations that we honour. Values use Istio's syntax. The
// ones that override a capture option are rows of the option registry
// (rules.CaptureOptions); the names are re-exported here.
const (
	AnnotationStatus = "sidecar.istio.io/status"
	AnnotationInject = "sidecar.istio.io/inject"

	AnnotationInterceptionMode        = rules.AnnotationInterceptionMode
	AnnotationIncludeOutboundIPRanges = rules.AnnotationIncludeOutboundIPRanges
	AnnotationExcludeOutboundIPRanges = rules.AnnotationExcludeOutboundIPRanges
	AnnotationIncludeInboundPorts     = rules.AnnotationIncludeInboundPorts
	AnnotationExcludeInboundPorts     = rules.AnnotationExcludeInboundPorts
	AnnotationIncludeOutboundPorts    = rules.AnnotationIncludeOutboundPorts
	AnnotationExcludeOutboundPorts    = rules.AnnotationExcludeOutboundPorts
	AnnotationExcludeInterfaces       = rules.AnnotationExcludeInterfaces
	// AnnotationKubevirtInterfaces (and its newer name,
	// istio.io/reroute-virtual-interfaces) asks for traffic from extra
	// interfaces to be captured. Until that is built, a non-empty value
	// is refused rather than start the pod with that traffic uncaptured.
	AnnotationKubevirtInterfaces = rules.AnnotationKubevirtInterfaces
)

// AnnotationFields maps each override annotation to the engine field it
// sets: the Annotations column of the option registry.
var AnnotationFields = func() map[string]string {
	m := map[string]string{}
	for _, o := range rules.CaptureOptions {
		for _, a := range o.Annotations {
			m[a] = o.Name
		}
	}
	return m
}()

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
	o := rules.OptionText{}
	var overrides []string
	relabel := map[string]string{}
	for k, v := range ConfigKeys {
		relabel[k] = v
	}
	for _, row := range rules.CaptureOptions {
		for _, a := range row.Annotations {
			v, ok := ann[a]
			if !ok {
				continue
			}
			relabel[row.Name] = a
			overrides = append(overrides, a)
			if a == AnnotationExcludeInboundPorts {
				// As istio-cni does: the proxy's own ports (status 15020,
				// health 15021, metrics 15090) stay excluded whatever the
				// annotation says, or readiness probes would hit the
				// inbound listener.
				v = appendList(v, portList(rules.DefaultInboundExcludePorts))
			}
			o[row.Name] = v
			break // the first annotation of the row that is present wins
		}
	}
	// values quotes the annotation as written in errors.
	values := rules.OptionText{}
	for _, row := range rules.CaptureOptions {
		for _, a := range row.Annotations {
			if v, ok := ann[a]; ok {
				values[row.Name] = v
				break
			}
		}
	}
	slices.Sort(overrides)
	cfg := s.Base
	if err := cfg.ApplyOptions(o); err != nil {
		return Decision{}, configFieldError(podName, "annotation", relabel, values, err)
	}
	if cfg.Mode == rules.ModeNone {
		return Decision{Reason: fmt.Sprintf("annotation %s=%q", AnnotationInterceptionMode, values[rules.FieldMode])}, nil
	}
	rs, err := rules.Build(cfg)
	if err != nil {
		// A cross-field error may involve a config key and an
		// annotation; name the field as the pod's author set it.
		src := "config key"
		if fe, ok := rules.AsFieldError(err); ok && hasKey(values, fe.Field) {
			src = "annotation"
		}
		return Decision{}, configFieldError(podName, src, relabel, values, err)
	}
	return Decision{Capture: true, Reason: "captured", Config: cfg, Ruleset: rs, Overrides: overrides}, nil
}

func hasKey(o rules.OptionText, k string) bool {
	_, ok := o[k]
	return ok
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
