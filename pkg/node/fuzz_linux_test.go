package node

import (
	"strings"
	"testing"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// FuzzNodeConfig: the node config file never panics the parser; it is
// rejected with an error, or gives a Config whose rendering holds every
// allowed range and no default route.
func FuzzNodeConfig(f *testing.F) {
	for _, s := range []string{
		egressCfg,
		`{"role":"app","podCIDRs":["10.244.0.0/16"]}`,
		`{"role":"app","podCIDRs":["10.244.0.0/33"]}`,
		`{"role":"egress","podCIDRs":["10.244.0.0/16"],"uplink":"eth0","egressIP":"203.0.113.1","connLabel":5}`,
		`{"role":"app","podCIDRs":["0.0.0.0/0"]}`,
		`{"role":"app","podCIDRs":[],"x":1}`,
		`[]`, `null`, `{"role":"app","podCIDRs":["::/1","8000::/1"]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		if len(cfg.Allowed) == 0 {
			t.Fatal("accepted a config without allowed ranges")
		}
		for _, p := range cfg.Allowed {
			if p.Bits() == 0 {
				t.Fatalf("accepted a default route %v", p)
			}
		}
		if cfg.ConnLabel < 0 || cfg.ConnLabel > 127 {
			t.Fatalf("bad label %d", cfg.ConnLabel)
		}
		out := Render(cfg)
		if !strings.Contains(out, "table inet "+Table) || !strings.Contains(out, "counter name dropped drop") {
			t.Fatalf("rendering lacks the drop rule:\n%s", out)
		}
		if cfg.Role == RoleEgress && !strings.Contains(out, "masquerade") {
			t.Fatalf("egress rendering lacks NAT:\n%s", out)
		}
		_ = rules.FormatVersion
	})
}
