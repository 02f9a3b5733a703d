package cni

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/google/go-cmp/cmp"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

func mustSettings(t *testing.T, extra string) *Settings {
	t.Helper()
	s, err := ParseConfig(conf(extra))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var webPod = Pod{Namespace: "team-a", Name: "web-0"}

func injected(kv ...string) map[string]string {
	m := map[string]string{AnnotationStatus: `{"containers":["istio-proxy"]}`}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

func TestDecideSkips(t *testing.T) {
	for _, tc := range []struct {
		name   string
		extra  string
		pod    Pod
		ann    map[string]string
		reason string
	}{
		{"kube-system", "", Pod{Namespace: "kube-system", Name: "coredns"}, injected(), "excludeNamespaces"},
		{"custom excluded namespace", `"excludeNamespaces": ["istio-system"]`, Pod{Namespace: "istio-system", Name: "x"}, injected(), "excludeNamespaces"},
		{"no annotations, not kubernetes", "", Pod{}, nil, "not a Kubernetes pod"},
		{"annotations delivered as null", "", webPod, map[string]string{}, "no sidecar.istio.io/status annotation"},
		{"no status annotation", "", webPod, map[string]string{"foo": "bar"}, "no sidecar.istio.io/status annotation"},
		{"inject false", "", webPod, injected(AnnotationInject, "false"), `sidecar.istio.io/inject="false"`},
		{"inject false with capture all", `"capture": "all"`, webPod, map[string]string{AnnotationInject: "false"}, "inject"},
		{"mode NONE annotation", "", webPod, injected(AnnotationInterceptionMode, "NONE"), "interceptionMode"},
		{"mode none lowercase", "", webPod, injected(AnnotationInterceptionMode, "none"), "interceptionMode"},
		{"mode NONE config", `"interceptionMode": "NONE"`, webPod, injected(), "config interceptionMode is NONE"},
		{"custom capture annotation", `"captureAnnotation": "example.com/mesh"`, webPod, injected(), "no example.com/mesh annotation"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := Decide(mustSettings(t, tc.extra), tc.pod, tc.ann)
			if err != nil {
				t.Fatal(err)
			}
			if d.Capture || d.Ruleset != nil {
				t.Fatalf("pod captured: %+v", d)
			}
			if !strings.Contains(d.Reason, tc.reason) {
				t.Errorf("reason %q does not contain %q", d.Reason, tc.reason)
			}
		})
	}
}

func TestDecideCaptures(t *testing.T) {
	// excludeNamespaces [] captures even kube-system; capture all needs no annotation.
	for _, tc := range []struct {
		name, extra string
		pod         Pod
		ann         map[string]string
	}{
		{"injected", "", webPod, injected()},
		{"capture all", `"capture": "all"`, webPod, nil},
		{"no excluded namespaces", `"excludeNamespaces": []`, Pod{Namespace: "kube-system", Name: "x"}, injected()},
		{"config NONE overridden by pod", `"interceptionMode": "NONE"`, webPod, injected(AnnotationInterceptionMode, "REDIRECT")},
		{"no k8s identity", "", Pod{}, injected()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := Decide(mustSettings(t, tc.extra), tc.pod, tc.ann)
			if err != nil {
				t.Fatal(err)
			}
			if !d.Capture || d.Ruleset == nil || d.Reason != "captured" {
				t.Fatalf("not captured: %+v", d)
			}
		})
	}
}

