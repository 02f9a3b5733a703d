package node

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Everything here works on the network namespace of the calling OS
// thread; wrap calls in netns.Do to target another one.

var (
	inetTable   = &nftables.Table{Name: Table, Family: nftables.TableFamilyINet}
	bridgeTable = &nftables.Table{Name: Table, Family: nftables.TableFamilyBridge}
)

func gatewaySet(t *nftables.Table, v6 bool) *nftables.Set {
	if v6 {
		return &nftables.Set{Table: t, Name: SetGatewaysV6, KeyType: nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIP6Addr), Concatenation: true}
	}
	return &nftables.Set{Table: t, Name: SetGatewaysV4, KeyType: nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIPAddr), Concatenation: true}
}

func allowSet(v6 bool) *nftables.Set {
	if v6 {
		return &nftables.Set{Table: inetTable, Name: SetAllowV6, KeyType: nftables.TypeIP6Addr, Interval: true, Comment: formatComment}
	}
	return &nftables.Set{Table: inetTable, Name: SetAllowV4, KeyType: nftables.TypeIPAddr, Interval: true, Comment: formatComment}
}

// formatComment records the layout version of the node tables.
var formatComment = fmt.Sprintf("egress-cni node format %d", rules.FormatVersion)

func splitFamilies(ps []netip.Prefix) (v4, v6 []netip.Prefix) {
	for _, p := range ps {
		if p.Addr().Is4() {
			v4 = append(v4, p)
		} else {
			v6 = append(v6, p)
		}
	}
	return v4, v6
}

func tableOf(f nftables.TableFamily) *nftables.Table {
	if f == nftables.TableFamilyBridge {
		return bridgeTable
	}
	return inetTable
}

// Apply programs the node rules in one netlink batch. It is idempotent
// and coexists with everything else: it only touches our two tables.
// Gateway membership is kept: re-applying the rules never drops a
// gateway, so it needs no lock against concurrent CNI ADDs.
func Apply(cfg *Config) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	p := newProgram(cfg)

	// Chains of ours that the new program no longer has (an egress node
	// turned into an app node loses its NAT chain).
	existing, err := c.ListChains()
	if err != nil {
		return fmt.Errorf("could not list nftables chains: %w", err)
	}

	c.AddTable(inetTable)
	c.AddTable(bridgeTable)
	v4, v6 := splitFamilies(cfg.Allowed)
	for _, s := range []struct {
		set *nftables.Set
		ps  []netip.Prefix
	}{{allowSet(false), v4}, {allowSet(true), v6}} {
		if err := c.AddSet(s.set, nil); err != nil {
			return fmt.Errorf("could not add set %s: %w", s.set.Name, err)
		}
		c.FlushSet(s.set)
		if els := rules.NFTIntervalElements(allowModel(s.set, s.ps)); len(els) > 0 {
			if err := c.SetAddElements(s.set, els); err != nil {
				return fmt.Errorf("could not add elements to set %s: %w", s.set.Name, err)
			}
		}
	}
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		for _, v6 := range []bool{false, true} {
			if err := c.AddSet(gatewaySet(t, v6), nil); err != nil {
				return fmt.Errorf("could not add gateway set: %w", err)
			}
		}
	}
	c.AddObj(&nftables.CounterObj{Table: inetTable, Name: CounterDropped})
	for _, ch := range existing {
		if ch.Table == nil || ch.Table.Name != Table {
			continue
		}
		if !slices.ContainsFunc(p.chains, func(s *chainSpec) bool { return s.name == ch.Name && s.family == ch.Table.Family }) {
			c.FlushChain(ch)
			c.DelChain(ch)
		}
	}
	// Regular chains must exist before rules jump to them: add every
	// chain first, then the rules.
	chains := map[*chainSpec]*nftables.Chain{}
	for _, s := range p.chains {
		ch := &nftables.Chain{Table: tableOf(s.family), Name: s.name}
		if s.hook != nil {
			prio := nftables.ChainPriority(s.prio)
			ch.Hooknum, ch.Priority, ch.Type = s.hook, &prio, s.typ
			policy := nftables.ChainPolicyAccept
			ch.Policy = &policy
		}
		chains[s] = c.AddChain(ch)
		c.FlushChain(ch)
	}
	for _, s := range p.chains {
		for _, r := range s.rules {
			c.AddRule(&nftables.Rule{Table: tableOf(s.family), Chain: chains[s], Exprs: r.exprs,
				UserData: userdata.AppendString(nil, userdata.TypeComment, r.String())})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("could not apply node rules (nothing was changed): %w", err)
	}
	return nil
}

// Remove deletes our tables, with their gateway sets and counters, and
// nothing else. It succeeds when they are absent.
func Remove() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	n := 0
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		if _, err := c.ListTableOfFamily(t.Name, t.Family); err != nil {
			if errors.Is(err, unix.ENOENT) || strings.Contains(err.Error(), "no such file") {
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
// *rules.DriftError naming what differs. Gateway membership is dynamic
// and not compared.
func Check(cfg *Config) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	p := newProgram(cfg)
	var want, have []string
	live, err := c.ListChains()
	if err != nil {
		return fmt.Errorf("could not list chains: %w", err)
	}
	for _, ch := range live {
		if ch.Table != nil && ch.Table.Name == Table {
			fam := familyName(ch.Table.Family)
			rs, err := c.GetRules(ch.Table, ch)
			if err != nil {
				return fmt.Errorf("could not list rules of chain %s: %w", ch.Name, err)
			}
			for _, r := range rs {
				text, _ := userdata.GetString(r.UserData, userdata.TypeComment)
				have = append(have, fmt.Sprintf("%s %s: %s", fam, ch.Name, text))
			}
			if len(rs) == 0 {
				have = append(have, fmt.Sprintf("%s %s: (chain)", fam, ch.Name))
			}
		}
	}
	for _, s := range p.chains {
		for _, r := range s.rules {
			want = append(want, fmt.Sprintf("%s %s: %s", familyName(s.family), s.name, r))
		}
	}
	slices.Sort(want)
	slices.Sort(have)
	v4s, v6s := splitFamilies(cfg.Allowed)
	for _, v6 := range []bool{false, true} {
		s, ps := allowSet(v6), v4s
		if v6 {
			ps = v6s
		}
		m := allowModel(s, ps)
		for _, e := range rules.NFTSetElementTexts(m) {
			want = append(want, fmt.Sprintf("set %s: %s", s.Name, e))
		}
		live, err := c.GetSetByName(inetTable, s.Name)
		if err != nil {
			continue // reported as missing elements (and rules)
		}
		els, err := c.GetSetElements(live)
		if err != nil {
			return fmt.Errorf("could not list set %s: %w", s.Name, err)
		}
		for _, e := range rules.NFTElementTexts(m.Type, els) {
			have = append(have, fmt.Sprintf("set %s: %s", s.Name, e))
		}
	}
	return rules.DiffLines("nftables node", want, have)
}

// allowModel is an allow set as the pod layer's set model, for the
// shared interval encoding.
func allowModel(s *nftables.Set, ps []netip.Prefix) *rules.Set {
	t := rules.SetIPv4
	if s.KeyType == nftables.TypeIP6Addr {
		t = rules.SetIPv6
	}
	return &rules.Set{Name: s.Name, Type: t, Prefixes: ps}
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

// DropCounter reads the drop counter.
func DropCounter() (packets, bytes uint64, err error) {
	c, err := nftables.New()
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
