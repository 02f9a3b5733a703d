package node

import (
	"fmt"
	"slices"

	"github.com/google/nftables"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Everything here works on the network namespace of the calling OS
// thread; wrap calls in netns.Do to target another one. The socket,
// chunking, comment and readback plumbing is the pod layer's
// (pkg/rules), so both layers talk to the kernel the same way.

var (
	inetTable   = &nftables.Table{Name: Table, Family: nftables.TableFamilyINet}
	bridgeTable = &nftables.Table{Name: Table, Family: nftables.TableFamilyBridge}
)

// FormatVersion is the layout version of the node tables, recorded in
// the comment of the allow sets. 1 was the interface-pattern layout; 2
// judges at the exit by connection and validates every pod's source.
const FormatVersion = 2

var formatComment = fmt.Sprintf("egress-cni node format %d", FormatVersion)

func tableOf(f nftables.TableFamily) *nftables.Table {
	if f == nftables.TableFamilyBridge {
		return bridgeTable
	}
	return inetTable
}

// allowElements are the interval elements of an allow set.
func (p *program) allowElements(s *setSpec) []nftables.SetElement {
	return rules.NFTIntervalElements(p.allowModel(s))
}

func (p *program) allowModel(s *setSpec) *rules.Set {
	v4, v6 := splitFamilies(p.cfg.Allowed)
	if s.name == SetAllowV6 {
		return &rules.Set{Name: s.name, Type: rules.SetIPv6, Prefixes: v6}
	}
	return &rules.Set{Name: s.name, Type: rules.SetIPv4, Prefixes: v4}
}

func (p *program) batchSize() int {
	n := 64 << 10
	for _, s := range p.sets {
		if s.static {
			n += rules.NFTElementBytes * len(p.allowElements(s))
		}
	}
	for _, c := range p.chains {
		n += 1024 * len(c.rules)
	}
	return n
}

// nftConn opens the netlink connections of this file (rules.NFTConn).
// batch_linux_test.go replaces it with a rules.NFTRecorder's, a
// nftables.WithTestDial connection, to read Apply's batch without root.
var nftConn = rules.NFTConn

func counters() []*nftables.CounterObj {
	out := []*nftables.CounterObj{
		{Table: inetTable, Name: CounterDropped},
		{Table: inetTable, Name: CounterForged},
		{Table: bridgeTable, Name: CounterForged},
		{Table: bridgeTable, Name: CounterDropped},
	}
	for _, a := range auditSpecs {
		for _, f := range a.families {
			out = append(out, &nftables.CounterObj{Table: tableOf(a.family), Name: ReasonCounter(a.reason, f)})
		}
	}
	return out
}

// Apply programs the node rules in one netlink batch: the kernel applies
// all of it or none. It is idempotent and only touches our two tables.
// Per-pod elements (sources, addresses, gateways) are kept: re-applying
// never drops a pod's registration, so it needs no lock against
// concurrent CNI ADDs. Chains and sets of ours that the program no
// longer has (an older format, or an egress node turned app node) are
// removed in the same batch.
func Apply(cfg *Config) error {
	p := newProgram(cfg)
	c, err := nftConn(p.batchSize())
	if err != nil {
		return fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()

	existing, err := c.ListChains()
	if err != nil {
		return fmt.Errorf("could not list nftables chains: %w", err)
	}
	var oldSets []*nftables.Set
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		ss, err := c.GetSets(t)
		if err != nil && !rules.IsNFTNotFound(err) {
			return fmt.Errorf("could not list sets of table %s %s: %w", familyName(t.Family), Table, err)
		}
		oldSets = append(oldSets, ss...)
	}

	var ours []*nftables.Chain
	format1 := false
	for _, ch := range existing {
		if ch.Table != nil && ch.Table.Name == Table {
			ours = append(ours, ch)
		}
	}
	// A namespace with our tables but without the source chain holds
	// the format-1 layout (interface patterns, a packet mark, gateway
	// sets of another shape): replace both tables whole, in this batch.
	if len(ours) > 0 && !slices.ContainsFunc(ours, func(ch *nftables.Chain) bool { return ch.Name == ChainSource }) {
		format1 = true
		for _, t := range []*nftables.Table{inetTable, bridgeTable} {
			c.AddTable(t)
			c.DelTable(t)
		}
		ours, oldSets = nil, nil
	}
	c.AddTable(inetTable)
	c.AddTable(bridgeTable)
	// Old rules go first, so that nothing references a set we delete.
	for _, ch := range ours {
		c.FlushChain(ch)
	}
	for _, ch := range ours {
		// Gone from the program, or a base chain that is now a regular
		// one (or the other way round): deleted, and re-added below.
		if !slices.ContainsFunc(p.chains, func(s *chainSpec) bool {
			return s.name == ch.Name && s.family == ch.Table.Family && (s.hook == nil) == (ch.Hooknum == nil)
		}) {
			c.DelChain(ch)
		}
	}
	for _, s := range oldSets {
		if s.Anonymous {
			continue
		}
		if !slices.ContainsFunc(p.sets, func(w *setSpec) bool { return w.name == s.Name && w.table.Family == s.Table.Family }) {
			c.DelSet(s)
		}
	}
	for _, s := range p.sets {
		set := s.set()
		if err := c.AddSet(set, nil); err != nil {
			return fmt.Errorf("could not add set %s: %w", s.name, err)
		}
		if !s.static {
			continue
		}
		c.FlushSet(set)
		if err := rules.NFTQueueElements(c, set, p.allowElements(s)); err != nil {
			return fmt.Errorf("could not add elements to set %s: %w", s.name, err)
		}
	}
	for _, o := range counters() {
		c.AddObj(o)
	}
	// Regular chains would have to exist before rules jump to them; all
	// of ours are base chains, added before any rule.
	chains := map[*chainSpec]*nftables.Chain{}
	for _, s := range p.chains {
		chains[s] = c.AddChain(s.chain())
	}
	for _, s := range p.chains {
		for _, r := range s.rules {
			c.AddRule(&nftables.Rule{Table: tableOf(s.family), Chain: chains[s], Exprs: r.exprs, UserData: rules.NFTRuleComment(r.String())})
		}
	}
	if err := c.Flush(); err != nil {
		what := "node rules"
		if format1 {
			what = "node rules over the format-1 tables"
		}
		return fmt.Errorf("could not apply %s (nothing was changed): %w", what, err)
	}
	return nil
}

func (s *chainSpec) chain() *nftables.Chain {
	ch := &nftables.Chain{Table: tableOf(s.family), Name: s.name}
	if s.hook != nil {
		prio := nftables.ChainPriority(s.prio)
		ch.Hooknum, ch.Priority, ch.Type = s.hook, &prio, s.typ
		policy := nftables.ChainPolicyAccept
		if s.drop {
			policy = nftables.ChainPolicyDrop
		}
		ch.Policy = &policy
	}
	return ch
}

// ApplyFailClosed replaces the node tables with ones that forward
// nothing: the inet table's forward base chain and the bridge table's,
// policy drop, without rules, and the source and output checks that need
// no config (failClosedChains). It is what boot-apply leaves when it
// cannot apply the node config: the node then forwards no packet at all,
// cluster traffic included, instead of forwarding unjudged, until Apply
// replaces it (the agent, or an ADD, which finds no rules of ours and
// applies its copy; Apply takes a table without the source chain for an
// older layout and replaces both tables whole). The node's own traffic
// (output) is not affected.
func ApplyFailClosed() error {
	c, err := nftConn(0)
	if err != nil {
		return fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		c.AddTable(t) // makes the delete valid whether or not it exists
		c.DelTable(t)
	}
	c.AddTable(inetTable)
	c.AddTable(bridgeTable)
	for _, s := range failClosedChains() {
		ch := c.AddChain(s.chain())
		for _, r := range s.rules {
			c.AddRule(&nftables.Rule{Table: tableOf(s.family), Chain: ch, Exprs: r.exprs, UserData: rules.NFTRuleComment(r.String())})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("could not apply the fail-closed node table: %w", err)
	}
	return nil
}

// Remove deletes our tables, with their sets and counters, and nothing
// else. It succeeds when they are absent.
func Remove() error {
	c, err := nftConn(0)
	if err != nil {
		return fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	n := 0
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		if _, err := c.ListTableOfFamily(t.Name, t.Family); err != nil {
			if rules.IsNFTNotFound(err) {
				continue
			}
			return fmt.Errorf("could not look up table %s: %w", t.Name, err)
		}
		c.DelTable(t)
		n++
	}
	if n == 0 {
		return nil
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("could not remove node tables: %w", err)
	}
	return nil
}

// Check compares the live node rules with cfg and returns a
// *rules.DriftError naming what differs: chains with their hooks and
// priorities, every rule by its comment AND its expressions (a rule
// replaced under the same comment is reported), the sets and their key
// types, the allow sets' elements and the counters. Per-pod elements are
// dynamic and not compared.
func Check(cfg *Config) error {
	p := newProgram(cfg)
	c, err := nftConn(p.batchSize())
	if err != nil {
		return fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	// Chains, sets and counters are compared as sorted lines; rules
	// chain by chain, in order, since order is meaning.
	var want, have, wantRules, haveRules []string
	for _, s := range p.chains {
		want = append(want, chainLine(s.family, s.name, s.baseText()))
		for _, r := range s.rules {
			wantRules = append(wantRules, ruleLine(s.family, s.name, ruleComment(r)))
		}
	}
	live, err := c.ListChains()
	if err != nil {
		return fmt.Errorf("could not list chains: %w", err)
	}
	var ours []*nftables.Chain
	for _, ch := range live {
		if ch.Table != nil && ch.Table.Name == Table {
			ours = append(ours, ch)
			have = append(have, chainLine(ch.Table.Family, ch.Name, liveBaseText(ch)))
		}
	}
	// The program's chains first, in program order, then any other.
	rank := func(ch *nftables.Chain) int {
		for i, s := range p.chains {
			if s.name == ch.Name && s.family == ch.Table.Family {
				return i
			}
		}
		return len(p.chains)
	}
	slices.SortStableFunc(ours, func(a, b *nftables.Chain) int { return rank(a) - rank(b) })
	for _, ch := range ours {
		var spec *chainSpec
		if i := rank(ch); i < len(p.chains) {
			spec = p.chains[i]
		}
		rs, err := c.GetRules(ch.Table, ch)
		if err != nil {
			return fmt.Errorf("could not list rules of chain %s: %w", ch.Name, err)
		}
		for i, r := range rs {
			text := rules.NFTRuleCommentOf(r.UserData)
			if text == "" {
				text = fmt.Sprintf("rule handle %d without comment", r.Handle)
			} else if spec != nil && i < len(spec.rules) && ruleComment(spec.rules[i]) == text &&
				!rules.NFTExprsEqual(ch.Table.Family, spec.rules[i].exprs, r.Exprs) {
				text += fmt.Sprintf(" (handle %d: expressions differ)", r.Handle)
			}
			haveRules = append(haveRules, ruleLine(ch.Table.Family, ch.Name, text))
		}
	}

	for _, s := range p.sets {
		want = append(want, setLine(s.table.Family, s.name, s.keyType.Name))
		if s.static {
			for _, e := range rules.NFTSetElementTexts(p.allowModel(s)) {
				want = append(want, fmt.Sprintf("set %s element %s", s.name, e))
			}
		}
	}
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		sets, err := c.GetSets(t)
		if rules.IsNFTNotFound(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("could not list sets of table %s %s: %w", familyName(t.Family), Table, err)
		}
		for _, s := range sets {
			if s.Anonymous {
				continue
			}
			have = append(have, setLine(t.Family, s.Name, s.KeyType.Name))
			if s.Name != SetAllowV4 && s.Name != SetAllowV6 {
				continue
			}
			els, err := c.GetSetElements(s)
			if err != nil {
				return fmt.Errorf("could not list set %s: %w", s.Name, err)
			}
			typ := rules.SetIPv4
			if s.Name == SetAllowV6 {
				typ = rules.SetIPv6
			}
			for _, e := range rules.NFTElementTexts(typ, els) {
				have = append(have, fmt.Sprintf("set %s element %s", s.Name, e))
			}
		}
	}
	for _, o := range counters() {
		want = append(want, counterLine(o.Table.Family, o.Name))
		objs, err := c.GetObj(&nftables.CounterObj{Table: o.Table, Name: o.Name})
		if err != nil && !rules.IsNFTNotFound(err) {
			return fmt.Errorf("could not read counter %s: %w", o.Name, err)
		}
		for _, ob := range objs {
			if co, ok := ob.(*nftables.CounterObj); ok && co.Name == o.Name {
				have = append(have, counterLine(o.Table.Family, o.Name))
			}
		}
	}
	slices.Sort(want)
	slices.Sort(have)
	return rules.DiffLines("nftables node", append(want, wantRules...), append(have, haveRules...))
}

func ruleComment(r *rule) string { return rules.NFTRuleCommentOf(rules.NFTRuleComment(r.String())) }

func chainLine(f nftables.TableFamily, name, base string) string {
	return fmt.Sprintf("%s chain %s: %s", familyName(f), name, base)
}

func ruleLine(f nftables.TableFamily, chain, text string) string {
	return fmt.Sprintf("%s chain %s rule: %s", familyName(f), chain, text)
}

func setLine(f nftables.TableFamily, name, typ string) string {
	return fmt.Sprintf("%s set %s: type %s", familyName(f), name, typ)
}

func counterLine(f nftables.TableFamily, name string) string {
	return fmt.Sprintf("%s counter %s", familyName(f), name)
}

func liveBaseText(ch *nftables.Chain) string {
	if ch.Hooknum == nil || ch.Priority == nil {
		return ""
	}
	s := &chainSpec{hook: hookOf(*ch.Hooknum), prio: int32(*ch.Priority), typ: ch.Type, drop: ch.Policy != nil && *ch.Policy == nftables.ChainPolicyDrop}
	return s.baseText()
}

func hookOf(h nftables.ChainHook) *nftables.ChainHook {
	for _, k := range []*nftables.ChainHook{nftables.ChainHookPrerouting, nftables.ChainHookForward, nftables.ChainHookPostrouting,
		nftables.ChainHookInput, nftables.ChainHookOutput} {
		if *k == h {
			return k
		}
	}
	return nil
}

func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyBridge:
		return "bridge"
	case nftables.TableFamilyINet:
		return "inet"
	}
	return fmt.Sprint(f)
}

