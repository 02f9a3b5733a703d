package node

import (
	"strings"
	"testing"
)

func TestParseErrors(t *testing.T) {
	cases := []struct{ json, field, value string }{
		{`{"role":"boss","podCIDRs":["10.244.0.0/16"]}`, "role", "boss"},
		{`{"role":"app"}`, "podCIDRs", ""},
		{`{"role":"app","podCIDRs":["10.244.0.0/33"]}`, "podCIDRs", "10.244.0.0/33"},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"allow":["0.0.0.0/0"]}`, "allow", "0.0.0.0/0"},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"allow":["*"]}`, "allow", "*"},
		{`{"role":"egress","podCIDRs":["10.244.0.0/16"]}`, "uplink", ""},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"egressIP":"203.0.113.1"}`, "egressIP", "203.0.113.1"},
		{`{"role":"egress","podCIDRs":["10.244.0.0/16"],"uplink":"eth0","egressIP":"nope"}`, "egressIP", "nope"},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"gatewayMark":3}`, "gatewayMark", "0x3"},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"gatewayMark":16384}`, "KUBE-MARK-MASQ", "0x4000"},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"podInterfaces":["veth*"]}`, "podInterfaces", "veth*"},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"connLabel":128}`, "connLabel", "128"},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"connLabel":-1}`, "connLabel", "-1"},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"auditGroup":65536}`, "auditGroup", "65536"},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"auditRate":0}`, "auditRate", "0"},
		{`{"role":"app","podCIDRs":["10.244.0.0/16"],"auditBurst":-3}`, "auditBurst", "-3"},
	}
	for _, tc := range cases {
		_, err := Parse([]byte(tc.json))
		if err == nil {
			t.Errorf("%s: accepted", tc.json)
			continue
		}
		if !strings.Contains(err.Error(), tc.field) || !strings.Contains(err.Error(), `"`+tc.value+`"`) {
			t.Errorf("%s: error %q does not name %s=%q", tc.json, err, tc.field, tc.value)
		}
	}
	if _, err := Parse([]byte(`{"role":"app","podCIDRs":["10.244.0.0/16"],"podCIDR":[]}`)); err == nil || !strings.Contains(err.Error(), "podCIDR\"") {
		t.Errorf("unknown key not rejected by name: %v", err)
	}
}
