package cni

import (
	"reflect"
	"strings"
	"testing"
)

func TestIsGateway(t *testing.T) {
	def := DefaultGatewaySelector
	allowed := def
	allowed.AllowedNamespaces = []string{"team-a"}
	for _, tc := range []struct {
		name string
		sel  GatewaySelector
		pod  Pod
		ann  map[string]string
		want bool
	}{
		{"istio default", def, Pod{Namespace: "istio-system", Name: "istio-egressgateway-7d9f-x2"}, nil, true},
		{"prefix in other namespace", def, Pod{Namespace: "team-a", Name: "istio-egressgateway-1"}, nil, false},
		{"namespace without prefix", def, Pod{Namespace: "istio-system", Name: "istiod-1"}, map[string]string{}, false},
		// Self-declared: the annotation alone grants nothing (issue 10).
		{"annotation without allowed namespaces", def, Pod{Namespace: "team-a", Name: "gw"}, map[string]string{"egress-cni.io/gateway": "true"}, false},
		{"annotation in a namespace not allowed", allowed, Pod{Namespace: "team-b", Name: "gw"}, map[string]string{"egress-cni.io/gateway": "true"}, false},
		{"annotation in an allowed namespace", allowed, Pod{Namespace: "team-a", Name: "gw"}, map[string]string{"egress-cni.io/gateway": "true"}, true},
		{"annotation TRUE", allowed, Pod{Namespace: "team-a", Name: "gw"}, map[string]string{"egress-cni.io/gateway": " TRUE"}, true},
		{"annotation false", allowed, Pod{Namespace: "team-a", Name: "gw"}, map[string]string{"egress-cni.io/gateway": "false"}, false},
		{"annotation yes is not true", allowed, Pod{Namespace: "team-a", Name: "gw"}, map[string]string{"egress-cni.io/gateway": "yes"}, false},
		{"name rule off", GatewaySelector{Annotation: "x/gw"}, Pod{Namespace: "istio-system", Name: "istio-egressgateway-1"}, nil, false},
		{"annotation rule off", GatewaySelector{Namespace: "gw", PodNamePrefix: "egress", AllowedNamespaces: []string{"a"}}, Pod{Namespace: "a", Name: "b"}, map[string]string{"egress-cni.io/gateway": "true"}, false},
		{"custom", GatewaySelector{Namespace: "gw", PodNamePrefix: "egress"}, Pod{Namespace: "gw", Name: "egress-0"}, nil, true},
	} {
		if why, _ := tc.sel.IsGateway(tc.pod, tc.ann); (why != "") != tc.want {
			t.Errorf("%s: IsGateway = %q, want gateway=%v", tc.name, why, tc.want)
		}
	}
}

func TestParseConfigGatewayKeys(t *testing.T) {
	s, err := ParseConfig(conf(""))
	if err != nil {
		t.Fatal(err)
	}
	if s.NodeEnforcement || !reflect.DeepEqual(s.Gateways, DefaultGatewaySelector) {
		t.Errorf("defaults: nodeEnforcement %v, selector %+v", s.NodeEnforcement, s.Gateways)
	}
	s, err = ParseConfig(conf(`"nodeEnforcement": true, "gatewaySelector": {"namespace": "egress", "annotation": "", "allowedNamespaces": ["gw-a"]}`))
	if err != nil {
		t.Fatal(err)
	}
	want := GatewaySelector{Namespace: "egress", PodNamePrefix: "istio-egressgateway", Annotation: "", AllowedNamespaces: []string{"gw-a"}}
	if !s.NodeEnforcement || !reflect.DeepEqual(s.Gateways, want) {
		t.Errorf("got nodeEnforcement %v, selector %+v; want true, %+v", s.NodeEnforcement, s.Gateways, want)
	}
	for _, bad := range []string{`"stateDir": "var/lib/egress-cni"`, `"stateDir": "/var/lib/../x"`, `"gatewaySelector": {"podNamePrefx": "a"}`, `"gatewaySelector": {"namespace": " a"}`, `"nodeEnforcement": "yes"`, `"gatewaySelector": {"allowedNamespaces": ["Team_A"]}`} {
		if _, err := ParseConfig(conf(bad)); err == nil || Code(err) != 7 {
			t.Errorf("%s: err %v (code %d), want code 7", bad, err, Code(err))
		} else if !strings.Contains(err.Error(), "odeEnforcement") && !strings.Contains(err.Error(), "stateDir") && !strings.Contains(err.Error(), "gatewaySelector") && !strings.Contains(err.Error(), "podNamePrefx") {
			t.Errorf("%s: error %q does not name the key", bad, err)
		}
	}
}
