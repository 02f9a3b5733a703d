package cni

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// GatewaySelector says which pods are egress gateways, whose traffic the
// node layer lets out of the cluster (on egress nodes only). A pod is a
// gateway if its namespace is Namespace and its name starts with
// PodNamePrefix: a protected namespace plus a name, which whoever can
// create pods elsewhere cannot grant themselves. The annotation rule
// (Annotation with the value "true") is honoured only for pods in
// AllowedNamespaces, and trusts whoever can create pods there; with no
// AllowedNamespaces it is off. An empty Namespace or PodNamePrefix turns
// the name rule off.
type GatewaySelector struct {
	Namespace         string
	PodNamePrefix     string
	Annotation        string
	AllowedNamespaces []string
}

// DefaultGatewaySelector matches Istio's default egress gateway
// deployment (istio-system/istio-egressgateway-…). The annotation
// egress-cni.io/gateway is honoured only in namespaces listed in
// gatewaySelector.allowedNamespaces, none by default.
var DefaultGatewaySelector = GatewaySelector{
	Namespace:     "istio-system",
	PodNamePrefix: "istio-egressgateway",
	Annotation:    "egress-cni.io/gateway",
}

// IsGateway applies the selector to a pod and its annotations (nil when
// the runtime delivered none: only the name rule applies then). It
// returns why the pod is a gateway, for logs, or "", and whether the pod
// asked to be one by annotation and was refused (for a warning).
func (g GatewaySelector) IsGateway(pod Pod, ann map[string]string) (why string, refused bool) {
	if g.Namespace != "" && g.PodNamePrefix != "" && pod.Namespace == g.Namespace && strings.HasPrefix(pod.Name, g.PodNamePrefix) {
		return fmt.Sprintf("namespace %s, name prefix %s", g.Namespace, g.PodNamePrefix), false
	}
	if g.Annotation != "" && strings.TrimSpace(strings.ToLower(ann[g.Annotation])) == "true" {
		if slices.Contains(g.AllowedNamespaces, pod.Namespace) {
			return fmt.Sprintf("annotation %s=%q in allowed namespace %s", g.Annotation, ann[g.Annotation], pod.Namespace), false
		}
		return "", true
	}
	return "", false
}

// resultIPs returns every address of prevResult, unmapped, in order.
func resultIPs(prev types.Result) ([]netip.Addr, error) {
	if prev == nil {
		return nil, nil
	}
	res, err := current.NewResultFromResult(prev)
	if err != nil {
		return nil, fmt.Errorf("could not read prevResult: %w", err)
	}
	var out []netip.Addr
	for _, ip := range res.IPs {
		a, ok := netip.AddrFromSlice(ip.Address.IP)
		if !ok {
			continue
		}
		out = append(out, a.Unmap())
	}
	return out, nil
}

// hostInterfaces returns the names of prevResult's interfaces that are
// not in a sandbox: the host side of the pod's link (and, for bridge,
// the bridge itself).
func hostInterfaces(prev types.Result) []string {
	res, err := current.NewResultFromResult(prev)
	if err != nil {
		return nil
	}
	var out []string
	for _, i := range res.Interfaces {
		if i != nil && i.Sandbox == "" && i.Name != "" {
			out = append(out, i.Name)
		}
	}
	return out
}

// hasIPv6 says whether prevResult gives the pod an IPv6 address (false
// when it cannot be read: the callers that need the addresses report
// that).
func hasIPv6(prev types.Result) bool {
	ips, err := resultIPs(prev)
	if err != nil {
		return false
	}
	return slices.ContainsFunc(ips, func(a netip.Addr) bool { return a.Is6() })
}