func TestDecideAnnotationOverrides(t *testing.T) {
	s := mustSettings(t, `"excludeOutboundIPRanges": "192.0.2.0/24", "excludeOutboundPorts": "3306"`)
	d, err := Decide(s, webPod, injected(
		AnnotationExcludeOutboundIPRanges, "203.0.113.10/32, 2001:db8::/32",
		AnnotationIncludeOutboundPorts, "8443",
		AnnotationExcludeInboundPorts, "9000",
		AnnotationExcludeInterfaces, "eth1",
		AnnotationInterceptionMode, "REDIRECT",
		"unrelated.example.com/x", "y",
	))
	if err != nil {
		t.Fatal(err)
	}
	want := rules.DefaultConfig()
	// The annotation replaces the config's list.
	want.OutboundExcludeCIDRs = []netip.Prefix{netip.MustParsePrefix("203.0.113.10/32"), netip.MustParsePrefix("2001:db8::/32")}
	// Not overridden by any annotation: the config's value stays.
	want.OutboundExcludePorts = ports(3306)
	want.OutboundIncludePorts = ports(8443)
	// The proxy's own ports stay excluded, as istio-cni does.
	// In the order written (the annotation, then the proxy's ports), as
	// istio-iptables keeps it.
	want.InboundExcludePorts = ports(9000, 15090, 15021, 15020)
	want.ExcludeInterfaces = []string{"eth1"}
	if diff := cmp.Diff(want, d.Config, prefixCmp); diff != "" {
		t.Errorf("config (-want +got):\n%s", diff)
	}
	wantOv := []string{AnnotationInterceptionMode, AnnotationExcludeInboundPorts, AnnotationExcludeInterfaces,
		AnnotationExcludeOutboundIPRanges, AnnotationIncludeOutboundPorts}
	if diff := cmp.Diff(wantOv, d.Overrides); diff != "" {
		t.Errorf("overrides (-want +got):\n%s", diff)
	}
	if d.Ruleset.Set(rules.SetOutExcludeV4) == nil || d.Ruleset.Set(rules.SetOutIncludePort) == nil {
		t.Errorf("ruleset lacks the annotation's sets: %+v", d.Ruleset.Sets)
	}
	// An empty annotation value is an empty list: nothing excluded.
	d, err = Decide(s, webPod, injected(AnnotationExcludeOutboundIPRanges, ""))
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Config.OutboundExcludeCIDRs) != 0 {
		t.Errorf("empty annotation kept %v", d.Config.OutboundExcludeCIDRs)
	}
}

func TestDecideAnnotationErrors(t *testing.T) {
	for _, tc := range []struct {
		name     string
		extra    string
		ann      map[string]string
		source   string
		field    string
		value    string
		contains string
	}{
		{"bad cidr", "", injected(AnnotationExcludeOutboundIPRanges, "10.0.0.0/8,10.0.0.300/32"),
			"annotation", AnnotationExcludeOutboundIPRanges, "10.0.0.0/8,10.0.0.300/32", `(item "10.0.0.300/32")`},
		{"bad port", "", injected(AnnotationIncludeInboundPorts, "80,http"),
			"annotation", AnnotationIncludeInboundPorts, "80,http", "not a port number"},
		{"bad mode", "", injected(AnnotationInterceptionMode, "MAGIC"),
			"annotation", AnnotationInterceptionMode, "MAGIC", "REDIRECT"},
		{"bad interface", "", injected(AnnotationExcludeInterfaces, "eth0,this-name-is-far-too-long"),
			"annotation", AnnotationExcludeInterfaces, "eth0,this-name-is-far-too-long", "15 bytes"},
		{"empty item", "", injected(AnnotationExcludeOutboundPorts, "80,,443"),
			"annotation", AnnotationExcludeOutboundPorts, "80,,443", "empty"},
		// Cross-field: the annotation's include is covered by the
		// config's exclude; the error names the annotation.
		{"cross field", `"excludeOutboundIPRanges": "10.0.0.0/8"`, injected(AnnotationIncludeOutboundIPRanges, "10.1.0.0/16"),
			"annotation", AnnotationIncludeOutboundIPRanges, "10.1.0.0/16", "entirely covered"},
		{"port conflict", "", injected(AnnotationIncludeOutboundPorts, "443", AnnotationExcludeOutboundPorts, "443"),
			"annotation", AnnotationIncludeOutboundPorts, "443", "both included and excluded"},
		// -k is built now (was refused as not supported): only a bad
		// value is an error.
		{"kubevirt", "", injected(AnnotationKubevirtInterfaces, "net1,bad/x"),
			"annotation", AnnotationKubevirtInterfaces, "net1,bad/x", "not a valid interface name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decide(mustSettings(t, tc.extra), webPod, tc.ann)
			if err == nil {
				t.Fatal("no error")
			}
			if Code(err) != types.ErrInvalidNetworkConfig {
				t.Errorf("code = %d, want 7", Code(err))
			}
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("%v is not a *ConfigError", err)
			}
			if ce.Pod != "team-a/web-0" || ce.Source != tc.source || ce.Name != tc.field || ce.Value != tc.value {
				t.Errorf("ConfigError = %+v, want pod team-a/web-0 %s %s=%q", ce, tc.source, tc.field, tc.value)
			}
			msg := err.Error()
			for _, s := range []string{"pod team-a/web-0", tc.field, tc.value, tc.contains} {
				if !strings.Contains(msg, s) {
					t.Errorf("message %q does not contain %q", msg, s)
				}
			}
		})
	}
}

