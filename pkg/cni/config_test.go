package cni

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/google/go-cmp/cmp"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

const prevResult100 = `"prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
 "ips": [{"address": "198.51.100.5/24", "gateway": "198.51.100.1", "interface": 0}]}`

func conf(extra string) []byte {
	s := `{"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "egress-cni"`
	if extra != "" {
		s += ", " + extra
	}
	return []byte(s + "}")
}

func TestParseConfigEmptyIsIstioDefaults(t *testing.T) {
	s, err := ParseConfig(conf(""))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(rules.DefaultConfig(), s.Base, prefixCmp); diff != "" {
		t.Errorf("base config (-want +got):\n%s", diff)
	}
	if s.Backend != rules.BackendAuto {
		t.Errorf("backend = %q, want auto", s.Backend)
	}
	if diff := cmp.Diff([]string{"kube-system"}, s.ExcludeNamespaces); diff != "" {
		t.Errorf("excludeNamespaces (-want +got):\n%s", diff)
	}
	if s.Capture != CaptureAnnotated || s.CaptureAnnotation != AnnotationStatus {
		t.Errorf("capture = %q/%q", s.Capture, s.CaptureAnnotation)
	}
	if s.LogFile != DefaultLogFile || s.LogLevel != "info" {
		t.Errorf("log = %q/%q", s.LogFile, s.LogLevel)
	}
	if s.Annotations != nil || s.Conf.PrevResult != nil {
		t.Errorf("annotations %v, prevResult %v: want nil", s.Annotations, s.Conf.PrevResult)
	}
}

func TestParseConfigAllKeys(t *testing.T) {
	s, err := ParseConfig(conf(`"proxyPort": 16001, "inboundPort": "16006", "inboundTunnelPort": 16008,
		"proxyUID": "1337,1338", "proxyGID": [1339], "interceptionMode": "REDIRECT",
		"includeOutboundIPRanges": ["10.0.0.0/8", "192.0.2.0/24"], "excludeOutboundIPRanges": "10.1.0.0/16",
		"includeInboundPorts": "*", "excludeInboundPorts": "15090,15021,15020,9000",
		"includeOutboundPorts": "25", "excludeOutboundPorts": [3306, "5432"],
		"excludeInterfaces": "eth1", "redirectDNS": true, "dnsPort": 15054, "families": "ipv4",
		"backend": "iptables-nft", "excludeNamespaces": ["kube-system", "istio-system"],
		"capture": "all", "captureAnnotation": "example.com/mesh", "logFile": "stderr", "logLevel": "debug",
		"capabilities": {"io.kubernetes.cri.pod-annotations": true},
		"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"a": "b"}, "portMappings": []},
		"args": {"cni": {"x": 1}}, ` + prevResult100))
	if err != nil {
		t.Fatal(err)
	}
	want := rules.DefaultConfig()
	want.ProxyPort, want.InboundPort, want.InboundTunnelPort = 16001, 16006, 16008
	want.ProxyUIDs, want.ProxyGIDs = []uint32{1337, 1338}, []uint32{1339}
	want.OutboundIncludeAll = false
	want.OutboundIncludeCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.0.2.0/24")}
	want.OutboundExcludeCIDRs = []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}
	// The order as written: istio-iptables keeps it (one rule per port).
	want.InboundExcludePorts = ports(15090, 15021, 15020, 9000)
	want.OutboundIncludePorts = ports(25)
	want.OutboundExcludePorts = ports(3306, 5432)
	want.ExcludeInterfaces = []string{"eth1"}
	want.RedirectDNS, want.DNSPort, want.Families = true, 15054, rules.IPv4Only
	if diff := cmp.Diff(want, s.Base, prefixCmp); diff != "" {
		t.Errorf("base config (-want +got):\n%s", diff)
	}
	if s.Backend != rules.BackendIPTablesNFT || s.Capture != CaptureAll || s.CaptureAnnotation != "example.com/mesh" ||
		s.LogFile != "stderr" || s.LogLevel != "debug" {
		t.Errorf("settings = %+v", s)
	}
	if diff := cmp.Diff(map[string]string{"a": "b"}, s.Annotations); diff != "" {
		t.Errorf("annotations (-want +got):\n%s", diff)
	}
	if s.Conf.PrevResult == nil {
		t.Error("prevResult not parsed")
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name     string
		extra    string
		code     uint
		key      string // ConfigError.Name, if any
		contains string
	}{
		{"unknown key", `"proxyPorts": 1`, types.ErrInvalidNetworkConfig, "", `unknown field "proxyPorts"`},
		{"bad port", `"proxyPort": 70000`, types.ErrInvalidNetworkConfig, "proxyPort", `proxyPort="70000"`},
		{"zero port", `"inboundPort": "0"`, types.ErrInvalidNetworkConfig, "inboundPort", "between 1 and 65535"},
		{"bad cidr item", `"excludeOutboundIPRanges": "10.0.0.0/8,300.1.1.1"`, types.ErrInvalidNetworkConfig,
			"excludeOutboundIPRanges", `excludeOutboundIPRanges="10.0.0.0/8,300.1.1.1" (item "300.1.1.1")`},
		{"cross field", `"includeOutboundIPRanges": "10.1.0.0/16", "excludeOutboundIPRanges": "10.0.0.0/8"`,
			types.ErrInvalidNetworkConfig, "includeOutboundIPRanges", "entirely covered"},
		{"bad mode", `"interceptionMode": "FOO"`, types.ErrInvalidNetworkConfig, "interceptionMode", "REDIRECT"},
		{"bad backend", `"backend": "ebpf"`, types.ErrInvalidNetworkConfig, "backend", "must be one of"},
		{"bad capture", `"capture": "some"`, types.ErrInvalidNetworkConfig, "capture", "annotated"},
		{"bad level", `"logLevel": "loud"`, types.ErrInvalidNetworkConfig, "logLevel", "debug"},
		{"bad families", `"families": "ipv5"`, types.ErrInvalidNetworkConfig, "families", "ipv4"},
		{"wrong type", `"redirectDNS": "yes"`, types.ErrInvalidNetworkConfig, "", "redirectDNS"},
		{"negative number", `"proxyPort": -1`, types.ErrInvalidNetworkConfig, "", "proxyPort"},
		{"bad annotations", `"runtimeConfig": {"io.kubernetes.cri.pod-annotations": ["x"]}`, types.ErrInvalidNetworkConfig, "", "not a map"},
		{"malformed", `"proxyPort": `, types.ErrDecodingFailure, "", "could not parse"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig(conf(tc.extra))
			if err == nil {
				t.Fatal("no error")
			}
			if got := Code(err); got != tc.code {
				t.Errorf("code = %d, want %d (%v)", got, tc.code, err)
			}
			if !strings.Contains(err.Error(), tc.contains) {
				t.Errorf("error %q does not contain %q", err, tc.contains)
			}
			var ce *ConfigError
			if tc.key != "" {
				if !errors.As(err, &ce) {
					t.Fatalf("error %v is not a *ConfigError", err)
				}
				if ce.Name != tc.key || ce.Source != "config key" {
					t.Errorf("ConfigError names %s %q, want config key %q", ce.Source, ce.Name, tc.key)
				}
			}
			// What skel prints.
			if te, ok := errors.AsType[*types.Error](toCNIError(err)); !ok || te.Code != tc.code || te.Msg == "" {
				t.Errorf("toCNIError = %#v", toCNIError(err))
			}
		})
	}
}

