package rules

// The nftables renderer: the Ruleset as `nft -f` text (RenderNFT) and as
// google/nftables objects (nftObjectsFor). Both are pure functions of the
// model and must agree rule for rule: the text of each rule (less the
// quotes around interface names, see nftCommentText) is also the comment
// (rule userdata) that Apply writes next to its expressions, and that
// Check reads back to name missing or extra rules.
//
// Layout, for all three families (inet for dual stack, ip, ip6):
//
//	table <family> egress_cni {
//		set <name> { type ...; flags interval; comment "egress-cni format N"; elements = { ... } }
//		chain prerouting { type nat hook prerouting priority -100; policy accept; ... }
//		chain output { type nat hook output priority -100; policy accept; ... }
//		chain ISTIO_INBOUND { ... }  (and the other regular chains)
//	}
//
// Address sets are interval sets. The model's prefixes may overlap (for
// example 10.0.0.0/8 and 10.1.0.0/16), but the kernel rejects overlapping
// intervals in a set without auto-merge, so we merge them here into
// disjoint, non-adjacent ranges. The merge is also what makes the set
// readback comparable: the kernel keeps exactly the intervals we send.
//
// Expressions follow what nft 1.0.6 generates for the same text (`nft
// --debug=netlink`), including where it puts the `meta nfproto`
// dependency in an inet table, so that a table loaded with `nft -f` from
// RenderNFT and one written by Apply compare equal in Check.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// nftSetComment is the comment of every set we write. It records
// FormatVersion: google/nftables v0.3.0 cannot write table or chain
// userdata (NFTA_TABLE_USERDATA, NFTA_CHAIN_USERDATA), so sets are the
// only named objects that can carry it. `nft list table inet egress_cni`
// shows it.
var nftSetComment = fmt.Sprintf("egress-cni format %d", FormatVersion)

// nftTableFamily is the table family for the ruleset's families.
func nftTableFamily(f Families) nftables.TableFamily {
	switch f {
	case IPv4Only:
		return nftables.TableFamilyIPv4
	case IPv6Only:
		return nftables.TableFamilyIPv6
	}
	return nftables.TableFamilyINet
}

// nftFamilyName is the nft keyword of a table family.
func nftFamilyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	case nftables.TableFamilyINet:
		return "inet"
	}
	return fmt.Sprintf("family(%d)", f)
}

// nftAllFamilies are the families our table may live in. Apply removes
// the table from the two it does not use (a config that changed from
// dual stack to IPv4 only moves it from inet to ip).
var nftAllFamilies = []nftables.TableFamily{nftables.TableFamilyINet, nftables.TableFamilyIPv4, nftables.TableFamilyIPv6}

