package rules

// The nftables backend talks netlink directly through google/nftables:
// no nft binary is needed at runtime, so the init image stays minimal and
// the host's nft version does not matter.
//
// Apply sends ONE batch (one Conn.Flush) that
//
//  1. removes our table from every family where a prior read
//     (ListTables) found it: "add table egress_cni; delete table
//     egress_cni". "add" does not fail when the table exists, and makes
//     the "delete" valid even if the table vanished since the read;
//  2. adds the table in the family we want, then the sets and their
//     elements, the chains, and the rules.
//
// When the read found no table of ours (the first ADD in a fresh pod
// namespace, the hot path), step 1 is empty and the table is created
// with NLM_F_EXCL: if another writer created it in between, the batch
// fails as a whole, and Apply retries once with step 1 for every family.
// Skipping deletes is not cosmetic: on Linux 6.18 a commit that deletes
// anything (even a table added earlier in the same batch) took 8-20 ms,
// in steps of 4 ms (RCU grace periods on a 250 Hz kernel), against
// 0.1-0.5 ms for a batch that only adds.
//
// The kernel applies a batch as one transaction: packets see either the
// old ruleset or the new one, and a batch that fails anywhere changes
// nothing. Tables we do not own are never named.
//
// Format version: google/nftables v0.3.0 cannot write table or chain
// userdata (comments), so FormatVersion is recorded in the comment of
// every set ("egress-cni format 1"), visible in `nft list table`. A
// ruleset without sets carries no version; the layout of rules (their
// comments) then identifies it. google/nftables v0.3.0 also does not
// decode set comments, so Check cannot compare them.

import (
	"context"
	"fmt"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// nftBackend implements Backend with nf_tables netlink.
type nftBackend struct {
	// newConn opens the netlink connection (nftConn); sockBuf is a
	// hint for the socket buffers the batch needs. The unprivileged
	// tests (nft_seam_linux_test.go, nft_batch_linux_test.go) replace
	// it with an NFTRecorder's Conn, a nftables.WithTestDial connection
	// to a fake kernel, and read the batch's bytes and the hint.
	newConn func(sockBuf int) (*nftables.Conn, error)
}

func newNFTBackend() Backend {
	return &nftBackend{newConn: nftConn}
}

// nftConn opens a lasting nftables connection in the calling thread's
// network namespace. google/nftables sends the whole batch in one
// sendmsg, and netlink refuses a message larger than the socket's send
// buffer (net.core.wmem_default, 212992 bytes) with EMSGSIZE: measured on Linux 6.18,
// 5000 IPv4 intervals fit and 10000 do not. So we raise the buffers as
// nft does, with SO_SNDBUFFORCE (needs CAP_NET_ADMIN, which programming
// nftables needs anyway), falling back to the wmem_max-capped SO_SNDBUF.
func nftConn(sockBuf int) (*nftables.Conn, error) {
	var opts []nftables.ConnOption
	opts = append(opts, nftables.AsLasting())
	// The kernel doubles the value; below the default, keep the default.
	if sockBuf > nftDefaultSockBuf/2 {
		opts = append(opts, nftables.WithSockOptions(func(c *netlink.Conn) error {
			setSockBuf(c, sockBuf)
			return nil
		}))
	}
	return nftables.New(opts...)
}

// nftDefaultSockBuf is the usual net.core.wmem_default/rmem_default.
const nftDefaultSockBuf = 212992

func setSockBuf(c *netlink.Conn, n int) {
	raw, err := c.SyscallConn()
	var forced bool
	if err == nil {
		_ = raw.Control(func(fd uintptr) {
			e1 := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, n)
			e2 := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
			forced = e1 == nil && e2 == nil
		})
	}
	if !forced {
		_ = c.SetWriteBuffer(n)
		_ = c.SetReadBuffer(n)
	}
}

// A netlink attribute's length is 16 bits, so the nested element list of
// one NEWSETELEM message must stay under 64 KiB. An IPv6
// interval end is 36 bytes; 1024 elements stay well below.
const nftElemChunk = 1024

func (nft *nftBackend) Name() BackendName { return BackendNFTables }

func (nft *nftBackend) Render(rs *Ruleset) (string, error) {
	// Build the objects too, so that a model the kernel would reject
	// fails a dry run as it would fail Apply.
	if _, err := nftObjectsFor(rs); err != nil {
		return "", fmt.Errorf("could not render nftables ruleset: %w", err)
	}
	return RenderNFT(rs), nil
}

