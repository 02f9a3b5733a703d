package cni

import (
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// FuzzPluginConfig: the conflist entry, including prevResult in every CNI
// version, never panics the parser; errors carry code 6 (not JSON) or 7
// (bad value), and an accepted config decides without panicking.
func FuzzPluginConfig(f *testing.F) {
	prev := map[string]string{
		"0.4.0": `{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"version":"4","address":"198.51.100.5/24","interface":0}]}`,
		"1.0.0": `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"198.51.100.5/24","interface":0}]}`,
		"1.1.0": `{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"2001:db8::5/64","interface":0}]}`,
	}
	for v, p := range prev {
		f.Add([]byte(`{"cniVersion":"` + v + `","name":"k8s","type":"egress-cni","prevResult":` + p + `}`))
		f.Add([]byte(`{"cniVersion":"` + v + `","name":"k8s","type":"egress-cni","excludeOutboundIPRanges":"10.0.0.0/33","prevResult":` + p + `}`))
	}
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"k8s","type":"egress-cni","proxyPort":70000}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"k8s","type":"egress-cni","proxyUID":[1337,"1338"],"backend":"nftables","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"sidecar.istio.io/status":"{}"}}}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"k8s","type":"egress-cni","prevResult":{"cniVersion":"1.1.0","ips":[{"address":"nope"}]}}`))
	f.Add([]byte(`{`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := ParseConfig(data)
		if err != nil {
			if c := Code(err); c != types.ErrDecodingFailure && c != types.ErrInvalidNetworkConfig && c != types.ErrIncompatibleCNIVersion {
				t.Fatalf("config error with code %d: %v", c, err)
			}
			return
		}
		pod := Pod{Namespace: "default", Name: "app"}
		if _, err := Decide(s, pod, s.Annotations); err != nil {
			if c := Code(err); c != types.ErrInvalidNetworkConfig {
				t.Fatalf("decision error with code %d: %v", c, err)
			}
		}
	})
}

// FuzzAnnotations: the annotation map as a whole ("key=value" lines).
// Never panic; a rejection is code 7 and names the pod and one of the
// annotations given; a capture has a valid ruleset.
func FuzzAnnotations(f *testing.F) {
	f.Add("sidecar.istio.io/status={}\ntraffic.sidecar.istio.io/excludeOutboundIPRanges=10.0.0.0/8")
	f.Add("sidecar.istio.io/status={}\ntraffic.sidecar.istio.io/includeInboundPorts=8080,,9090")
	f.Add("sidecar.istio.io/status={}\nsidecar.istio.io/interceptionMode=NONE")
	f.Add("sidecar.istio.io/status={}\nsidecar.istio.io/interceptionMode=TPROXY")
	f.Add("sidecar.istio.io/status={}\ntraffic.sidecar.istio.io/excludeOutboundPorts=70000")
	f.Add("sidecar.istio.io/inject=false\ntraffic.sidecar.istio.io/excludeOutboundPorts=x")
	f.Add("sidecar.istio.io/status={}\ntraffic.sidecar.istio.io/kubevirtInterfaces=net1")
	f.Add("sidecar.istio.io/status={}\ntraffic.sidecar.istio.io/includeOutboundIPRanges=10.1.0.0/16\ntraffic.sidecar.istio.io/excludeOutboundIPRanges=10.0.0.0/8")
	s, err := ParseConfig([]byte(`{"cniVersion":"1.0.0","name":"k8s","type":"egress-cni"}`))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, lines string) {
		ann := map[string]string{}
		for _, l := range strings.Split(lines, "\n") {
			k, v, _ := strings.Cut(l, "=")
			ann[k] = v
		}
		pod := Pod{Namespace: "default", Name: "app-7d4"}
		d, err := Decide(s, pod, ann)
		if err != nil {
			if Code(err) != types.ErrInvalidNetworkConfig {
				t.Fatalf("code %d: %v", Code(err), err)
			}
			msg := err.Error()
			if !strings.Contains(msg, "default/app-7d4") {
				t.Fatalf("error does not name the pod: %v", err)
			}
			named := false
			for k := range ann {
				if k != "" && strings.Contains(msg, k) {
					named = true
				}
			}
			if !named {
				t.Fatalf("error names none of the annotations given: %v", err)
			}
			return
		}
		if d.Capture {
			if d.Ruleset == nil {
				t.Fatal("capture without a ruleset")
			}
			if err := d.Ruleset.Validate(); err != nil {
				t.Fatalf("invalid ruleset: %v", err)
			}
		}
	})
}