// RenderNFT returns rs as an `nft -f` script that creates (or replaces)
// our table. The output is deterministic and is what --dry-run prints and
// golden files hold. Loading it with `nft -f` gives the same table as
// Apply, rule comments included (`nft list table` prints both the same).
func RenderNFT(rs *Ruleset) string {
	fam := nftTableFamily(rs.Families)
	inet := fam == nftables.TableFamilyINet
	var b strings.Builder
	fmt.Fprintf(&b, "# egress-cni nftables ruleset, format %d.\n", FormatVersion)
	// "add table" then "delete table" in every family make the script
	// replace whatever we wrote before, as a whole and atomically (nft -f
	// sends one batch), as Apply does; the "add" keeps the "delete" from
	// failing when there is nothing to delete.
	for _, f := range nftAllFamilies {
		fmt.Fprintf(&b, "add table %s %s\n", nftFamilyName(f), NFTTable)
		fmt.Fprintf(&b, "delete table %s %s\n", nftFamilyName(f), NFTTable)
	}
	fmt.Fprintf(&b, "table %s %s {\n", nftFamilyName(fam), NFTTable)
	for i, s := range rs.Sets {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "\tset %s {\n", s.Name)
		fmt.Fprintf(&b, "\t\ttype %s\n", nftSetTypeName(s.Type))
		b.WriteString("\t\tflags interval\n")
		fmt.Fprintf(&b, "\t\tcomment %q\n", nftSetComment)
		elems := nftSetElementTexts(s)
		if len(elems) > 0 {
			b.WriteString("\t\telements = {\n")
			for j, e := range elems {
				sep := ","
				if j == len(elems)-1 {
					sep = ""
				}
				fmt.Fprintf(&b, "\t\t\t%s%s\n", e, sep)
			}
			b.WriteString("\t\t}\n")
		}
		b.WriteString("\t}\n")
	}
	for i, c := range rs.Chains {
		if i > 0 || len(rs.Sets) > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "\tchain %s {\n", c.Name)
		if c.Hook != nil {
			fmt.Fprintf(&b, "\t\ttype %s hook %s priority %d; policy accept;\n", nftChainType(c), c.Hook.Name, c.Hook.Priority)
		}
		for _, r := range c.Rules {
			text := nftRuleText(r, inet)
			fmt.Fprintf(&b, "\t\t%s comment \"%s\"\n", text, nftCommentText(text))
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func nftSetTypeName(t SetType) string {
	switch t {
	case SetIPv4:
		return "ipv4_addr"
	case SetIPv6:
		return "ipv6_addr"
	}
	return "inet_service"
}

// nftRuleText is the canonical nft text of r: what RenderNFT prints and
// what Apply stores as the rule's comment. In an inet table an address
// match implies its family (nft adds the `meta nfproto` dependency
// itself), so `meta nfproto` is only written for a family-restricted rule
// without one; likewise `tcp dport` implies `meta l4proto tcp`.
func nftRuleText(r Rule, inet bool) string {
	var p []string
	fam := ruleFamily(r)
	hasAddr := r.Src != nil || r.Dst != nil || r.DstSet != ""
	if inet && fam != FamilyAny && !hasAddr {
		p = append(p, "meta nfproto "+nfprotoName(fam))
	}
	if r.IIF != "" {
		p = append(p, "iifname "+nftQuoteIfName(r.IIF))
	}
	if r.OIF != "" {
		p = append(p, "oifname "+nftQuoteIfName(r.OIF))
	}
	if r.CTInvalid {
		p = append(p, "ct state invalid")
	}
	if r.CTEstablished {
		p = append(p, "ct state established,related")
	}
	ipKw := "ip"
	if fam == FamilyIPv6 {
		ipKw = "ip6"
	}
	if r.Src != nil {
		p = append(p, ipKw+" saddr "+nftPrefixText(*r.Src))
	}
	if r.Dst != nil {
		op := ""
		if r.DstNot {
			op = "!= "
		}
		p = append(p, ipKw+" daddr "+op+nftPrefixText(*r.Dst))
	} else if r.DstSet != "" {
		op := ""
		if r.DstNot {
			op = "!= "
		}
		p = append(p, ipKw+" daddr "+op+"@"+r.DstSet)
	}
	proto := r.Proto
	if proto == ProtoAny && (r.DPort != nil || r.DPortSet != "") {
		proto = ProtoTCP // Build always sets Proto with a port; nftRuleExprs rejects this.
	}
	switch {
	case r.DPort != nil:
		op := ""
		if r.DPortNot {
			op = "!= "
		}
		p = append(p, proto.String()+" dport "+op+r.DPort.String())
	case r.DPortSet != "":
		op := ""
		if r.DPortNot {
			op = "!= "
		}
		p = append(p, proto.String()+" dport "+op+"@"+r.DPortSet)
	case len(r.DPortsNot) > 0:
		for _, port := range r.DPortsNot {
			p = append(p, proto.String()+" dport != "+strconv.Itoa(int(port)))
		}
	case r.SPort != nil:
		p = append(p, proto.String()+" sport "+r.SPort.String())
	case proto != ProtoAny:
		p = append(p, "meta l4proto "+proto.String())
	}
	if r.UID != nil {
		op := ""
		if r.UIDNot {
			op = "!= "
		}
		p = append(p, "meta skuid "+op+strconv.FormatUint(uint64(*r.UID), 10))
	}
	if r.GID != nil {
		op := ""
		if r.GIDNot {
			op = "!= "
		}
		p = append(p, "meta skgid "+op+strconv.FormatUint(uint64(*r.GID), 10))
	}
	for _, g := range r.GIDsNot {
		p = append(p, "meta skgid != "+strconv.FormatUint(uint64(g), 10))
	}
	if r.Mark != nil {
		op := ""
		if r.MarkNot {
			op = "!= "
		}
		p = append(p, fmt.Sprintf("meta mark %s0x%08x", op, *r.Mark))
	}
	if r.ConnMark != nil {
		p = append(p, fmt.Sprintf("ct mark 0x%08x", *r.ConnMark))
	}
	switch r.Verdict.Kind {
	case VerdictReturn:
		p = append(p, "return")
	case VerdictJump:
		p = append(p, "jump "+r.Verdict.Chain)
	case VerdictRedirect:
		p = append(p, fmt.Sprintf("redirect to :%d", r.Verdict.Port))
	case VerdictDrop:
		p = append(p, "drop")
	case VerdictCTZone:
		p = append(p, fmt.Sprintf("ct zone set %d", r.Verdict.Zone))
	case VerdictAccept:
		p = append(p, "accept")
	case VerdictSetMark:
		p = append(p, fmt.Sprintf("meta mark set 0x%08x", r.Verdict.Mark))
	case VerdictConnmarkSave:
		p = append(p, "ct mark set meta mark")
	case VerdictConnmarkRestore:
		p = append(p, "meta mark set ct mark")
	case VerdictTProxy:
		p = append(p, fmt.Sprintf("tproxy %s to :%d meta mark set 0x%08x accept", ipKw, r.Verdict.Port, r.Verdict.Mark))
	}
	return strings.Join(p, " ")
}

// ruleFamily is the family a rule is restricted to: its own, or the one
// its address implies.
func ruleFamily(r Rule) Family {
	if r.Family != FamilyAny {
		return r.Family
	}
	for _, p := range []*netip.Prefix{r.Src, r.Dst} {
		if p != nil {
			if p.Addr().Is4() {
				return FamilyIPv4
			}
			return FamilyIPv6
		}
	}
	return FamilyAny
}

func nfprotoName(f Family) string {
	if f == FamilyIPv6 {
		return "ipv6"
	}
	return "ipv4"
}

// nftQuoteIfName quotes an interface name. Names are exact matches: a
// `*` would be nft's wildcard, so it is escaped.
func nftQuoteIfName(s string) string {
	return `"` + strings.ReplaceAll(s, "*", `\*`) + `"`
}

// nftPrefixText prints a host prefix as a bare address, as nft does.
func nftPrefixText(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

// addrRange is an inclusive range of addresses of one family.
type addrRange struct{ from, to netip.Addr }

// prefixLast is the last address of p.
func prefixLast(p netip.Prefix) netip.Addr {
	p = p.Masked()
	a := p.Addr().AsSlice()
	bits := p.Bits()
	for i := range a {
		for bit := range 8 {
			if i*8+bit >= bits {
				a[i] |= 0x80 >> bit
			}
		}
	}
	last, _ := netip.AddrFromSlice(a)
	return last
}

// mergePrefixes turns possibly overlapping prefixes of one family into
// sorted, disjoint and non-adjacent ranges.
func mergePrefixes(ps []netip.Prefix) []addrRange {
	rs := make([]addrRange, 0, len(ps))
	for _, p := range ps {
		p = p.Masked()
		rs = append(rs, addrRange{p.Addr(), prefixLast(p)})
	}
	slices.SortFunc(rs, func(a, b addrRange) int {
		if c := a.from.Compare(b.from); c != 0 {
			return c
		}
		return b.to.Compare(a.to)
	})
	out := make([]addrRange, 0, len(rs))
	for _, r := range rs {
		if n := len(out); n > 0 {
			last := &out[n-1]
			// Overlapping or adjacent (last.to+1 == r.from): extend.
			if next := last.to.Next(); !next.IsValid() || r.from.Compare(next) <= 0 {
				if r.to.Compare(last.to) > 0 {
					last.to = r.to
				}
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

// mergePorts does the same for port ranges.
func mergePorts(ps []PortRange) []PortRange {
	rs := slices.Clone(ps)
	for i, r := range rs {
		if r.From > r.To {
			rs[i] = PortRange{r.To, r.From}
		}
	}
	slices.SortFunc(rs, func(a, b PortRange) int {
		if a.From != b.From {
			return int(a.From) - int(b.From)
		}
		return int(b.To) - int(a.To)
	})
	var out []PortRange
	for _, r := range rs {
		if n := len(out); n > 0 {
			last := &out[n-1]
			if last.To == 65535 || uint32(r.From) <= uint32(last.To)+1 {
				last.To = max(last.To, r.To)
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

// String prints a range as a prefix when it is exactly one, else as
// from-to.
func (r addrRange) String() string {
	if p, ok := rangePrefix(r); ok {
		return nftPrefixText(p)
	}
	return r.from.String() + "-" + r.to.String()
}

// rangePrefix returns the prefix that covers exactly r, if there is one:
// from and to share their first n bits, and then from has only zeros and
// to only ones.
func rangePrefix(r addrRange) (netip.Prefix, bool) {
	f, t := r.from.AsSlice(), r.to.AsSlice()
	if len(f) != len(t) {
		return netip.Prefix{}, false
	}
	n := 0
	for n < 8*len(f) && bitAt(f, n) == bitAt(t, n) {
		n++
	}
	for i := n; i < 8*len(f); i++ {
		if bitAt(f, i) != 0 || bitAt(t, i) != 1 {
			return netip.Prefix{}, false
		}
	}
	return netip.PrefixFrom(r.from, n), true
}

func bitAt(b []byte, i int) byte { return b[i/8] >> (7 - i%8) & 1 }

// nftSetElementTexts lists a set's elements as nft prints them, after
// merging. Check compares these lines with the readback.
func nftSetElementTexts(s *Set) []string {
	var out []string
	if s.Type == SetPorts {
		for _, p := range mergePorts(s.Ports) {
			out = append(out, p.String())
		}
		return out
	}
	for _, r := range mergePrefixes(s.Prefixes) {
		out = append(out, r.String())
	}
	return out
}

// nftObjects is the ruleset as google/nftables objects, in the order
// Apply queues them: sets (with their elements), chains, then rules.
type nftObjects struct {
	Table  *nftables.Table
	Sets   []nftSetObj
	Chains []*nftables.Chain
	// Rules in order, each with Table, Chain, Exprs and UserData (the
	// comment) filled in.
	Rules []*nftables.Rule
}

type nftSetObj struct {
	Set      *nftables.Set
	Elements []nftables.SetElement
}

// nftCommentText is the comment we give a rule whose text is text: the
// text itself, minus the double quotes around interface names. nft has
// no escape for `"` inside a quoted string, so a comment holding one
// would make `nft list ruleset` print something `nft -f` cannot load
// back. Without the quotes the comment is still valid nft for any
// interface name that is not an nft keyword.
func nftCommentText(text string) string { return strings.ReplaceAll(text, `"`, "") }

// nftRuleComment encodes a rule comment as nft does (userdata TLV type
// 0, NUL-terminated), so `nft list` prints it.
func nftRuleComment(s string) []byte {
	return userdata.AppendString(nil, userdata.TypeComment, s)
}

// nftRuleCommentOf decodes it.
func nftRuleCommentOf(ud []byte) string {
	s, _ := userdata.GetString(ud, userdata.TypeComment)
	return s
}

// nftMaxComment is nft's limit on a comment (NFTNL_UDATA_COMMENT_MAXLEN).
const nftMaxComment = 128

// nftObjectsFor turns rs into google/nftables objects. It is pure: set
// IDs (which only need to be unique within one batch) are numbered from
// 1 in model order.
func nftObjectsFor(rs *Ruleset) (*nftObjects, error) {
	fam := nftTableFamily(rs.Families)
	inet := fam == nftables.TableFamilyINet
	table := &nftables.Table{Name: NFTTable, Family: fam}
	objs := &nftObjects{Table: table}

	setIDs := map[string]uint32{}
	setTypes := map[string]SetType{}
	for i, s := range rs.Sets {
		set := &nftables.Set{
			Table:    table,
			ID:       uint32(i + 1),
			Name:     s.Name,
			Interval: true,
			Comment:  nftSetComment,
		}
		switch s.Type {
		case SetIPv4:
			if fam == nftables.TableFamilyIPv6 {
				return nil, fmt.Errorf("set %s: IPv4 set in an ip6 table", s.Name)
			}
			set.KeyType = nftables.TypeIPAddr
		case SetIPv6:
			if fam == nftables.TableFamilyIPv4 {
				return nil, fmt.Errorf("set %s: IPv6 set in an ip table", s.Name)
			}
			set.KeyType = nftables.TypeIP6Addr
		case SetPorts:
			set.KeyType = nftables.TypeInetService
		default:
			return nil, fmt.Errorf("set %s: unknown set type %d", s.Name, s.Type)
		}
		set.KeyByteOrder = binaryutil.BigEndian
		objs.Sets = append(objs.Sets, nftSetObj{Set: set, Elements: nftSetElements(s)})
		setIDs[s.Name] = set.ID
		setTypes[s.Name] = s.Type
	}

	chains := map[string]*nftables.Chain{}
	for _, c := range rs.Chains {
		ch := &nftables.Chain{Name: c.Name, Table: table}
		if c.Hook != nil {
			switch c.Hook.Name {
			case "prerouting":
				ch.Hooknum = nftables.ChainHookPrerouting
			case "output":
				ch.Hooknum = nftables.ChainHookOutput
			default:
				return nil, fmt.Errorf("chain %s: unsupported hook %q", c.Name, c.Hook.Name)
			}
			ch.Priority = nftables.ChainPriorityRef(nftables.ChainPriority(c.Hook.Priority))
			ch.Type = nftables.ChainTypeNAT
			if c.Table != TableNAT {
				ch.Type = nftables.ChainTypeFilter
			}
			policy := nftables.ChainPolicyAccept
			ch.Policy = &policy
		}
		chains[c.Name] = ch
		objs.Chains = append(objs.Chains, ch)
	}

	for _, c := range rs.Chains {
		for i, r := range c.Rules {
			exprs, err := nftRuleExprs(r, fam, setIDs, setTypes)
			if err != nil {
				return nil, fmt.Errorf("chain %s rule %d (%s): %w", c.Name, i+1, nftRuleText(r, inet), err)
			}
			if r.Verdict.Kind == VerdictJump && chains[r.Verdict.Chain] == nil {
				return nil, fmt.Errorf("chain %s rule %d: jump to unknown chain %q", c.Name, i+1, r.Verdict.Chain)
			}
			text := nftCommentText(nftRuleText(r, inet))
			if len(text) > nftMaxComment {
				return nil, fmt.Errorf("chain %s rule %d: comment %q is longer than nft's %d-byte limit", c.Name, i+1, text, nftMaxComment)
			}
			objs.Rules = append(objs.Rules, &nftables.Rule{
				Table:    table,
				Chain:    chains[c.Name],
				Exprs:    exprs,
				UserData: nftRuleComment(text),
			})
		}
	}
	return objs, nil
}

// nftSetElements encodes a set's merged ranges the way nft does for an
// interval set:
//
//   - each range [from, to] is a start element `from` and an end element
//     `to+1` flagged NFT_SET_ELEM_INTERVAL_END;
//   - a range that reaches the top of the key space (255.255.255.255,
//     ffff:...:ffff, port 65535) has no end element: to+1 does not fit,
//     and an open start element matches up to the top;
//   - when the first range does not start at zero, nft opens the set with
//     an end element at zero. The kernel does not need it, but we send it
//     too, so the set reads back the same whichever tool wrote it.
//
// So 0.0.0.0/0 is the single start element 0.0.0.0.
func nftSetElements(s *Set) []nftables.SetElement {
	type kr struct{ from, end []byte } // end == nil: open to the top
	ks := make([]kr, 0, len(s.Prefixes)+len(s.Ports))
	var width int
	if s.Type == SetPorts {
		width = 2
		for _, p := range mergePorts(s.Ports) {
			k := kr{from: binary.BigEndian.AppendUint16(nil, p.From)}
			if p.To != 65535 {
				k.end = binary.BigEndian.AppendUint16(nil, p.To+1)
			}
			ks = append(ks, k)
		}
	} else {
		width = 4
		if s.Type == SetIPv6 {
			width = 16
		}
		for _, r := range mergePrefixes(s.Prefixes) {
			k := kr{from: r.from.AsSlice()}
			if next := r.to.Next(); next.IsValid() {
				k.end = next.AsSlice()
			}
			ks = append(ks, k)
		}
	}
	// SetElement is large: size the slice once.
	out := make([]nftables.SetElement, 0, 2*len(ks)+1)
	if len(ks) > 0 && !isZero(ks[0].from) {
		out = append(out, nftables.SetElement{Key: make([]byte, width), IntervalEnd: true})
	}
	for _, k := range ks {
		out = append(out, nftables.SetElement{Key: k.from})
		if k.end != nil {
			out = append(out, nftables.SetElement{Key: k.end, IntervalEnd: true})
		}
	}
	return out
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// nftElementTexts decodes interval-set elements (as read back from the
// kernel, in any order) into the texts nftSetElementTexts produces.
// Elements that do not form start/end pairs are reported verbatim so that
// Check names them.
func nftElementTexts(t SetType, elems []nftables.SetElement) []string {
	es := slices.Clone(elems)
	slices.SortStableFunc(es, func(a, b nftables.SetElement) int {
		if c := bytes.Compare(a.Key, b.Key); c != 0 {
			return c
		}
		// At the same key an end sorts before a start: [x, y) then [y, z).
		switch {
		case a.IntervalEnd && !b.IntervalEnd:
			return -1
		case !a.IntervalEnd && b.IntervalEnd:
			return 1
		}
		return 0
	})
	var out []string
	keyText := func(k []byte) string {
		switch t {
		case SetPorts:
			if len(k) == 2 {
				return strconv.Itoa(int(binary.BigEndian.Uint16(k)))
			}
		default:
			if a, ok := netip.AddrFromSlice(k); ok {
				return a.String()
			}
		}
		return fmt.Sprintf("%x", k)
	}
	for i := 0; i < len(es); i++ {
		e := es[i]
		if e.IntervalEnd {
			if isZero(e.Key) && i == 0 {
				continue // nft's leading end marker
			}
			out = append(out, "stray interval end "+keyText(e.Key))
			continue
		}
		var endKey []byte // exclusive end; nil means up to the top
		if i+1 < len(es) && es[i+1].IntervalEnd {
			endKey = es[i+1].Key
			i++
		} else if i+1 < len(es) {
			// Two starts in a row: the first one is unterminated and
			// would match up to the next start, which is not something we
			// write.
			out = append(out, "unterminated interval "+keyText(e.Key))
			continue
		}
		out = append(out, intervalText(t, e.Key, endKey))
	}
	return out
}

// intervalText prints [from, end) (end nil: to the top) like
// nftSetElementTexts.
func intervalText(t SetType, from, end []byte) string {
	if t == SetPorts {
		if len(from) != 2 || (end != nil && len(end) != 2) {
			return fmt.Sprintf("bad port interval %x-%x", from, end)
		}
		r := PortRange{From: binary.BigEndian.Uint16(from), To: 65535}
		if end != nil {
			r.To = binary.BigEndian.Uint16(end) - 1
		}
		return r.String()
	}
	f, ok := netip.AddrFromSlice(from)
	if !ok {
		return fmt.Sprintf("bad address interval %x-%x", from, end)
	}
	var to netip.Addr
	if end == nil {
		b := make([]byte, len(from))
		for i := range b {
			b[i] = 0xff
		}
		to, _ = netip.AddrFromSlice(b)
	} else {
		e, ok := netip.AddrFromSlice(end)
		if !ok || len(end) != len(from) {
			return fmt.Sprintf("bad address interval %x-%x", from, end)
		}
		to = e.Prev()
	}
	return addrRange{f, to}.String()
}

// Register 1 is the only data register we use; the verdict register is 0.
const nftReg = 1

// nftRuleExprs builds the expressions of one rule for a table of family
// fam. The comments show the matching `nft --debug=netlink` lines.
func nftRuleExprs(r Rule, fam nftables.TableFamily, setIDs map[string]uint32, setTypes map[string]SetType) ([]expr.Any, error) {
	var ex []expr.Any
	rf := ruleFamily(r)
	switch {
	case fam == nftables.TableFamilyIPv4 && rf == FamilyIPv6,
		fam == nftables.TableFamilyIPv6 && rf == FamilyIPv4:
		return nil, fmt.Errorf("rule of family %s in an %s table", nfprotoName(rf), nftFamilyName(fam))
	}
	if r.DstSet != "" {
		st, ok := setTypes[r.DstSet]
		if !ok {
			return nil, fmt.Errorf("unknown set %q", r.DstSet)
		}
		want := SetIPv4
		if rf == FamilyIPv6 {
			want = SetIPv6
		}
		if rf == FamilyAny || st != want {
			return nil, fmt.Errorf("address set %q does not match the rule's family", r.DstSet)
		}
	}

	// In an inet table a family-restricted rule first checks nfproto:
	// right before the address match, where nft puts the dependency, or
	// at the start when there is no address match. Same order as nft, so
	// a table loaded from RenderNFT by nft -f passes Check.
	hasAddr := r.Src != nil || r.Dst != nil || r.DstSet != ""
	var nfproto []expr.Any
	if fam == nftables.TableFamilyINet && rf != FamilyAny {
		proto := byte(unix.NFPROTO_IPV4)
		if rf == FamilyIPv6 {
			proto = unix.NFPROTO_IPV6
		}
		nfproto = []expr.Any{
			// [ meta load nfproto => reg 1 ]
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: nftReg},
			// [ cmp eq reg 1 0x00000002 ]  (0x0000000a for ipv6)
			&expr.Cmp{Op: expr.CmpOpEq, Register: nftReg, Data: []byte{proto}},
		}
	}
	if !hasAddr {
		ex = append(ex, nfproto...)
	}
	if r.IIF != "" {
		ex = append(ex,
			// [ meta load iifname => reg 1 ]
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: nftReg},
			// [ cmp eq reg 1 0x30687465 0x00000000 0x00000000 0x00000000 ]  ("eth0", NUL-padded to IFNAMSIZ)
			&expr.Cmp{Op: expr.CmpOpEq, Register: nftReg, Data: ifname(r.IIF)},
		)
	}
	if r.OIF != "" {
		ex = append(ex,
			// [ meta load oifname => reg 1 ]
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: nftReg},
			// [ cmp eq reg 1 0x00006f6c 0x00000000 0x00000000 0x00000000 ]  ("lo")
			&expr.Cmp{Op: expr.CmpOpEq, Register: nftReg, Data: ifname(r.OIF)},
		)
	}
	if r.CTInvalid {
		ex = append(ex,
			// [ ct load state => reg 1 ]
			&expr.Ct{Register: nftReg, Key: expr.CtKeySTATE},
			// [ bitwise reg 1 = ( reg 1 & 0x00000001 ) ^ 0x00000000 ]
			&expr.Bitwise{SourceRegister: nftReg, DestRegister: nftReg, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(1), Xor: binaryutil.NativeEndian.PutUint32(0)},
			// [ cmp neq reg 1 0x00000000 ]
			&expr.Cmp{Op: expr.CmpOpNeq, Register: nftReg, Data: binaryutil.NativeEndian.PutUint32(0)},
		)
	}
	if r.CTEstablished {
		ex = append(ex,
			// [ ct load state => reg 1 ]
			&expr.Ct{Register: nftReg, Key: expr.CtKeySTATE},
			// [ bitwise reg 1 = ( reg 1 & 0x00000006 ) ^ 0x00000000 ]  (established|related)
			&expr.Bitwise{SourceRegister: nftReg, DestRegister: nftReg, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(6), Xor: binaryutil.NativeEndian.PutUint32(0)},
			// [ cmp neq reg 1 0x00000000 ]
			&expr.Cmp{Op: expr.CmpOpNeq, Register: nftReg, Data: binaryutil.NativeEndian.PutUint32(0)},
		)
	}
	if hasAddr {
		ex = append(ex, nfproto...)
	}
	if r.Src != nil {
		ex = append(ex, addrMatch(*r.Src, false, false)...)
	}
	if r.Dst != nil {
		ex = append(ex, addrMatch(*r.Dst, true, r.DstNot)...)
	} else if r.DstSet != "" {
		off, n := uint32(16), uint32(4)
		if rf == FamilyIPv6 {
			off, n = 24, 16
		}
		ex = append(ex,
			// [ payload load 4b @ network header + 16 => reg 1 ]  (ip6: 16b @ + 24)
			&expr.Payload{DestRegister: nftReg, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
			// [ lookup reg 1 set out_exclude_v4 ]
			&expr.Lookup{SourceRegister: nftReg, SetName: r.DstSet, SetID: setIDs[r.DstSet], Invert: r.DstNot},
		)
	}

	proto := r.Proto
	if proto == ProtoAny && (r.DPort != nil || r.DPortSet != "") {
		return nil, fmt.Errorf("a port match needs a protocol")
	}
	if proto != ProtoAny {
		l4 := byte(unix.IPPROTO_TCP)
		if proto == ProtoUDP {
			l4 = unix.IPPROTO_UDP
		}
		ex = append(ex,
			// [ meta load l4proto => reg 1 ]
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: nftReg},
			// [ cmp eq reg 1 0x00000006 ]  (0x00000011 for udp)
			&expr.Cmp{Op: expr.CmpOpEq, Register: nftReg, Data: []byte{l4}},
		)
	}
	if r.SPort != nil {
		if proto == ProtoAny {
			return nil, fmt.Errorf("a port match needs a protocol")
		}
		// [ payload load 2b @ transport header + 0 => reg 1 ]
		ex = append(ex, &expr.Payload{DestRegister: nftReg, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2})
		if r.SPort.From == r.SPort.To {
			// [ cmp eq reg 1 0x00009d3a ]  (udp sport 15053)
			ex = append(ex, &expr.Cmp{Op: expr.CmpOpEq, Register: nftReg, Data: be16(r.SPort.From)})
		} else {
			ex = append(ex,
				&expr.Cmp{Op: expr.CmpOpGte, Register: nftReg, Data: be16(r.SPort.From)},
				&expr.Cmp{Op: expr.CmpOpLte, Register: nftReg, Data: be16(r.SPort.To)},
			)
		}
	}
	// One load and compare per port, as nft itself compiles
	// "tcp dport != 53 tcp dport != 15008".
	for _, port := range r.DPortsNot {
		ex = append(ex,
			// [ payload load 2b @ transport header + 2 => reg 1 ]
			&expr.Payload{DestRegister: nftReg, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			// [ cmp neq reg 1 0x00003500 ]  (dport != 53)
			&expr.Cmp{Op: expr.CmpOpNeq, Register: nftReg, Data: be16(port)},
		)
	}
	if r.DPort != nil || r.DPortSet != "" {
		// tcp and udp both keep the destination port at offset 2.
		// [ payload load 2b @ transport header + 2 => reg 1 ]
		ex = append(ex, &expr.Payload{DestRegister: nftReg, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2})
		switch {
		case r.DPortSet != "":
			if st, ok := setTypes[r.DPortSet]; !ok || st != SetPorts {
				return nil, fmt.Errorf("unknown port set %q", r.DPortSet)
			}
			// [ lookup reg 1 set in_exclude_ports ]
			ex = append(ex, &expr.Lookup{SourceRegister: nftReg, SetName: r.DPortSet, SetID: setIDs[r.DPortSet], Invert: r.DPortNot})
		case r.DPort.From == r.DPort.To:
			op := expr.CmpOpEq
			if r.DPortNot {
				op = expr.CmpOpNeq
			}
			// [ cmp neq reg 1 0x0000503a ]  (tcp dport != 15008)
			ex = append(ex, &expr.Cmp{Op: op, Register: nftReg, Data: be16(r.DPort.From)})
		case r.DPortNot:
			// [ range neq reg 1 0x0000e803 0x0000d007 ]  (tcp dport != 1000-2000)
			ex = append(ex, &expr.Range{Op: expr.CmpOpNeq, Register: nftReg, FromData: be16(r.DPort.From), ToData: be16(r.DPort.To)})
		default:
			ex = append(ex,
				// [ cmp gte reg 1 0x0000e803 ]
				&expr.Cmp{Op: expr.CmpOpGte, Register: nftReg, Data: be16(r.DPort.From)},
				// [ cmp lte reg 1 0x0000d007 ]
				&expr.Cmp{Op: expr.CmpOpLte, Register: nftReg, Data: be16(r.DPort.To)},
			)
		}
	}
	if r.UID != nil {
		ex = append(ex, metaU32(expr.MetaKeySKUID, r.UIDNot, *r.UID)...)
	}
	if r.GID != nil {
		ex = append(ex, metaU32(expr.MetaKeySKGID, r.GIDNot, *r.GID)...)
	}
	for _, g := range r.GIDsNot {
		ex = append(ex, metaU32(expr.MetaKeySKGID, true, g)...)
	}
	if r.Mark != nil {
		ex = append(ex, metaU32(expr.MetaKeyMARK, r.MarkNot, *r.Mark)...)
	}
	if r.ConnMark != nil {
		ex = append(ex,
			// [ ct load mark => reg 1 ]
			&expr.Ct{Key: expr.CtKeyMARK, Register: nftReg},
			// [ cmp eq reg 1 0x00000539 ]
			&expr.Cmp{Op: expr.CmpOpEq, Register: nftReg, Data: binaryutil.NativeEndian.PutUint32(*r.ConnMark)},
		)
	}

	switch r.Verdict.Kind {
	case VerdictReturn:
		// [ immediate reg 0 return ]
		ex = append(ex, &expr.Verdict{Kind: expr.VerdictReturn})
	case VerdictDrop:
		// [ immediate reg 0 drop ]
		ex = append(ex, &expr.Verdict{Kind: expr.VerdictDrop})
	case VerdictAccept:
		// [ immediate reg 0 accept ]
		ex = append(ex, &expr.Verdict{Kind: expr.VerdictAccept})
	case VerdictSetMark:
		ex = append(ex,
			// [ immediate reg 1 0x0000053a ]
			&expr.Immediate{Register: nftReg, Data: binaryutil.NativeEndian.PutUint32(r.Verdict.Mark)},
			// [ meta set mark with reg 1 ]
			&expr.Meta{Key: expr.MetaKeyMARK, Register: nftReg, SourceRegister: true},
		)
	case VerdictConnmarkSave:
		ex = append(ex,
			// [ meta load mark => reg 1 ]
			&expr.Meta{Key: expr.MetaKeyMARK, Register: nftReg},
			// [ ct set mark with reg 1 ]
			&expr.Ct{Key: expr.CtKeyMARK, Register: nftReg, SourceRegister: true},
		)
	case VerdictConnmarkRestore:
		ex = append(ex,
			// [ ct load mark => reg 1 ]
			&expr.Ct{Key: expr.CtKeyMARK, Register: nftReg},
			// [ meta set mark with reg 1 ]
			&expr.Meta{Key: expr.MetaKeyMARK, Register: nftReg, SourceRegister: true},
		)
	case VerdictTProxy:
		tfam := byte(unix.NFPROTO_IPV4)
		if rf == FamilyIPv6 {
			tfam = unix.NFPROTO_IPV6
		}
		ex = append(ex,
			// [ immediate reg 1 0x00003a98 ]  (15006)
			&expr.Immediate{Register: nftReg, Data: be16(r.Verdict.Port)},
			// [ tproxy ip port reg 1 ]
			&expr.TProxy{Family: tfam, TableFamily: byte(fam), RegPort: nftReg},
			// [ immediate reg 1 0x00000539 ]
			&expr.Immediate{Register: nftReg, Data: binaryutil.NativeEndian.PutUint32(r.Verdict.Mark)},
			// [ meta set mark with reg 1 ]
			&expr.Meta{Key: expr.MetaKeyMARK, Register: nftReg, SourceRegister: true},
			// [ immediate reg 0 accept ]
			&expr.Verdict{Kind: expr.VerdictAccept},
		)
	case VerdictCTZone:
		ex = append(ex,
			// [ immediate reg 1 0x00000001 ]
			&expr.Immediate{Register: nftReg, Data: binaryutil.NativeEndian.PutUint16(r.Verdict.Zone)},
			// [ ct set zone with reg 1 ]
			&expr.Ct{Key: expr.CtKeyZONE, Register: nftReg, SourceRegister: true},
		)
	case VerdictJump:
		// [ immediate reg 0 jump -> ISTIO_OUTPUT ]
		ex = append(ex, &expr.Verdict{Kind: expr.VerdictJump, Chain: r.Verdict.Chain})
	case VerdictRedirect:
		if proto == ProtoAny {
			return nil, fmt.Errorf("redirect to a port needs a tcp or udp match")
		}
		ex = append(ex,
			// [ immediate reg 1 0x0000993a ]  (15001)
			&expr.Immediate{Register: nftReg, Data: be16(r.Verdict.Port)},
			// [ redir proto_min reg 1 proto_max reg 1 flags 0x2 ]  (NF_NAT_RANGE_PROTO_SPECIFIED)
			// The kernel fills proto_max with proto_min when it is absent
			// and dumps both, so we send both and the readback compares
			// equal.
			&expr.Redir{RegisterProtoMin: nftReg, RegisterProtoMax: nftReg, Flags: unix.NF_NAT_RANGE_PROTO_SPECIFIED},
		)
	default:
		return nil, fmt.Errorf("rule has no verdict")
	}
	return ex, nil
}

// addrMatch matches the source or destination address against p. Like
// nft, a byte-aligned prefix loads only its leading bytes; other prefixes
// are masked. A /0 matches every address of the family and needs no
// expression beyond the family check.
func addrMatch(p netip.Prefix, dst, not bool) []expr.Any {
	p = p.Masked()
	off := uint32(12) // ip saddr
	if p.Addr().Is6() {
		off = 8 // ip6 saddr
	}
	if dst {
		off += uint32(p.Addr().BitLen() / 8) // ip daddr at 16, ip6 daddr at 24
	}
	op := expr.CmpOpEq
	if not {
		op = expr.CmpOpNeq
	}
	bits := p.Bits()
	if bits == 0 {
		if not {
			// "!= 0.0.0.0/0" matches nothing. Build never asks for it;
			// if it ever does, compare nfproto with 0, which no packet
			// has, rather than silently matching everything.
			// [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x00000000 ]
			return []expr.Any{
				&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: nftReg},
				&expr.Cmp{Op: expr.CmpOpEq, Register: nftReg, Data: []byte{0}},
			}
		}
		return nil
	}
	addr := p.Addr().AsSlice()
	if bits%8 == 0 {
		n := uint32(bits / 8)
		return []expr.Any{
			// [ payload load 4b @ network header + 16 => reg 1 ]  (1b for a /8)
			&expr.Payload{DestRegister: nftReg, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
			// [ cmp eq reg 1 0x0100007f ]
			&expr.Cmp{Op: op, Register: nftReg, Data: addr[:n]},
		}
	}
	n := uint32(len(addr))
	mask := make([]byte, n)
	for i := range bits {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return []expr.Any{
		// [ payload load 4b @ network header + 16 => reg 1 ]
		&expr.Payload{DestRegister: nftReg, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
		// [ bitwise reg 1 = ( reg 1 & 0x00f0ffff ) ^ 0x00000000 ]  (a /20)
		&expr.Bitwise{SourceRegister: nftReg, DestRegister: nftReg, Len: n, Mask: mask, Xor: make([]byte, n)},
		// [ cmp eq reg 1 0x0000010a ]
		&expr.Cmp{Op: op, Register: nftReg, Data: addr},
	}
}

func ifname(s string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, s)
	return b
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

// metaU32 compares a 32-bit meta key (skuid, skgid, mark; host byte
// order) with v, equal or, with not, different:
// [ meta load skuid => reg 1 ] [ cmp eq reg 1 0x00000539 ]  (1337)
func metaU32(key expr.MetaKey, not bool, v uint32) []expr.Any {
	op := expr.CmpOpEq
	if not {
		op = expr.CmpOpNeq
	}
	return []expr.Any{
		&expr.Meta{Key: key, Register: nftReg},
		&expr.Cmp{Op: op, Register: nftReg, Data: binaryutil.NativeEndian.PutUint32(v)},
	}
}

// nftChainType is a base chain's type: nat for the nat table's hooks,
// filter for raw's and mangle's.
func nftChainType(c *Chain) string {
	if c.Table == TableNAT {
		return "nat"
	}
	return "filter"
}
