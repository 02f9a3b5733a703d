package node

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The tracer runs a packet through the node program's own expressions,
// the ones Apply sends to the kernel, with the per-pod sets filled from
// a list of registered pods: a small interpreter of the expressions the
// program uses, not a second description of the rules. So the verdict
// it gives is the kernel's for the same sets, conntrack state and route,
// as long as the kernel holds this program (Check says so).

// TracePacket is one packet arriving at the node, with what the tracer
// cannot know from the rules: the route, the conntrack state.
type TracePacket struct {
	// Port is the bridge port a bridged pod's frame enters on (the
	// bridge table's prerouting sees it); "" for a routed interface.
	Port string
	// PortKind is Port's link kind ("veth" for pods; default veth).
	PortKind string
	// IIF is the interface the IP hooks see: the bridge for a bridged
	// pod, the veth for a routed one, the uplink for the outside.
	IIF string
	// OIF is the interface the route to Dst leaves through.
	OIF string
	// OPort, for a frame bridged to another port of the same bridge
	// (the bridge table's forward hook), that port; "" when the frame
	// goes up to the host's IP stack.
	OPort    string
	Src, Dst netip.Addr
	// Proto is unix.IPPROTO_TCP, _UDP, _ICMP or _ICMPV6; SPort and
	// DPort its ports (TCP, UDP).
	Proto        uint8
	SPort, DPort uint16
	// Established: the packet belongs to a connection conntrack already
	// knows (otherwise it is new); Reply: in the reply direction.
	Established, Reply bool
	// RPFOK: the route back to Src leaves through IIF (fib saddr . iif).
	RPFOK bool
	// SourceRoute: the IPv4 header carries a loose or strict source
	// route option.
	SourceRoute bool
	// Label: the connection already carries the gateway label (a later
	// packet of a gateway's connection).
	Label bool
}

// TraceStep is one rule that matched, or a chain's end.
type TraceStep struct {
	Table, Chain string
	// Rule is the rule's nft text, or "policy accept/drop" at the end
	// of a base chain.
	Rule string
}

func (s TraceStep) String() string { return fmt.Sprintf("%s %s: %s", s.Table, s.Chain, s.Rule) }

// Trace is where a packet ends.
type Trace struct {
	// Accepted: the node forwards the packet.
	Accepted bool
	// Decided is the step whose verdict ended the trace (the last one
	// of Steps): the goto into a drop chain for a drop, with Reason.
	Decided TraceStep
	Reason  Reason
	// Logged: the drop chain sends it to NFLOG (the rate limit aside).
	Logged bool
	// Counters are the named counters the packet moved.
	Counters []string
	// Steps are every rule that matched, in order, and chain ends.
	Steps []TraceStep
}

// Verdict is "accept" or "drop".
func (t Trace) Verdict() string {
	if t.Accepted {
		return "accept"
	}
	return "drop"
}

// TracePacket follows pkt through the node rules of cfg with pods
// registered: the bridge table's prerouting (and forward, for a frame
// bridged between two ports) for a bridged frame, then the inet table's
// source check and exit.
func (cfg *Config) TracePacket(pods []Pod, pkt TracePacket) (Trace, error) {
	p := newProgram(cfg)
	tr := &tracer{p: p, pods: pods, pkt: pkt, ct: ctState{label: make([]byte, 16)}}
	if pkt.Label {
		copy(tr.ct.label, labelBytes(cfg.ConnLabel))
	}
	if pkt.Established && pkt.Reply {
		// A reply: of a connection whose first packet crossed the
		// forward chain, which labelled it (ingressReplies).
		for i, b := range labelBytes(cfg.IngressLabel()) {
			tr.ct.label[i] |= b
		}
	}
	if !pkt.Src.IsValid() || !pkt.Dst.IsValid() || pkt.Src.Is4() != pkt.Dst.Is4() {
		return Trace{}, fmt.Errorf("trace: source %v and destination %v must be addresses of one family", pkt.Src, pkt.Dst)
	}
	var t Trace
	type hook struct {
		family   nftables.TableFamily
		hook     *nftables.ChainHook
		iif, oif string
		kind     string
	}
	var hooks []hook
	if pkt.Port != "" {
		kind := pkt.PortKind
		if kind == "" {
			kind = "veth"
		}
		hooks = append(hooks, hook{nftables.TableFamilyBridge, nftables.ChainHookPrerouting, pkt.Port, "", kind})
		if pkt.OPort != "" {
			hooks = append(hooks, hook{nftables.TableFamilyBridge, nftables.ChainHookForward, pkt.Port, pkt.OPort, kind})
		}
	}
	if pkt.OPort == "" {
		hooks = append(hooks, hook{nftables.TableFamilyINet, nftables.ChainHookPrerouting, pkt.IIF, "", ""},
			hook{nftables.TableFamilyINet, nftables.ChainHookForward, pkt.IIF, pkt.OIF, ""})
	}
	for _, h := range hooks {
		var base []*chainSpec
		for _, c := range p.chains {
			if c.family == h.family && c.hook == h.hook && c.typ == nftables.ChainTypeFilter {
				base = append(base, c)
			}
		}
		slices.SortStableFunc(base, func(a, b *chainSpec) int { return int(a.prio - b.prio) })
		for _, c := range base {
			tr.iif, tr.oif, tr.kind, tr.family = h.iif, h.oif, h.kind, h.family
			accepted, err := tr.run(c, &t)
			if err != nil {
				return Trace{}, err
			}
			if !accepted {
				return t, nil
			}
		}
	}
	t.Accepted = true
	return t, nil
}

