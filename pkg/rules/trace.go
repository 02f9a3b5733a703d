package rules

import (
	"fmt"
	"net/netip"
	"slices"
)

// Packet is what Trace needs to know about a packet at one hook.
type Packet struct {
	Hook  string // "prerouting" or "output"
	IIF   string
	OIF   string
	Src   netip.Addr
	Dst   netip.Addr
	Proto Proto
	DPort uint16
	// UID and GID of the sending socket (output hook only).
	UID, GID uint32
}

// Trace evaluates the model for one packet and returns the port it is
// redirected to, or 0 when the packet is not captured. It interprets the
// model, not a rendering, so tests written against it keep working when
// the wording of a rule changes; the privileged tests then prove that the
// kernel agrees.
func (rs *Ruleset) Trace(p Packet) (redirectPort uint16, err error) {
	for _, c := range rs.Chains {
		if c.Hook != nil && c.Hook.Name == p.Hook && c.Table == TableNAT {
			v, done, err := rs.traceChain(c, p, 0)
			if err != nil || !done {
				return 0, err
			}
			if v.Kind == VerdictRedirect {
				return v.Port, nil
			}
			return 0, nil
		}
	}
	return 0, nil
}

// traceChain returns the final verdict, and done=false when the chain
// fell through (return to the caller, or policy accept for base chains).
func (rs *Ruleset) traceChain(c *Chain, p Packet, depth int) (Verdict, bool, error) {
	if depth > 8 {
		return Verdict{}, false, fmt.Errorf("jump depth exceeded at chain %s", c.Name)
	}
	for _, r := range c.Rules {
		ok, err := rs.matches(&r, p)
		if err != nil {
			return Verdict{}, false, fmt.Errorf("chain %s: %w", c.Name, err)
		}
		if !ok {
			continue
		}
		switch r.Verdict.Kind {
		case VerdictReturn:
			return Verdict{}, false, nil
		case VerdictRedirect:
			return r.Verdict, true, nil
		case VerdictJump:
			t := rs.Chain(r.Verdict.Chain)
			if t == nil {
				return Verdict{}, false, fmt.Errorf("jump to missing chain %s", r.Verdict.Chain)
			}
			v, done, err := rs.traceChain(t, p, depth+1)
			if err != nil || done {
				return v, done, err
			}
		}
	}
	return Verdict{}, false, nil
}

func (rs *Ruleset) matches(r *Rule, p Packet) (bool, error) {
	fam := FamilyIPv4
	if p.Dst.Is6() {
		fam = FamilyIPv6
	}
	if r.Family != FamilyAny && r.Family != fam {
		return false, nil
	}
	if r.IIF != "" && r.IIF != p.IIF || r.OIF != "" && r.OIF != p.OIF {
		return false, nil
	}
	if r.Src != nil && !r.Src.Contains(p.Src) {
		return false, nil
	}
	if r.Dst != nil && r.Dst.Contains(p.Dst) == r.DstNot {
		return false, nil
	}
	if r.DstSet != "" {
		s := rs.Set(r.DstSet)
		if s == nil {
			return false, fmt.Errorf("rule uses missing set %s", r.DstSet)
		}
		if !slices.ContainsFunc(s.Prefixes, func(q netip.Prefix) bool { return q.Contains(p.Dst) }) {
			return false, nil
		}
	}
	if r.Proto != ProtoAny && r.Proto != p.Proto {
		return false, nil
	}
	inRange := func(pr PortRange) bool { return p.DPort >= pr.From && p.DPort <= pr.To }
	if r.DPort != nil && inRange(*r.DPort) == r.DPortNot {
		return false, nil
	}
	if r.SPort != nil || r.CTInvalid || r.CTEstablished || r.Mark != nil || r.ConnMark != nil {
		// Trace follows the nat table, where neither is used; a packet
		// of its kind has no source port or conntrack state.
		return false, nil
	}
	if slices.Contains(r.DPortsNot, p.DPort) {
		return false, nil
	}
	if r.DPortSet != "" {
		s := rs.Set(r.DPortSet)
		if s == nil {
			return false, fmt.Errorf("rule uses missing set %s", r.DPortSet)
		}
		if !slices.ContainsFunc(s.Ports, inRange) {
			return false, nil
		}
	}
	if r.UID != nil && (*r.UID == p.UID) == r.UIDNot {
		return false, nil
	}
	if r.GID != nil && (*r.GID == p.GID) == r.GIDNot {
		return false, nil
	}
	if slices.Contains(r.GIDsNot, p.GID) {
		return false, nil
	}
	return true, nil
}