// A Kubernetes pod whose annotations did not arrive is refused, not
// started uncaptured, unless the config captures every pod.
func TestDecideNoAnnotationsFailsClosed(t *testing.T) {
	_, err := Decide(mustSettings(t, ""), webPod, nil)
	if Code(err) != types.ErrInvalidNetworkConfig || !strings.Contains(err.Error(), "team-a/web-0") ||
		!strings.Contains(err.Error(), PodAnnotationsCapability) {
		t.Errorf("err = %v (code %d)", err, Code(err))
	}
	// Excluded namespaces are decided first: node agents still start.
	d, err := Decide(mustSettings(t, ""), Pod{Namespace: "kube-system", Name: "x"}, nil)
	if err != nil || d.Capture {
		t.Errorf("kube-system pod: %+v, %v", d, err)
	}
	d, err = Decide(mustSettings(t, `"capture": "all"`), webPod, nil)
	if err != nil || !d.Capture {
		t.Errorf("capture all: %+v, %v", d, err)
	}
}

func TestParseConfigNullAnnotationsAreDelivered(t *testing.T) {
	s := mustSettings(t, `"runtimeConfig": {"io.kubernetes.cri.pod-annotations": null}`)
	if s.Annotations == nil || len(s.Annotations) != 0 {
		t.Errorf("annotations = %#v, want an empty map", s.Annotations)
	}
}

func TestAnnotationFieldsRelabelEveryEngineField(t *testing.T) {
	for a, f := range AnnotationFields {
		if _, ok := ConfigKeys[f]; !ok {
			t.Errorf("annotation %s maps to %s, which has no config key", a, f)
		}
		// The config key is the annotation's suffix (istio.io/reroute-
		// virtual-interfaces is the newer name of kubevirtInterfaces).
		if k := ConfigKeys[f]; a != rules.AnnotationRerouteVirtualInterfaces && !strings.HasSuffix(a, "/"+k) {
			t.Errorf("annotation %s and config key %s differ", a, k)
		}
	}
}

// The kubevirt annotations reroute a VM interface's traffic (-k); the
// newer name wins over the older one, as in Istio's injector.
func TestDecideRerouteVirtualInterfaces(t *testing.T) {
	s := mustSettings(t, "")
	d, err := Decide(s, webPod, injected(AnnotationKubevirtInterfaces, "net1", rules.AnnotationRerouteVirtualInterfaces, "net2"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(d.Config.RerouteVirtualInterfaces, []string{"net2"}) {
		t.Fatalf("reroute interfaces %v, want [net2]", d.Config.RerouteVirtualInterfaces)
	}
	var found bool
	for _, r := range d.Ruleset.Chain(rules.BasePrerouting).Rules {
		if r.IIF == "net2" && r.Verdict.Kind == rules.VerdictJump && r.Verdict.Chain == rules.ChainRedirect {
			found = true
		}
	}
	if !found {
		t.Errorf("no prerouting rule sends net2 to %s: %+v", rules.ChainRedirect, d.Ruleset.Chain(rules.BasePrerouting).Rules)
	}
}

// TPROXY is built now (the plugin refused it before it wrote the policy
// route): from the config key or the pod's annotation, the decision
// carries Istio's mangle rules and the route (mark 1337, table 133).
func TestDecideTPROXY(t *testing.T) {
	for _, tc := range []struct {
		name, extra string
		ann         map[string]string
	}{
		{"config key", `"interceptionMode": "TPROXY"`, injected()},
		{"annotation", "", injected(AnnotationInterceptionMode, "TPROXY")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dec, err := Decide(mustSettings(t, tc.extra), webPod, tc.ann)
			if err != nil {
				t.Fatal(err)
			}
			if !dec.Capture || dec.Ruleset == nil || dec.Ruleset.TProxyRoute == nil {
				t.Fatalf("decision %+v: want a capture with a TPROXY route", dec)
			}
			if r := dec.Ruleset.TProxyRoute; r.Mark != 1337 || r.Table != 133 {
				t.Errorf("route mark %d table %d, want 1337 and 133", r.Mark, r.Table)
			}
		})
	}
}