type ctState struct{ label []byte }

type tracer struct {
	p      *program
	pods   []Pod
	pkt    TracePacket
	ct     ctState
	family nftables.TableFamily
	iif    string
	oif    string
	kind   string
	regs   [4 * 16]byte
}

func (tr *tracer) chain(family nftables.TableFamily, name string) *chainSpec {
	for _, c := range tr.p.chains {
		if c.family == family && c.name == name {
			return c
		}
	}
	return nil
}

// run evaluates a base chain and what it jumps to; it returns whether
// the packet was accepted.
func (tr *tracer) run(base *chainSpec, t *Trace) (bool, error) {
	table := familyName(base.family)
	type frame struct {
		c *chainSpec
		i int
	}
	var stack []frame
	cur := frame{base, 0}
	for steps := 0; steps < 10000; steps++ {
		if cur.i >= len(cur.c.rules) {
			if len(stack) > 0 {
				cur, stack = stack[len(stack)-1], stack[:len(stack)-1]
				continue
			}
			policy := !base.drop
			rule := "policy drop"
			if policy {
				rule = "policy accept"
			}
			step := TraceStep{table, base.name + " (end of " + cur.c.name + ")", rule}
			t.Steps = append(t.Steps, step)
			if !policy {
				t.Decided = step
			}
			return policy, nil
		}
		r := cur.c.rules[cur.i]
		cur.i++
		v, matched, err := tr.eval(r, t)
		if err != nil {
			return false, fmt.Errorf("trace: %s %s rule %q: %w", table, cur.c.name, r, err)
		}
		if !matched {
			continue
		}
		step := TraceStep{table, cur.c.name, r.String()}
		t.Steps = append(t.Steps, step)
		if v == nil {
			continue
		}
		switch v.Kind {
		case expr.VerdictAccept:
			t.Decided = step
			return true, nil
		case expr.VerdictDrop:
			if t.Reason == "" {
				t.Decided = step
			}
			return false, nil
		case expr.VerdictReturn:
			if len(stack) == 0 {
				cur.i = len(cur.c.rules)
				continue
			}
			cur, stack = stack[len(stack)-1], stack[:len(stack)-1]
		case expr.VerdictJump, expr.VerdictGoto:
			next := tr.chain(cur.c.family, v.Chain)
			if next == nil {
				return false, fmt.Errorf("trace: %s to chain %s, which the program lacks", r, v.Chain)
			}
			if strings.HasPrefix(v.Chain, "drop_") && v.Kind == expr.VerdictGoto {
				for _, a := range auditSpecs {
					if AuditChain(a.reason) == v.Chain {
						t.Reason, t.Decided = a.reason, step
					}
				}
			}
			if v.Kind == expr.VerdictJump {
				stack = append(stack, cur)
			}
			cur = frame{next, 0}
		default:
			return false, fmt.Errorf("trace: verdict %v not modelled", v.Kind)
		}
	}
	return false, fmt.Errorf("trace: chain loop in %s", base.name)
}

