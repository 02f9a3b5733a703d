package rules

// The iptables renderer: a pure function from the model to the nat table
// of one family, in the exact text iptables-save prints. Check compares
// strings, so every line here must be byte-for-byte what
// iptables-save/ip6tables-save (1.8.x, nft and legacy flavours alike)
// prints back for the rule we restore. The rules that matter:
//
//   - options come in the order -s, -d, -i, -o, -p, then matches in the
//     order given, then -j; "!" precedes the option it negates;
//   - -s/-d 0.0.0.0/0 and ::/0 are not printed; addresses are printed
//     masked, with a prefix length;
//   - IPv6 addresses are printed by glibc's inet_ntop, which writes
//     ::a.b.c.d for IPv4-compatible addresses where Go writes ::x:y;
//   - --dport 0:65535 is not printed, a range a:a is printed as a.
//
// Sets do not exist in iptables: a rule with a DstSet or DPortSet is
// expanded Istio style into one rule per prefix of the family and one per
// port range.

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// iptChains are the regular chains we own in the nat table, in the order
// iptables-save lists them (by name). They are also the chains whose
// entry rules Apply takes over from istio-iptables.
var iptChains = []string{ChainInbound, ChainInRedirect, ChainOutput, ChainOutputDNS, ChainRedirect}

// ChainDrop is mangle's drop chain (--drop-invalid).
const ChainDrop = "ISTIO_DROP"

// iptTables are the tables we write, in the order we write them, with
// the regular chains we own in each (sorted, as iptables-save lists
// them). Besides nat: raw for the DNS conntrack zones, mangle for
// --drop-invalid.
var iptTables = []string{"nat", "mangle", "raw"}

// TPROXY mode's mangle chains.
const (
	ChainDivert = "ISTIO_DIVERT"
	ChainTProxy = "ISTIO_TPROXY"
)

var iptChainsOf = map[string][]string{
	"nat":    iptChains,
	"mangle": {ChainDivert, ChainDrop, ChainInbound, ChainTProxy},
	"raw":    {ChainInbound, ChainOutputDNS},
}

// isIPTChainIn reports whether name is one of our chains in table.
func isIPTChainIn(table, name string) bool { return slices.Contains(iptChainsOf[table], name) }

// iptBuiltins are the built-in nat chains that may hold our entry rules,
// in the order iptables-save prints them.
var iptBuiltins = []string{"PREROUTING", "OUTPUT"}

// iptTable is what we own in the nat table of one family, in
// iptables-save syntax: the model rendered, or what was parsed back from
// iptables-save. Both are in the same canonical order, so two iptTables
// compare line by line.
type iptTable struct {
	Family Family
	// Table is the iptables table ("nat" when empty).
	Table string
	// Chains are our regular chains, sorted by name.
	Chains []string
	// Entry are our rules in the built-in chains ("-A PREROUTING ..."),
	// PREROUTING first, each chain's rules in order.
	Entry []string
	// Rules are the rules of our chains ("-A ISTIO_OUTPUT ..."), chains
	// by name, each chain's rules in order.
	Rules []string
}

// empty reports whether nothing of ours is in the table.
func (t *iptTable) empty() bool {
	return len(t.Chains) == 0 && len(t.Entry) == 0 && len(t.Rules) == 0
}

// lines is the table as Check compares it: chain declarations, entry
// rules and chain rules.
func (t *iptTable) lines() []string {
	out := make([]string, 0, len(t.Chains)+len(t.Entry)+len(t.Rules))
	for _, c := range t.Chains {
		out = append(out, ":"+c+" - [0:0]")
	}
	out = append(out, t.Entry...)
	return append(out, t.Rules...)
}

