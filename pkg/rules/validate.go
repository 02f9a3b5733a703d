package rules

import (
	"fmt"
	"net/netip"
)

// ModelError is a Ruleset that no backend can program faithfully. Build
// never produces one; Validate exists so that a hand-made or corrupted
// model is refused before anything is touched, instead of being
// rendered into something else (a raw payload match, a dropped rule) or
// applied for one family and not the other.
type ModelError struct {
	Chain  string
	Rule   int // index in the chain, -1 for the chain itself
	Reason string
}

func (e *ModelError) Error() string {
	if e.Rule < 0 {
		return fmt.Sprintf("invalid ruleset: chain %s: %s", e.Chain, e.Reason)
	}
	return fmt.Sprintf("invalid ruleset: chain %s rule %d: %s", e.Chain, e.Rule, e.Reason)
}

// Validate checks that the model is self-consistent: unique chain and set
// names, jump targets that exist and are regular chains, rule families
// that match their addresses and sets, ports only with a protocol, sets
// whose elements match their type, and families the ruleset enables.
// Every backend calls it at the top of Apply.
func (rs *Ruleset) Validate() error {
	if rs == nil {
		return &ModelError{Chain: "-", Rule: -1, Reason: "ruleset is nil"}
	}
	chains := map[string]*Chain{}
	for _, c := range rs.Chains {
		if c == nil || c.Name == "" {
			return &ModelError{Chain: "?", Rule: -1, Reason: "chain without a name"}
		}
		if chains[c.Name] != nil {
			return &ModelError{Chain: c.Name, Rule: -1, Reason: "chain defined twice"}
		}
		chains[c.Name] = c
		switch c.Table {
		case TableNAT, TableRaw, TableMangle:
		default:
			return &ModelError{Chain: c.Name, Rule: -1, Reason: fmt.Sprintf("unsupported table %q", c.Table)}
		}
		if c.Hook != nil && c.Hook.Name != "prerouting" && c.Hook.Name != "output" {
			return &ModelError{Chain: c.Name, Rule: -1, Reason: fmt.Sprintf("unsupported hook %q", c.Hook.Name)}
		}
	}
	sets := map[string]*Set{}
	for _, s := range rs.Sets {
		if s == nil || s.Name == "" {
			return &ModelError{Chain: "-", Rule: -1, Reason: "set without a name"}
		}
		if sets[s.Name] != nil {
			return &ModelError{Chain: "set " + s.Name, Rule: -1, Reason: "set defined twice"}
		}
		sets[s.Name] = s
		if err := validateSet(s); err != nil {
			return err
		}
	}
	for _, c := range rs.Chains {
		for i := range c.Rules {
			if reason := rs.ruleProblem(&c.Rules[i], chains, sets); reason != "" {
				return &ModelError{Chain: c.Name, Rule: i, Reason: reason}
			}
			if reason := tableProblem(c, &c.Rules[i], chains); reason != "" {
				return &ModelError{Chain: c.Name, Rule: i, Reason: reason}
			}
		}
	}
	return nil
}

// tableProblem: what a rule may do depends on its chain's table.
func tableProblem(c *Chain, r *Rule, chains map[string]*Chain) string {
	switch r.Verdict.Kind {
	case VerdictJump:
		if t := chains[r.Verdict.Chain]; t != nil && t.Table != c.Table {
			return fmt.Sprintf("jump from table %s to chain %s of table %s", tableName(c.Table), t.Name, tableName(t.Table))
		}
	case VerdictRedirect:
		if c.Table != TableNAT {
			return "redirect outside the nat table"
		}
	case VerdictCTZone:
		if c.Table != TableRaw {
			return "conntrack zone outside the raw table"
		}
	case VerdictDrop:
		if c.Table == TableNAT {
			return "drop in the nat table"
		}
	case VerdictAccept, VerdictSetMark, VerdictConnmarkSave, VerdictConnmarkRestore, VerdictTProxy:
		if c.Table != TableMangle {
			return "a TPROXY-mode verdict outside the mangle table"
		}
		if r.Verdict.Kind == VerdictTProxy && (r.Proto != ProtoTCP || r.Verdict.Port == 0) {
			return "TPROXY needs tcp and a port"
		}
	}
	return ""
}