// batchSize estimates the bytes of the Apply batch, to size the socket.
func (o *nftObjects) batchSize() int {
	n := 64 << 10
	for _, s := range o.Sets {
		n += 64 * len(s.Elements)
	}
	n += 512 * len(o.Rules)
	return n
}

// open builds rs's netlink objects and opens a connection whose buffers
// fit their batch.
func (nft *nftBackend) open(rs *Ruleset) (*nftObjects, *nftables.Conn, error) {
	objs, err := nftObjectsFor(rs)
	if err != nil {
		return nil, nil, fmt.Errorf("could not build nftables ruleset: %w", err)
	}
	conn, err := nft.newConn(objs.batchSize())
	if err != nil {
		return nil, nil, fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	return objs, conn, nil
}

func (nft *nftBackend) Apply(ctx context.Context, rs *Ruleset) error {
	if err := rs.Validate(); err != nil {
		return err
	}
	objs, conn, err := nft.open(rs)
	if err != nil {
		return err
	}
	defer conn.CloseLasting()

	present, err := ourTableFamilies(conn)
	if err != nil {
		return err
	}
	fresh := len(present) == 0
	if err := queueApply(conn, objs, present, fresh); err != nil {
		return err
	}
	// The last moment to stop: once sent, the batch completes.
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("nftables table %s not applied: %w", NFTTable, err)
	}
	err = conn.Flush()
	if err != nil && fresh {
		// Someone created our table since we listed: replace it, on a
		// new socket so that no reply of the failed batch is left over.
		err = nft.applyReplacing(objs)
	}
	if err != nil {
		return fmt.Errorf("could not apply nftables table %s %s: %w", nftFamilyName(objs.Table.Family), NFTTable, err)
	}
	return nil
}

// applyReplacing sends the Apply batch that deletes our table in every
// family first.
func (nft *nftBackend) applyReplacing(objs *nftObjects) error {
	conn, err := nft.newConn(objs.batchSize())
	if err != nil {
		return fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer conn.CloseLasting()
	if err := queueApply(conn, objs, nftAllFamilies, false); err != nil {
		return err
	}
	return conn.Flush()
}

// ourTableFamilies lists the families that hold a table of ours.
func ourTableFamilies(conn *nftables.Conn) ([]nftables.TableFamily, error) {
	tables, err := conn.ListTables()
	if err != nil {
		return nil, fmt.Errorf("could not list nftables tables: %w", err)
	}
	var fams []nftables.TableFamily
	for _, t := range tables {
		if t.Name == NFTTable && slices.Contains(nftAllFamilies, t.Family) {
			fams = append(fams, t.Family)
		}
	}
	return fams, nil
}

// queueApply queues the whole Apply batch: delete our table in the
// families given, then create it afresh. With exclusive, the table is
// created with NLM_F_EXCL, so the batch fails if it already exists.
func queueApply(conn *nftables.Conn, objs *nftObjects, deleteIn []nftables.TableFamily, exclusive bool) error {
	deleteOurTables(conn, deleteIn)
	if exclusive {
		conn.CreateTable(objs.Table)
	} else {
		conn.AddTable(objs.Table)
	}
	for _, s := range objs.Sets {
		if err := conn.AddSet(s.Set, nil); err != nil {
			return fmt.Errorf("could not queue set %s: %w", s.Set.Name, err)
		}
		for chunk := range slices.Chunk(s.Elements, nftElemChunk) {
			if err := conn.SetAddElements(s.Set, chunk); err != nil {
				return fmt.Errorf("could not queue elements of set %s: %w", s.Set.Name, err)
			}
		}
	}
	for _, c := range objs.Chains {
		conn.AddChain(c)
	}
	for _, r := range objs.Rules {
		conn.AddRule(r)
	}
	return nil
}

// deleteOurTables queues the removal of our table in the given
// families. Each "add" makes the following "delete" valid whether or not
// the table still exists, so the batch never fails on a missing table.
func deleteOurTables(conn *nftables.Conn, fams []nftables.TableFamily) {
	for _, f := range fams {
		t := &nftables.Table{Name: NFTTable, Family: f}
		conn.AddTable(t)
		conn.DelTable(t)
	}
}

func (nft *nftBackend) Remove(ctx context.Context) error {
	conn, err := nft.newConn(0)
	if err != nil {
		return fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer conn.CloseLasting()
	present, err := ourTableFamilies(conn)
	if err != nil {
		return err
	}
	if len(present) == 0 {
		return nil
	}
	deleteOurTables(conn, present)
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("nftables table %s not removed: %w", NFTTable, err)
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("could not delete nftables table %s: %w", NFTTable, err)
	}
	return nil
}

// Check reads our table back and compares it with rs. Everything is
// turned into lines, which DriftError lists:
//
//	table inet egress_cni
//	chain output: type nat hook output priority -100 policy accept
//	set out_exclude_v4: type ipv4_addr flags interval
//	set out_exclude_v4 element 10.0.0.0/8
//	chain ISTIO_OUTPUT rule: oifname lo ip saddr 127.0.0.6 return
//
// Rules are named by their comment and compared in order. A rule whose
// comment is right but whose expressions differ from what we would
// write (someone replaced it by hand) is reported as "(expressions
// differ)".
func (nft *nftBackend) Check(ctx context.Context, rs *Ruleset) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	objs, conn, err := nft.open(rs)
	if err != nil {
		return err
	}
	defer conn.CloseLasting()

	want := nftWantLines(rs, objs)
	have, err := nftHaveLines(conn, rs, objs)
	if err != nil {
		return err
	}
	return diffLines(string(BackendNFTables), want, have)
}

