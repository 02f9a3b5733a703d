package node

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Render returns the node rules in `nft -f` syntax, as Apply programs
// them (gateway sets shown empty: their members are dynamic).
func Render(cfg *Config) string {
	p := newProgram(cfg)
	var b strings.Builder
	v4, v6 := splitFamilies(cfg.Allowed)
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		fmt.Fprintf(&b, "table %s %s {\n", familyName(t.Family), Table)
		if t == inetTable {
			for _, s := range []struct {
				name, typ string
				ps        []netip.Prefix
			}{{SetAllowV4, "ipv4_addr", v4}, {SetAllowV6, "ipv6_addr", v6}} {
				fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s\n\t\tflags interval\n", s.name, s.typ)
				if len(s.ps) > 0 {
					typ := rules.SetIPv4
					if s.typ == "ipv6_addr" {
						typ = rules.SetIPv6
					}
					items := rules.NFTSetElementTexts(&rules.Set{Type: typ, Prefixes: s.ps})
					fmt.Fprintf(&b, "\t\telements = { %s }\n", strings.Join(items, ", "))
				}
				b.WriteString("\t}\n")
			}
		}
		fmt.Fprintf(&b, "\tset %s {\n\t\ttype ifname . ipv4_addr\n\t}\n", SetGatewaysV4)
		fmt.Fprintf(&b, "\tset %s {\n\t\ttype ifname . ipv6_addr\n\t}\n", SetGatewaysV6)
		if t == inetTable {
			fmt.Fprintf(&b, "\tcounter %s {\n\t}\n", CounterDropped)
		}
		for _, c := range p.chains {
			if c.family != t.Family {
				continue
			}
			fmt.Fprintf(&b, "\tchain %s {\n", c.name)
			if c.baseText != "" {
				fmt.Fprintf(&b, "\t\t%s\n", c.baseText)
			}
			for _, r := range c.rules {
				fmt.Fprintf(&b, "\t\t%s\n", r)
			}
			b.WriteString("\t}\n")
		}
		b.WriteString("}\n")
	}
	return b.String()
}