// reg returns the bytes of register n onwards (NFT_REG_1..4 are 16
// bytes each, NFT_REG32_00..15 4 bytes each, over the same space).
func (tr *tracer) reg(n uint32) ([]byte, error) {
	switch {
	case n >= 1 && n <= 4:
		return tr.regs[(n-1)*16:], nil
	case n >= 8 && n <= 23:
		return tr.regs[(n-8)*4:], nil
	}
	return nil, fmt.Errorf("register %d not modelled", n)
}

func (tr *tracer) put(n uint32, b []byte, size int) error {
	r, err := tr.reg(n)
	if err != nil {
		return err
	}
	clear(r[:min(len(r), (size+3)/4*4)])
	copy(r, b)
	return nil
}

// eval runs one rule: whether it matched, and its verdict if any.
func (tr *tracer) eval(r *rule, t *Trace) (*expr.Verdict, bool, error) {
	var counters []string
	logged := false
	for _, e := range r.exprs {
		switch e := e.(type) {
		case *expr.Meta:
			if e.SourceRegister {
				return nil, false, fmt.Errorf("meta set not modelled")
			}
			var b []byte
			switch e.Key {
			case expr.MetaKeyNFPROTO:
				b = []byte{unix.NFPROTO_IPV4}
				if tr.pkt.Src.Is6() {
					b = []byte{unix.NFPROTO_IPV6}
				}
			case expr.MetaKeyPROTOCOL:
				b = binaryutil.BigEndian.PutUint16(tr.etherType())
			case expr.MetaKeyIIFNAME:
				b = ifnameKey(tr.iif)
			case expr.MetaKeyOIFNAME:
				b = ifnameKey(tr.oif)
			case metaKeyIIFKIND:
				b = ifnameKey(tr.kind)
			default:
				return nil, false, fmt.Errorf("meta key %d not modelled", e.Key)
			}
			if err := tr.put(e.Register, b, len(b)); err != nil {
				return nil, false, err
			}
		case *expr.Cmp:
			rb, err := tr.reg(e.Register)
			if err != nil {
				return nil, false, err
			}
			eq := bytes.Equal(rb[:len(e.Data)], e.Data)
			switch e.Op {
			case expr.CmpOpEq:
				if !eq {
					return nil, false, nil
				}
			case expr.CmpOpNeq:
				if eq {
					return nil, false, nil
				}
			default:
				return nil, false, fmt.Errorf("cmp op %d not modelled", e.Op)
			}
		case *expr.Payload:
			if e.OperationType != expr.PayloadLoad {
				return nil, false, fmt.Errorf("payload write not modelled")
			}
			var hdr []byte
			switch e.Base {
			case expr.PayloadBaseNetworkHeader:
				hdr = tr.networkHeader()
			case expr.PayloadBaseLLHeader:
				hdr = make([]byte, 14)
				binary.BigEndian.PutUint16(hdr[12:], tr.etherType())
			default:
				return nil, false, fmt.Errorf("payload base %d not modelled", e.Base)
			}
			if int(e.Offset+e.Len) > len(hdr) {
				return nil, false, nil // the kernel breaks: no match
			}
			if err := tr.put(e.DestRegister, hdr[e.Offset:e.Offset+e.Len], int(e.Len)); err != nil {
				return nil, false, err
			}
		case *expr.Bitwise:
			src, err := tr.reg(e.SourceRegister)
			if err != nil {
				return nil, false, err
			}
			out := make([]byte, e.Len)
			for i := range out {
				out[i] = src[i]&e.Mask[i] ^ e.Xor[i]
			}
			if err := tr.put(e.DestRegister, out, int(e.Len)); err != nil {
				return nil, false, err
			}
		case *expr.Lookup:
			found, err := tr.lookup(e)
			if err != nil {
				return nil, false, err
			}
			if found == e.Invert {
				return nil, false, nil
			}
		case *expr.Fib:
			if !(e.FlagSADDR && e.FlagIIF && e.ResultOIF && e.FlagPRESENT) {
				return nil, false, fmt.Errorf("fib form not modelled")
			}
			b := make([]byte, 4)
			if tr.pkt.RPFOK {
				b[0] = 1
			}
			if err := tr.put(e.Register, b, 4); err != nil {
				return nil, false, err
			}
		case *expr.Ct:
			if e.SourceRegister {
				if e.Key != expr.CtKeyLABELS {
					return nil, false, fmt.Errorf("ct set %d not modelled", e.Key)
				}
				src, err := tr.reg(e.Register)
				if err != nil {
					return nil, false, err
				}
				for i := range tr.ct.label {
					tr.ct.label[i] |= src[i]
				}
				continue
			}
			var b []byte
			switch e.Key {
			case expr.CtKeySTATE:
				st := expr.CtStateBitNEW
				if tr.pkt.Established {
					st = expr.CtStateBitESTABLISHED
				}
				b = binaryutil.NativeEndian.PutUint32(st)
			case expr.CtKeyDIRECTION:
				b = []byte{0}
				if tr.pkt.Reply {
					b[0] = 1
				}
			case expr.CtKeyLABELS:
				b = tr.ct.label
			default:
				return nil, false, fmt.Errorf("ct key %d not modelled", e.Key)
			}
			if err := tr.put(e.Register, b, len(b)); err != nil {
				return nil, false, err
			}
		case *expr.Exthdr:
			if e.Op != exthdrOpIPv4 || e.Flags != unix.NFT_EXTHDR_F_PRESENT {
				return nil, false, fmt.Errorf("exthdr form not modelled")
			}
			b := []byte{0}
			if tr.pkt.Src.Is4() && tr.pkt.SourceRoute && (e.Type == 131 || e.Type == 137) {
				b[0] = 1
			}
			if err := tr.put(e.DestRegister, b, 1); err != nil {
				return nil, false, err
			}
		case *expr.Immediate:
			if err := tr.put(e.Register, e.Data, len(e.Data)); err != nil {
				return nil, false, err
			}
		case *expr.Objref:
			counters = append(counters, e.Name)
		case *expr.Limit:
			// Matches below the rate; the tracer follows one packet.
		case *expr.Log:
			logged = true
		case *expr.NAT, *expr.Masq, *expr.Counter:
		case *expr.Verdict:
			t.Counters = append(t.Counters, counters...)
			t.Logged = t.Logged || logged
			return e, true, nil
		default:
			return nil, false, fmt.Errorf("expression %T not modelled", e)
		}
	}
	t.Counters = append(t.Counters, counters...)
	t.Logged = t.Logged || logged
	return nil, true, nil
}