func TestFlexString(t *testing.T) {
	for in, want := range map[string]string{
		`"a,b"`: "a,b", `15001`: "15001", `["x", 2]`: "x,2", `[]`: "",
	} {
		var f flexString
		if err := f.UnmarshalJSON([]byte(in)); err != nil || string(f) != want {
			t.Errorf("%s: got %q, %v; want %q", in, f, err, want)
		}
	}
	for _, in := range []string{`1.5`, `true`, `{}`, `["a,b"]`, `[["a"]]`} {
		var f flexString
		if err := f.UnmarshalJSON([]byte(in)); err == nil {
			t.Errorf("%s: no error, got %q", in, f)
		}
	}
}

func TestParseArgs(t *testing.T) {
	for _, in := range []string{
		"IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u1",
		"K8S_POD_UID=u1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=team-a;Extra=x",
	} {
		got := ParseArgs(in)
		want := Pod{Namespace: "team-a", Name: "web-0", InfraContainerID: "abc", UID: "u1"}
		if got != want {
			t.Errorf("ParseArgs(%q) = %+v, want %+v", in, got, want)
		}
		if got.String() != "team-a/web-0" {
			t.Errorf("String() = %q", got.String())
		}
	}
	if p := ParseArgs(""); p.String() != "" {
		t.Errorf("empty args gave %+v", p)
	}
}

var prefixCmp = cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })

// ports is a list of single ports.
func ports(ps ...uint16) []rules.PortRange {
	out := make([]rules.PortRange, len(ps))
	for i, p := range ps {
		out[i] = rules.PortRange{From: p, To: p}
	}
	return out
}

// The registry's newer keys reach the engine config.
func TestParseConfigIstioExtras(t *testing.T) {
	s := mustSettings(t, `"dropInvalid": true, "outboundOwnerGroupsExclude": [3000, "3001"]`)
	if !s.Base.DropInvalid || len(s.Base.OwnerGroupsExclude) != 2 || s.Base.OwnerGroupsExclude[1] != 3001 {
		t.Errorf("config %+v", s.Base)
	}
	if _, err := ParseConfig(conf(`"outboundOwnerGroups": "java"`)); err == nil || !strings.Contains(err.Error(), "outboundOwnerGroups") {
		t.Errorf("a group name: %v, want an error naming outboundOwnerGroups", err)
	}
	if _, err := ParseConfig(conf(`"dropInvalid": "yes"`)); err == nil || !strings.Contains(err.Error(), "dropInvalid") {
		t.Errorf("dropInvalid as a string: %v", err)
	}
}