func validateSet(s *Set) error {
	bad := func(r string) error { return &ModelError{Chain: "set " + s.Name, Rule: -1, Reason: r} }
	switch s.Type {
	case SetIPv4, SetIPv6:
		if len(s.Ports) > 0 {
			return bad("address set holds ports")
		}
		for _, p := range s.Prefixes {
			if !p.IsValid() || p.Addr().Is4() != (s.Type == SetIPv4) {
				return bad(fmt.Sprintf("element %v does not match the set's family", p))
			}
		}
	case SetPorts:
		if len(s.Prefixes) > 0 {
			return bad("port set holds addresses")
		}
		for _, p := range s.Ports {
			if p.From == 0 || p.To < p.From {
				return bad(fmt.Sprintf("invalid port range %d-%d", p.From, p.To))
			}
		}
	default:
		return bad("unknown set type")
	}
	return nil
}

func (rs *Ruleset) ruleProblem(r *Rule, chains map[string]*Chain, sets map[string]*Set) string {
	switch r.Family {
	case FamilyAny:
	case FamilyIPv4:
		if !rs.Families.HasV4() {
			return "IPv4 rule in a ruleset without IPv4"
		}
	case FamilyIPv6:
		if !rs.Families.HasV6() {
			return "IPv6 rule in a ruleset without IPv6"
		}
	default:
		return "unknown family"
	}
	for _, p := range []*netip.Prefix{r.Src, r.Dst} {
		if p == nil {
			continue
		}
		if !p.IsValid() {
			return fmt.Sprintf("invalid prefix %v", *p)
		}
		switch {
		case r.Family == FamilyAny:
			return fmt.Sprintf("prefix %v in a rule without a family", *p)
		case p.Addr().Is4() != (r.Family == FamilyIPv4):
			return fmt.Sprintf("prefix %v does not match the rule's family", *p)
		}
	}
	if r.Dst == nil && r.DstNot {
		return "negated destination without a destination"
	}
	if r.DstSet != "" {
		s := sets[r.DstSet]
		if s == nil {
			return fmt.Sprintf("set %s does not exist", r.DstSet)
		}
		if want := map[Family]SetType{FamilyIPv4: SetIPv4, FamilyIPv6: SetIPv6}[r.Family]; s.Type != want {
			return fmt.Sprintf("set %s does not match the rule's family", r.DstSet)
		}
	}
	if (r.DPort != nil || r.DPortSet != "") && r.Proto == ProtoAny {
		return "port match without a protocol"
	}
	if r.Mark == nil && r.MarkNot {
		return "negated mark without a mark"
	}
	if r.SPort != nil && (r.Proto == ProtoAny || r.SPort.From == 0 || r.SPort.To < r.SPort.From) {
		return "source port without a protocol, or an invalid range"
	}
	if len(r.DPortsNot) > 0 && (r.Proto == ProtoAny || r.DPort != nil || r.DPortSet != "") {
		return "a port exclusion list needs a protocol and no other port match"
	}
	if r.DPort == nil && r.DPortNot {
		return "negated port without a port"
	}
	if r.DPort != nil && (r.DPort.From == 0 || r.DPort.To < r.DPort.From) {
		return fmt.Sprintf("invalid port range %d-%d", r.DPort.From, r.DPort.To)
	}
	if r.DPortSet != "" {
		if s := sets[r.DPortSet]; s == nil || s.Type != SetPorts {
			return fmt.Sprintf("port set %s does not exist", r.DPortSet)
		}
	}
	if r.UID == nil && r.UIDNot || r.GID == nil && r.GIDNot {
		return "negated owner without an owner"
	}
	if r.GID != nil && len(r.GIDsNot) > 0 {
		return "both a GID and a list of excluded GIDs"
	}
	for _, n := range []string{r.IIF, r.OIF} {
		if n != "" && validIfName("interface", n) != nil {
			return fmt.Sprintf("invalid interface name %q", n)
		}
	}
	switch r.Verdict.Kind {
	case VerdictReturn:
	case VerdictJump:
		t := chains[r.Verdict.Chain]
		if t == nil {
			return fmt.Sprintf("jump to chain %s, which does not exist", r.Verdict.Chain)
		}
		if t.Hook != nil {
			return fmt.Sprintf("jump to base chain %s", r.Verdict.Chain)
		}
	case VerdictDrop, VerdictAccept, VerdictSetMark, VerdictConnmarkSave, VerdictConnmarkRestore, VerdictTProxy:
	case VerdictCTZone:
		if r.Verdict.Zone == 0 {
			return "conntrack zone 0"
		}
	case VerdictRedirect:
		if r.Verdict.Port == 0 {
			return "redirect to port 0"
		}
		if r.Proto == ProtoAny {
			return "redirect without a protocol"
		}
	default:
		return "rule without a verdict"
	}
	return ""
}