// Counters are the node's drop counters, in packets.
type Counters struct {
	// Dropped: toward the outside, at the exit.
	Dropped uint64
	// Forged: a source its interface may not use, in the inet and the
	// bridge table together.
	Forged uint64
	// ByReason: every drop by reason and family (FamilyIPv4, …), both
	// tables added up. Kernel counters: exact, not sampled.
	ByReason map[Reason]map[string]uint64
}

// ReadCounters reads the drop counters.
func ReadCounters() (Counters, error) {
	c, err := nftConn(0)
	if err != nil {
		return Counters{}, fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	out := Counters{ByReason: map[Reason]map[string]uint64{}}
	// One dump per table: the counters of the two tables by name.
	have := map[nftables.TableFamily]map[string]uint64{}
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		objs, err := c.GetObjects(t)
		if err != nil {
			if rules.IsNFTNotFound(err) {
				return Counters{}, fmt.Errorf("table %s %s not found: %w", familyName(t.Family), Table, ErrNotApplied)
			}
			return Counters{}, fmt.Errorf("could not read the counters of table %s %s: %w", familyName(t.Family), Table, err)
		}
		have[t.Family] = map[string]uint64{}
		for _, ob := range objs {
			if co, ok := ob.(*nftables.CounterObj); ok {
				have[t.Family][co.Name] = co.Packets
			}
		}
	}
	for _, o := range counters() {
		n, ok := have[o.Table.Family][o.Name]
		if !ok {
			return Counters{}, fmt.Errorf("counter %s not found: %w", o.Name, ErrNotApplied)
		}
		switch o.Name {
		case CounterDropped:
			out.Dropped += n
		case CounterForged:
			out.Forged += n
		}
	}
	for _, a := range auditSpecs {
		for _, f := range a.families {
			if out.ByReason[a.reason] == nil {
				out.ByReason[a.reason] = map[string]uint64{}
			}
			out.ByReason[a.reason][f] += have[a.family][ReasonCounter(a.reason, f)]
		}
	}
	return out, nil
}

// DropCounter reads the exit's drop counter.
func DropCounter() (packets, bytes uint64, err error) {
	c, err := nftConn(0)
	if err != nil {
		return 0, 0, fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	objs, err := c.GetObj(&nftables.CounterObj{Table: inetTable, Name: CounterDropped})
	if err != nil {
		return 0, 0, fmt.Errorf("could not read counter %s: %w", CounterDropped, err)
	}
	for _, o := range objs {
		if co, ok := o.(*nftables.CounterObj); ok && co.Name == CounterDropped {
			return co.Packets, co.Bytes, nil
		}
	}
	return 0, 0, fmt.Errorf("counter %s not found: node rules are not applied", CounterDropped)
}