// String is the table as iptables-restore input (and, apart from the
// built-in chains' declarations and anyone else's rules, as
// iptables-save prints it).
func (t *iptTable) String() string {
	var b strings.Builder
	b.WriteString("*" + t.table() + "\n")
	for _, l := range t.lines() {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

func (t *iptTable) table() string {
	if t.Table == "" {
		return "nat"
	}
	return t.Table
}

// iptCommand is the save/restore command of a family, for labels and
// messages.
func iptCommand(f Family) string {
	if f == FamilyIPv6 {
		return "ip6tables"
	}
	return "iptables"
}

func familyEnabled(fs Families, f Family) bool {
	if f == FamilyIPv6 {
		return fs.HasV6()
	}
	return fs.HasV4()
}

// RenderIPTablesFamily renders rs for one family (FamilyIPv4 for
// iptables, FamilyIPv6 for ip6tables) as iptables-restore input for the
// nat table. It is empty when the family is not enabled in rs.
func RenderIPTablesFamily(rs *Ruleset, f Family) (string, error) {
	if !familyEnabled(rs.Families, f) {
		return "", nil
	}
	ts, err := renderIPTAll(rs, f)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, t := range ts {
		if t.table() == "nat" || !t.empty() {
			b.WriteString(t.String())
		}
	}
	return b.String(), nil
}

// RenderIPTables renders rs for both families, each section labelled
// with its command, for dry runs and logs. A model that Build did not
// produce may be unrenderable; the error is then written in place of
// the section (Backend.Render returns it instead).
func RenderIPTables(rs *Ruleset) string {
	s, err := renderIPTables(rs)
	if err != nil {
		return s + "# error: " + err.Error() + "\n"
	}
	return s
}

func renderIPTables(rs *Ruleset) (string, error) {
	var b strings.Builder
	for _, f := range []Family{FamilyIPv4, FamilyIPv6} {
		cmd := iptCommand(f)
		if !familyEnabled(rs.Families, f) {
			fmt.Fprintf(&b, "# %s: family disabled (families=%s); apply removes our rules here\n", cmd, rs.Families)
			continue
		}
		ts, err := renderIPTAll(rs, f)
		if err != nil {
			return b.String(), err
		}
		for _, t := range ts {
			if t.table() == "nat" || !t.empty() {
				fmt.Fprintf(&b, "# %s-restore --noflush (%s table)\n", cmd, t.table())
				b.WriteString(t.String())
			}
		}
	}
	return b.String(), nil
}

// renderIPTAll renders every table we write (iptTables order), empty
// ones included, so that Apply can clear a table we no longer use.
func renderIPTAll(rs *Ruleset, f Family) ([]*iptTable, error) {
	out := make([]*iptTable, 0, len(iptTables))
	for _, tb := range iptTables {
		t, err := renderIPTTable(rs, f, tb)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, nil
}

// renderIPTTable renders the model's rules of family f in table tb.
// Base chains become entry rules in their built-in chain, marked with
// Comment.
func renderIPTTable(rs *Ruleset, f Family, tb string) (*iptTable, error) {
	t := &iptTable{Family: f, Table: tb}
	if tb == "nat" {
		t.Table = ""
	}
	entry := map[string][]string{}
	rules := map[string][]string{}
	for _, c := range rs.Chains {
		if tableName(c.Table) != tb {
			continue
		}
		name, isEntry := c.iptName(), c.Hook != nil
		if isEntry {
			if !slices.Contains(iptBuiltins, name) {
				return nil, fmt.Errorf("chain %s: iptables chain %q is not a built-in chain we manage", c.Name, name)
			}
		} else {
			if !isIPTChainIn(tb, name) {
				return nil, fmt.Errorf("chain %s is not one of the iptables chains we own in %s", c.Name, tb)
			}
			if !slices.Contains(t.Chains, name) {
				t.Chains = append(t.Chains, name)
			}
		}
		for i, r := range c.Rules {
			ls, err := iptRuleLines(rs, name, r, f, isEntry)
			if err != nil {
				return nil, fmt.Errorf("could not render rule %d of chain %s for %s: %w", i, c.Name, iptCommand(f), err)
			}
			if isEntry {
				entry[name] = append(entry[name], ls...)
			} else {
				rules[name] = append(rules[name], ls...)
			}
		}
	}
	// A chain is declared in a family only when the family uses it: it
	// has rules there, or a rule there jumps to it (istio-iptables
	// creates a chain with its first rule; IPv6 without nameservers has
	// no ISTIO_OUTPUT_DNS, say).
	used := func(c string) bool {
		if len(rules[c]) > 0 {
			return true
		}
		for _, ls := range [][]string{entry["PREROUTING"], entry["OUTPUT"]} {
			for _, l := range ls {
				if strings.HasSuffix(l, " -j "+c) {
					return true
				}
			}
		}
		for _, ls := range rules {
			for _, l := range ls {
				if strings.HasSuffix(l, " -j "+c) {
					return true
				}
			}
		}
		return false
	}
	t.Chains = slices.DeleteFunc(t.Chains, func(c string) bool { return !used(c) })
	slices.Sort(t.Chains)
	for _, c := range iptBuiltins {
		t.Entry = append(t.Entry, entry[c]...)
	}
	for _, c := range t.Chains {
		t.Rules = append(t.Rules, rules[c]...)
	}
	return t, nil
}

// iptRuleLines renders one model rule as zero or more "-A" lines for
// family f: none when the rule is of the other family or an expanded set
// has no element of f, several when sets are expanded.
func iptRuleLines(rs *Ruleset, chain string, r Rule, f Family, comment bool) ([]string, error) {
	if r.Family != FamilyAny && r.Family != f {
		return nil, nil
	}
	if r.Src != nil && !prefixOf(*r.Src, f) || r.Dst != nil && !prefixOf(*r.Dst, f) {
		// An address of the other family: the rule cannot match here.
		// Build never makes one (such rules carry a Family).
		return nil, nil
	}
	if (r.DPort != nil || r.DPortSet != "") && r.Proto == ProtoAny {
		return nil, fmt.Errorf("a destination port needs a protocol")
	}
	if r.Verdict.Kind == VerdictRedirect && r.Proto == ProtoAny {
		return nil, fmt.Errorf("REDIRECT needs a protocol")
	}
	if r.Dst != nil && r.DstSet != "" {
		return nil, fmt.Errorf("a rule cannot have both a destination and a destination set")
	}
	if r.DPort != nil && r.DPortSet != "" {
		return nil, fmt.Errorf("a rule cannot have both a port and a port set")
	}

	// Expand sets: one destination per prefix, one port per range.
	dsts := []*netip.Prefix{r.Dst}
	if r.DstSet != "" {
		s := rs.Set(r.DstSet)
		if s == nil {
			return nil, fmt.Errorf("unknown set %s", r.DstSet)
		}
		if s.Type == SetPorts {
			return nil, fmt.Errorf("set %s holds ports, not addresses", r.DstSet)
		}
		dsts = dsts[:0]
		for _, p := range s.Prefixes {
			if prefixOf(p, f) {
				dsts = append(dsts, &p)
			}
		}
	}
	ports := []*PortRange{r.DPort}
	if r.DPortSet != "" {
		s := rs.Set(r.DPortSet)
		if s == nil {
			return nil, fmt.Errorf("unknown set %s", r.DPortSet)
		}
		if s.Type != SetPorts {
			return nil, fmt.Errorf("set %s holds addresses, not ports", r.DPortSet)
		}
		ports = ports[:0]
		for _, p := range s.Ports {
			ports = append(ports, &p)
		}
	}

	out := make([]string, 0, len(dsts)*len(ports))
	for _, d := range dsts {
		for _, p := range ports {
			out = append(out, iptRuleLine(rs, chain, r, f, d, p, comment))
		}
	}
	return out, nil
}

// iptRuleLine writes one rule in iptables-save's canonical order.
func iptRuleLine(rs *Ruleset, chain string, r Rule, family Family, dst *netip.Prefix, port *PortRange, comment bool) string {
	var b strings.Builder
	b.WriteString("-A ")
	b.WriteString(chain)
	not := func(neg bool) {
		if neg {
			b.WriteString(" !")
		}
	}
	if r.Src != nil && r.Src.Bits() != 0 {
		b.WriteString(" -s ")
		b.WriteString(iptPrefix(*r.Src))
	}
	if dst != nil && (dst.Bits() != 0 || r.DstNot) {
		not(r.DstNot)
		b.WriteString(" -d ")
		b.WriteString(iptPrefix(*dst))
	}
	if r.IIF != "" {
		b.WriteString(" -i ")
		b.WriteString(r.IIF)
	}
	if r.OIF != "" {
		b.WriteString(" -o ")
		b.WriteString(r.OIF)
	}
	if r.Proto != ProtoAny {
		b.WriteString(" -p ")
		b.WriteString(r.Proto.String())
	}
	if r.SPort != nil && port == nil {
		// iptables-save prints one -m tcp/udp with --sport before --dport;
		// we never combine the two.
		b.WriteString(" -m ")
		b.WriteString(r.Proto.String())
		b.WriteString(" --sport ")
		b.WriteString(iptPorts(*r.SPort))
	}
	if port != nil {
		// The tcp/udp match is loaded even for a range that matches
		// every port, and iptables-save then prints it bare.
		b.WriteString(" -m ")
		b.WriteString(r.Proto.String())
		if !(port.From == 0 && port.To == 65535 && !r.DPortNot) {
			not(r.DPortNot)
			b.WriteString(" --dport ")
			b.WriteString(strconv.Itoa(int(port.From)))
			if port.To != port.From {
				b.WriteByte(':')
				b.WriteString(strconv.Itoa(int(port.To)))
			}
		}
	}
	if r.CTInvalid {
		b.WriteString(" -m conntrack --ctstate INVALID")
	}
	if r.CTEstablished {
		b.WriteString(" -m conntrack --ctstate RELATED,ESTABLISHED")
	}
	if r.Mark != nil {
		b.WriteString(" -m mark")
		not(r.MarkNot)
		b.WriteString(" --mark " + iptHex(*r.Mark))
	}
	if r.ConnMark != nil {
		b.WriteString(" -m connmark --mark " + iptHex(*r.ConnMark))
	}
	if len(r.DPortsNot) > 0 {
		b.WriteString(" -m multiport ! --dports ")
		for i, p := range r.DPortsNot {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(strconv.Itoa(int(p)))
		}
	}
	if r.UID != nil || r.GID != nil {
		b.WriteString(" -m owner")
		if r.UID != nil {
			not(r.UIDNot)
			b.WriteString(" --uid-owner ")
			b.WriteString(strconv.FormatUint(uint64(*r.UID), 10))
		}
		if r.GID != nil {
			not(r.GIDNot)
			b.WriteString(" --gid-owner ")
			b.WriteString(strconv.FormatUint(uint64(*r.GID), 10))
		}
	}
	// One owner match per excluded group, as iptables-save prints them.
	for _, g := range r.GIDsNot {
		b.WriteString(" -m owner ! --gid-owner ")
		b.WriteString(strconv.FormatUint(uint64(g), 10))
	}
	if comment {
		b.WriteString(" -m comment --comment ")
		b.WriteString(Comment)
	}
	switch r.Verdict.Kind {
	case VerdictReturn:
		b.WriteString(" -j RETURN")
	case VerdictDrop:
		b.WriteString(" -j DROP")
	case VerdictAccept:
		b.WriteString(" -j ACCEPT")
	case VerdictSetMark:
		b.WriteString(" -j MARK --set-xmark " + iptHex(r.Verdict.Mark) + "/0xffffffff")
	case VerdictConnmarkSave:
		b.WriteString(" -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff")
	case VerdictConnmarkRestore:
		b.WriteString(" -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff")
	case VerdictTProxy:
		onIP := "0.0.0.0"
		if family == FamilyIPv6 {
			onIP = "::"
		}
		b.WriteString(" -j TPROXY --on-port " + strconv.Itoa(int(r.Verdict.Port)) + " --on-ip " + onIP + " --tproxy-mark " + iptHex(r.Verdict.Mark) + "/0xffffffff")
	case VerdictCTZone:
		b.WriteString(" -j CT --zone ")
		b.WriteString(strconv.Itoa(int(r.Verdict.Zone)))
	case VerdictJump:
		b.WriteString(" -j ")
		if t := rs.Chain(r.Verdict.Chain); t != nil {
			b.WriteString(t.iptName())
		} else {
			b.WriteString(r.Verdict.Chain)
		}
	case VerdictRedirect:
		b.WriteString(" -j REDIRECT --to-ports ")
		b.WriteString(strconv.Itoa(int(r.Verdict.Port)))
	}
	return b.String()
}

func prefixOf(p netip.Prefix, f Family) bool {
	if f == FamilyIPv6 {
		return p.Addr().Is6()
	}
	return p.Addr().Is4()
}

// iptPrefix prints a prefix as iptables-save does: masked, with its
// length, IPv6 in glibc inet_ntop form.
func iptPrefix(p netip.Prefix) string {
	p = p.Masked()
	a := p.Addr()
	if a.Is4() {
		return p.String()
	}
	return ntop6(a) + "/" + strconv.Itoa(p.Bits())
}

// ntop6 formats an IPv6 address like glibc's inet_ntop. It differs from
// netip only for IPv4-compatible addresses (the first 96 bits zero and
// the seventh 16-bit word not zero), which glibc writes as ::a.b.c.d.
// Both compress the first longest run of two or more zero words and
// write IPv4-mapped addresses as ::ffff:a.b.c.d.
func ntop6(a netip.Addr) string {
	b := a.As16()
	compat := b[12] != 0 || b[13] != 0
	for _, x := range b[:12] {
		if x != 0 {
			compat = false
			break
		}
	}
	if compat {
		return "::" + netip.AddrFrom4([4]byte(b[12:])).String()
	}
	return a.WithZone("").String()
}

// iptHex prints a mark as iptables-save does.
func iptHex(v uint32) string { return "0x" + strconv.FormatUint(uint64(v), 16) }

func iptPorts(p PortRange) string {
	if p.From == p.To {
		return strconv.Itoa(int(p.From))
	}
	return strconv.Itoa(int(p.From)) + ":" + strconv.Itoa(int(p.To))
}
