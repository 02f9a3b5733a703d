package node

import (
	"fmt"
	"strings"

	"github.com/google/nftables"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Render returns the node rules in `nft -f` syntax, as Apply programs
// them. Per-pod sets are shown empty: their elements are dynamic.
func Render(cfg *Config) string {
	p := newProgram(cfg)
	var b strings.Builder
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		fmt.Fprintf(&b, "table %s %s {\n", familyName(t.Family), Table)
		for _, s := range p.sets {
			if s.table != t {
				continue
			}
			fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s\n", s.name, s.keyType.Name)
			if s.static {
				fmt.Fprintf(&b, "\t\tflags interval\n\t\tcomment %q\n", formatComment)
				if items := rules.NFTSetElementTexts(p.allowModel(s)); len(items) > 0 {
					fmt.Fprintf(&b, "\t\telements = { %s }\n", strings.Join(items, ", "))
				}
			}
			b.WriteString("\t}\n")
		}
		for _, o := range counters() {
			if o.Table == t {
				fmt.Fprintf(&b, "\tcounter %s {\n\t}\n", o.Name)
			}
		}
		for _, c := range p.chains {
			if c.family != t.Family {
				continue
			}
			fmt.Fprintf(&b, "\tchain %s {\n", c.name)
			if bt := c.baseText(); bt != "" {
				fmt.Fprintf(&b, "\t\t%s\n", bt)
			}
			for _, r := range c.rules {
				fmt.Fprintf(&b, "\t\t%s comment %q\n", r, ruleComment(r))
			}
			b.WriteString("\t}\n")
		}
		b.WriteString("}\n")
	}
	return b.String()
}