func nftTableLine(f nftables.TableFamily) string {
	return "table " + nftFamilyName(f) + " " + NFTTable
}

func nftChainLine(name string, hook *nftables.ChainHook, prio *nftables.ChainPriority, typ nftables.ChainType, policy *nftables.ChainPolicy) string {
	if hook == nil {
		return "chain " + name
	}
	h := fmt.Sprintf("hook#%d", *hook)
	switch *hook {
	case *nftables.ChainHookPrerouting:
		h = "prerouting"
	case *nftables.ChainHookOutput:
		h = "output"
	}
	var p int32
	if prio != nil {
		p = int32(*prio)
	}
	pol := "accept"
	if policy != nil && *policy == nftables.ChainPolicyDrop {
		pol = "drop"
	}
	return fmt.Sprintf("chain %s: type %s hook %s priority %d policy %s", name, typ, h, p, pol)
}

func nftSetLine(name string, keyType string, interval bool) string {
	l := fmt.Sprintf("set %s: type %s", name, keyType)
	if interval {
		l += " flags interval"
	}
	return l
}

func nftRuleLine(chain, text string) string { return "chain " + chain + " rule: " + text }

func nftWantLines(rs *Ruleset, objs *nftObjects) []string {
	lines := []string{nftTableLine(objs.Table.Family)}
	var chains, sets []string
	for _, c := range objs.Chains {
		chains = append(chains, nftChainLine(c.Name, c.Hooknum, c.Priority, c.Type, c.Policy))
	}
	for _, s := range rs.Sets {
		sets = append(sets, nftSetLine(s.Name, nftSetTypeName(s.Type), true))
		for _, e := range nftSetElementTexts(s) {
			sets = append(sets, "set "+s.Name+" element "+e)
		}
	}
	slices.Sort(chains)
	slices.Sort(sets)
	lines = append(lines, chains...)
	lines = append(lines, sets...)
	inet := objs.Table.Family == nftables.TableFamilyINet
	for _, c := range rs.Chains {
		for _, r := range c.Rules {
			lines = append(lines, nftRuleLine(c.Name, nftCommentText(nftRuleText(r, inet))))
		}
	}
	return lines
}