func (tr *tracer) etherType() uint16 {
	if tr.pkt.Src.Is6() {
		return unix.ETH_P_IPV6
	}
	return unix.ETH_P_IP
}

// networkHeader is the packet's IP header as the payload expressions
// read it (addresses at their offsets; the rest is not read).
func (tr *tracer) networkHeader() []byte {
	if tr.pkt.Src.Is6() {
		h := make([]byte, 40)
		h[0] = 0x60
		h[6] = tr.pkt.Proto
		s, d := tr.pkt.Src.As16(), tr.pkt.Dst.As16()
		copy(h[8:], s[:])
		copy(h[24:], d[:])
		return h
	}
	h := make([]byte, 20)
	h[0] = 0x45
	h[9] = tr.pkt.Proto
	s, d := tr.pkt.Src.As4(), tr.pkt.Dst.As4()
	copy(h[12:], s[:])
	copy(h[16:], d[:])
	return h
}

// lookup looks the register's key up in a set of the current table.
func (tr *tracer) lookup(e *expr.Lookup) (bool, error) {
	var spec *setSpec
	for _, s := range tr.p.sets {
		if s.name == e.SetName && s.table.Family == tr.family {
			spec = s
		}
	}
	if spec == nil {
		return false, fmt.Errorf("set %s not in table %s", e.SetName, familyName(tr.family))
	}
	src, err := tr.reg(e.SourceRegister)
	if err != nil {
		return false, err
	}
	if spec.static {
		v4, v6 := splitFamilies(tr.p.cfg.Allowed)
		n, ps := 4, v4
		if spec.name == SetAllowV6 {
			n, ps = 16, v6
		}
		a, _ := netip.AddrFromSlice(src[:n])
		return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(a) }), nil
	}
	for _, p := range tr.pods {
		for _, el := range p.elements() {
			if el.set.name == spec.name && el.set.table.Family == tr.family && bytes.Equal(src[:len(el.key)], el.key) {
				return true, nil
			}
		}
	}
	return false, nil
}