func nftHaveLines(conn *nftables.Conn, rs *Ruleset, objs *nftObjects) ([]string, error) {
	tables, err := conn.ListTables()
	if err != nil {
		return nil, fmt.Errorf("could not list nftables tables: %w", err)
	}
	var lines []string
	var ours *nftables.Table
	for _, t := range tables {
		if t.Name != NFTTable {
			continue
		}
		lines = append(lines, nftTableLine(t.Family))
		if t.Family == objs.Table.Family {
			ours = t
		}
	}
	if ours == nil {
		return lines, nil
	}

	allChains, err := conn.ListChainsOfTableFamily(ours.Family)
	if err != nil {
		return nil, fmt.Errorf("could not list chains in table %s: %w", nftTableLine(ours.Family), err)
	}
	var chains []*nftables.Chain
	var chainLines []string
	for _, c := range allChains {
		if c.Table == nil || c.Table.Name != NFTTable {
			continue
		}
		chains = append(chains, c)
		chainLines = append(chainLines, nftChainLine(c.Name, c.Hooknum, c.Priority, c.Type, c.Policy))
	}

	sets, err := conn.GetSets(ours)
	if err != nil {
		return nil, fmt.Errorf("could not list sets in table %s: %w", nftTableLine(ours.Family), err)
	}
	var setLines []string
	for _, s := range sets {
		if s.Anonymous {
			continue // anonymous sets belong to rules; we never write any
		}
		setLines = append(setLines, nftSetLine(s.Name, s.KeyType.Name, s.Interval))
		elems, err := conn.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("could not list elements of set %s: %w", s.Name, err)
		}
		st := SetPorts
		switch s.KeyType.Name {
		case nftables.TypeIPAddr.Name:
			st = SetIPv4
		case nftables.TypeIP6Addr.Name:
			st = SetIPv6
		}
		for _, e := range nftElementTexts(st, elems) {
			setLines = append(setLines, "set "+s.Name+" element "+e)
		}
	}
	slices.Sort(chainLines)
	slices.Sort(setLines)
	lines = append(lines, chainLines...)
	lines = append(lines, setLines...)

	// Rules: the model's chains first, in model order, then chains we do
	// not expect, by name, so that the order of lines matches want.
	wantRules := map[string][]*nftables.Rule{}
	for _, r := range objs.Rules {
		wantRules[r.Chain.Name] = append(wantRules[r.Chain.Name], r)
	}
	byName := map[string]*nftables.Chain{}
	for _, c := range chains {
		byName[c.Name] = c
	}
	var order []string
	for _, c := range rs.Chains {
		order = append(order, c.Name)
	}
	var extra []string
	for _, c := range chains {
		if !slices.Contains(order, c.Name) {
			extra = append(extra, c.Name)
		}
	}
	slices.Sort(extra)
	order = append(order, extra...)
	for _, name := range order {
		c := byName[name]
		if c == nil {
			continue // reported by the chain lines
		}
		rules, err := conn.GetRules(ours, c)
		if err != nil {
			return nil, fmt.Errorf("could not list rules in chain %s of table %s: %w", name, nftTableLine(ours.Family), err)
		}
		want := wantRules[name]
		for i, r := range rules {
			text := nftRuleCommentOf(r.UserData)
			if text == "" {
				text = fmt.Sprintf("rule handle %d without comment", r.Handle)
			} else if i < len(want) && nftRuleCommentOf(want[i].UserData) == text && !nftExprsEqual(ours.Family, want[i].Exprs, r.Exprs) {
				text += fmt.Sprintf(" (handle %d: expressions differ)", r.Handle)
			}
			lines = append(lines, nftRuleLine(name, text))
		}
	}
	return lines, nil
}

// nftExprsEqual compares two expression lists by their netlink encoding.
// Set IDs only exist within a batch and are not dumped back, so they are
// ignored.
func nftExprsEqual(fam nftables.TableFamily, a, b []expr.Any) bool {
	// google/nftables v0.3.0 writes NFTA_TPROXY_FAMILY as 32 bits and
	// reads it as 8, which fails, and drops the tproxy expression from a
	// dump. Compare without it on both sides (the immediates around it,
	// port and mark, are still compared; the rule's comment names it).
	a, b = withoutTProxy(a), withoutTProxy(b)
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		ea, err1 := marshalExprNoSetID(fam, a[i])
		eb, err2 := marshalExprNoSetID(fam, b[i])
		if err1 != nil || err2 != nil || string(ea) != string(eb) {
			return false
		}
	}
	return true
}

func withoutTProxy(es []expr.Any) []expr.Any {
	out := make([]expr.Any, 0, len(es))
	for _, e := range es {
		if _, ok := e.(*expr.TProxy); !ok {
			out = append(out, e)
		}
	}
	return out
}

func marshalExprNoSetID(fam nftables.TableFamily, e expr.Any) ([]byte, error) {
	if l, ok := e.(*expr.Lookup); ok {
		c := *l
		c.SetID = 0
		e = &c
	}
	// google/nftables v0.3.0 does not decode a ct set's source register
	// (NFTA_CT_SREG): a "ct ... set" reads back as a load into register
	// 0, which no rule can hold (register 0 is the verdict). Compare both
	// sides in that form.
	if c, ok := e.(*expr.Ct); ok && c.SourceRegister {
		n := *c
		n.Register, n.SourceRegister = 0, false
		e = &n
	}
	return expr.Marshal(byte(fam), e)
}
