package rules

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// The privileged tests below program nftables in a fresh network
// namespace each, never in the namespace the test runs in.

// nftCLI runs the nft binary inside n (tests only; the backend never
// does). It skips the test when nft is not installed.
func nftCLI(tb testing.TB, n ns.NetNS, stdin string, args ...string) string {
	tb.Helper()
	nft := lookPathOrSkip(tb, "nft")
	nsenter := lookPathOrSkip(tb, "nsenter")
	cmd := exec.Command(nsenter, append([]string{"--net=" + n.Path(), nft}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		tb.Fatalf("nft %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func nftTablesIn(tb testing.TB, n ns.NetNS) []string {
	tb.Helper()
	var names []string
	inNS(tb, n, "list tables", func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		ts, err := c.ListTables()
		for _, t := range ts {
			names = append(names, nftFamilyName(t.Family)+" "+t.Name)
		}
		return err
	})
	slices.Sort(names)
	return names
}

func TestNFTApplyCheckGolden(t *testing.T) {
	nstest.RequirePrivileged(t)
	for _, tc := range goldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			n := nstest.NewNS(t)
			rs := goldenRuleset(t, tc.cfg)
			be := newNFTBackend()
			inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
			inNS(t, n, "Check", func() error { return be.Check(context.Background(), rs) })
			want := []string{nftFamilyName(nftTableFamily(rs.Families)) + " " + NFTTable}
			if got := nftTablesIn(t, n); !slices.Equal(got, want) {
				t.Errorf("line %d: tables = %v, want %v", tc.line, got, want)
			}
		})
	}
}

// TestNFTRenderMatchesApply loads RenderNFT's text with `nft -f` in one
// namespace and Applies the same ruleset in another: nft must list the
// two tables identically, and Check (which compares expressions) must
// accept the nft-loaded one.
func TestNFTRenderMatchesApply(t *testing.T) {
	nstest.RequirePrivileged(t)
	for _, tc := range goldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			rs := goldenRuleset(t, tc.cfg)
			fam := nftFamilyName(nftTableFamily(rs.Families))
			viaNft, viaApply := nstest.NewNS(t), nstest.NewNS(t)
			nftCLI(t, viaNft, RenderNFT(rs), "-f", "-")
			be := newNFTBackend()
			inNS(t, viaApply, "Apply", func() error { return be.Apply(context.Background(), rs) })
			a := nftCLI(t, viaNft, "", "list", "table", fam, NFTTable)
			b := nftCLI(t, viaApply, "", "list", "table", fam, NFTTable)
			if a != b {
				t.Errorf("line %d: nft -f and Apply differ:\n--- nft -f\n%s\n--- Apply\n%s", tc.line, a, b)
			}
			inNS(t, viaNft, "Check of the nft-loaded table", func() error { return be.Check(context.Background(), rs) })
		})
	}
}

// TestNFTSetLookups asks the kernel (nft get element, which looks the key
// up in the set) whether addresses and ports fall into the intervals
// Apply wrote: edges of merged ranges, and ranges that reach the top of
// the key space, which have no end element.
func TestNFTSetLookups(t *testing.T) {
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	rs := goldenRuleset(t, goldenConfig(t, "exclusions-merged"))
	be := newNFTBackend()
	inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
	for _, tc := range []struct {
		set, key string
		in       bool
	}{
		{SetOutExcludeV4, "0.0.0.0", false},
		{SetOutExcludeV4, "9.255.255.255", false},
		{SetOutExcludeV4, "10.0.0.0", true},
		{SetOutExcludeV4, "10.1.2.3", true},
		{SetOutExcludeV4, "11.0.0.0", false},
		{SetOutExcludeV4, "12.0.0.0", true},
		{SetOutExcludeV4, "13.255.255.255", true}, // 12/8 and 13/8 merged
		{SetOutExcludeV4, "14.0.0.0", false},
		{SetOutExcludeV4, "169.254.169.254", true},
		{SetOutExcludeV4, "169.254.169.255", false},
		{SetOutExcludeV4, "255.255.254.255", false},
		{SetOutExcludeV4, "255.255.255.0", true},
		{SetOutExcludeV4, "255.255.255.255", true},
		{SetOutExcludeV6, "fcff:ffff::1", false},
		{SetOutExcludeV6, "fd00:1::1", true},
		{SetOutExcludeV6, "fe00::", false},
		{SetOutExcludeV6, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true},
		{SetOutExcludePort, "21", false},
		{SetOutExcludePort, "22", true},
		{SetOutExcludePort, "9150", true}, // 9000-9100 and 9050-9200 merged
		{SetOutExcludePort, "9201", false},
		{SetOutExcludePort, "64999", false},
		{SetOutExcludePort, "65535", true},
	} {
		got := nftHasElement(t, n, tc.set, tc.key)
		if got != tc.in {
			t.Errorf("%s in set %s = %v, want %v", tc.key, tc.set, got, tc.in)
		}
	}

	// 0.0.0.0/0 and ::/0 are a single start element each.
	all := goldenRuleset(t, goldenConfig(t, "exclude-everything"))
	inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), all) })
	for _, tc := range []struct{ set, key string }{
		{SetOutExcludeV4, "0.0.0.0"},
		{SetOutExcludeV4, "127.0.0.1"},
		{SetOutExcludeV4, "255.255.255.255"},
		{SetOutExcludeV6, "::"},
		{SetOutExcludeV6, "2001:db8::1"},
		{SetOutExcludeV6, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"},
	} {
		if !nftHasElement(t, n, tc.set, tc.key) {
			t.Errorf("%s not in set %s of the exclude-everything ruleset", tc.key, tc.set)
		}
	}
}

// nftHasElement runs `nft get element` in n: nft exits non-zero when the
// key is in no interval of the set.
func nftHasElement(tb testing.TB, n ns.NetNS, set, key string) bool {
	tb.Helper()
	nft := lookPathOrSkip(tb, "nft")
	out, err := exec.Command("nsenter", "--net="+n.Path(), nft, "get", "element", "inet", NFTTable, set, "{ "+key+" }").CombinedOutput()
	if err != nil && !strings.Contains(string(out), "No such file or directory") {
		tb.Fatalf("nft get element %s %s: %v\n%s", set, key, err, out)
	}
	return err == nil
}

func TestNFTApplyIdempotent(t *testing.T) {
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	rs := goldenRuleset(t, goldenConfig(t, "exclusions-merged")) // every kind of set
	be := newNFTBackend()
	inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
	first := nftCLI(t, n, "", "list", "table", "inet", NFTTable)
	inNS(t, n, "second Apply", func() error { return be.Apply(context.Background(), rs) })
	second := nftCLI(t, n, "", "list", "table", "inet", NFTTable)
	if first != second {
		t.Errorf("second Apply changed the table:\n--- first\n%s\n--- second\n%s", first, second)
	}
	inNS(t, n, "Check", func() error { return be.Check(context.Background(), rs) })
	// Every rule carries its text as a comment, and sets the format.
	for _, want := range []string{
		`oifname "lo" ip saddr 127.0.0.6 return comment "oifname lo ip saddr 127.0.0.6 return"`,
		fmt.Sprintf(`comment "egress-cni format %d"`, FormatVersion),
		"255.255.255.0/24",
		"ffff::/16",
		"65000-65535",
	} {
		if !strings.Contains(first, want) {
			t.Errorf("nft list table lacks %s:\n%s", want, first)
		}
	}
	t.Logf("nft list table inet %s:\n%s", NFTTable, first)
}

// TestNFTApplyReplaces changes the config, including the family, and
// checks that the new table replaced the old one.
func TestNFTApplyReplaces(t *testing.T) {
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	be := newNFTBackend()
	dual := goldenRuleset(t, goldenConfig(t, "exclusions-merged"))
	v4 := goldenRuleset(t, func(c *Config) {
		c.Families = IPv4Only
		c.OutboundExcludeCIDRs = nftPrefixes("192.168.0.0/16")
	})
	inNS(t, n, "Apply dual", func() error { return be.Apply(context.Background(), dual) })
	inNS(t, n, "Apply v4", func() error { return be.Apply(context.Background(), v4) })
	inNS(t, n, "Check v4", func() error { return be.Check(context.Background(), v4) })
	if got, want := nftTablesIn(t, n), []string{"ip " + NFTTable}; !slices.Equal(got, want) {
		t.Errorf("tables = %v, want %v", got, want)
	}
	var err error
	inNS(t, n, "Check dual", func() error { err = be.Check(context.Background(), dual); return nil })
	if !IsDrift(err) {
		t.Errorf("Check of the old ruleset: got %v, want drift", err)
	}
	// And back, with a changed exclusion list in the same family.
	dual2 := goldenRuleset(t, func(c *Config) { c.OutboundExcludeCIDRs = nftPrefixes("10.0.0.0/8") })
	inNS(t, n, "Apply dual2", func() error { return be.Apply(context.Background(), dual2) })
	inNS(t, n, "Check dual2", func() error { return be.Check(context.Background(), dual2) })
	if got, want := nftTablesIn(t, n), []string{"inet " + NFTTable}; !slices.Equal(got, want) {
		t.Errorf("tables = %v, want %v", got, want)
	}
}

// TestNFTApplyFailsAtomically makes the batch fail at its very end and
// checks that the previous ruleset is untouched.
func TestNFTApplyFailsAtomically(t *testing.T) {
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	be := newNFTBackend()
	rs := goldenRuleset(t, func(*Config) {})
	inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
	before := nftCLI(t, n, "", "list", "ruleset")
	// A new ruleset whose batch fails in the kernel at its end (a jump
	// to a chain that is not created), after our table was deleted and
	// recreated earlier in the same batch.
	bad := goldenRuleset(t, func(c *Config) { c.OutboundExcludeCIDRs = nftPrefixes("10.0.0.0/8") })
	var err error
	inNS(t, n, "Apply bad", func() error { err = applyBrokenForTest(bad); return nil })
	if err == nil {
		t.Fatal("Apply of a broken batch succeeded")
	}
	if after := nftCLI(t, n, "", "list", "ruleset"); after != before {
		t.Errorf("a failed Apply changed the ruleset:\n--- before\n%s\n--- after\n%s", before, after)
	}
	inNS(t, n, "Check", func() error { return be.Check(context.Background(), rs) })
}

// applyBrokenForTest queues rs like Apply but leaves out the chain
// ISTIO_REDIRECT (and its rules) while keeping the jumps to it, which
// the kernel rejects.
func applyBrokenForTest(rs *Ruleset) error {
	missing := ChainRedirect
	objs, err := nftObjectsFor(rs)
	if err != nil {
		return err
	}
	objs.Chains = slices.DeleteFunc(objs.Chains, func(c *nftables.Chain) bool { return c.Name == missing })
	conn, err := nftConn(objs.batchSize())
	if err != nil {
		return err
	}
	defer conn.CloseLasting()
	deleteOurTables(conn, nftAllFamilies)
	conn.AddTable(objs.Table)
	for _, s := range objs.Sets {
		if err := conn.AddSet(s.Set, s.Elements); err != nil {
			return err
		}
	}
	for _, c := range objs.Chains {
		conn.AddChain(c)
	}
	for _, r := range objs.Rules {
		if r.Chain.Name != missing {
			conn.AddRule(r)
		}
	}
	return conn.Flush()
}

// TestNFTApplyCreateRace covers the fast path's guard: a batch that
// creates our table exclusively fails as a whole when the table appeared
// after Apply listed the tables, and Apply then replaces it.
func TestNFTApplyCreateRace(t *testing.T) {
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	rs := goldenRuleset(t, func(*Config) {})
	objs, err := nftObjectsFor(rs)
	if err != nil {
		t.Fatal(err)
	}
	nftCLI(t, n, "add table inet egress_cni\nadd chain inet egress_cni stale\n", "-f", "-")
	before := nftCLI(t, n, "", "list", "ruleset")
	inNS(t, n, "exclusive batch", func() error {
		conn, err := nftConn(objs.batchSize())
		if err != nil {
			return err
		}
		defer conn.CloseLasting()
		if err := queueApply(conn, objs, nil, true); err != nil {
			return err
		}
		if err := conn.Flush(); err == nil {
			return fmt.Errorf("exclusive create of an existing table succeeded")
		}
		return nil
	})
	if after := nftCLI(t, n, "", "list", "ruleset"); after != before {
		t.Errorf("failed batch changed the ruleset:\n%s", after)
	}
	// The fallback Apply takes after a failed exclusive batch.
	be := newNFTBackend().(*nftBackend)
	inNS(t, n, "applyReplacing", func() error { return be.applyReplacing(objs) })
	inNS(t, n, "Check", func() error { return be.Check(context.Background(), rs) })
	inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
	inNS(t, n, "Check", func() error { return be.Check(context.Background(), rs) })
}

func TestNFTRemove(t *testing.T) {
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	be := newNFTBackend()
	foreign := "table ip other {\n\tchain c {\n\t\ttype filter hook output priority 0; policy accept;\n\t\tip daddr 192.0.2.1 counter drop\n\t}\n}\n" +
		"table inet other6 {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 192.0.2.2 }\n\t}\n}\n"
	nftCLI(t, n, foreign, "-f", "-")
	before := nftCLI(t, n, "", "list", "ruleset")

	// Remove with nothing of ours: success.
	inNS(t, n, "Remove (nothing)", func() error { return be.Remove(context.Background()) })
	rs := goldenRuleset(t, func(*Config) {})
	inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
	// Leave a stale table in another family too, as a changed config
	// would before Apply moves it.
	nftCLI(t, n, "", "add", "table", "ip6", NFTTable)
	inNS(t, n, "Remove", func() error { return be.Remove(context.Background()) })
	if after := nftCLI(t, n, "", "list", "ruleset"); after != before {
		t.Errorf("Remove changed foreign tables:\n--- before\n%s\n--- after\n%s", before, after)
	}
	for _, tb := range nftTablesIn(t, n) {
		if strings.HasSuffix(tb, " "+NFTTable) {
			t.Errorf("table %s left after Remove", tb)
		}
	}
	inNS(t, n, "Remove again", func() error { return be.Remove(context.Background()) })

	var err error
	inNS(t, n, "Check after Remove", func() error { err = be.Check(context.Background(), rs); return nil })
	d, ok := errors.AsType[*DriftError](err)
	if !ok || !slices.Contains(d.Missing, "table inet "+NFTTable) {
		t.Errorf("Check after Remove: got %v, want drift with the table missing", err)
	}
}

func TestNFTCheckDrift(t *testing.T) {
	nstest.RequirePrivileged(t)
	rs := goldenRuleset(t, func(c *Config) {
		c.OutboundExcludeCIDRs = nftPrefixes("10.0.0.0/8", "192.168.0.0/16", "fd00::/8")
	})
	be := newNFTBackend()
	checkDrift := func(t *testing.T, n ns.NetNS, missing, extra string) {
		t.Helper()
		var err error
		inNS(t, n, "Check", func() error { err = be.Check(context.Background(), rs); return nil })
		d, ok := errors.AsType[*DriftError](err)
		if !ok {
			t.Fatalf("Check: got %v, want a *DriftError", err)
		}
		if missing != "" && !slices.Contains(d.Missing, missing) {
			t.Errorf("drift does not name missing %q: %v", missing, d)
		}
		if extra != "" && !slices.Contains(d.Extra, extra) {
			t.Errorf("drift does not name extra %q: %v", extra, d)
		}
		t.Logf("drift: %v", d)
	}
	table := &nftables.Table{Name: NFTTable, Family: nftables.TableFamilyINet}

	t.Run("deleted rule", func(t *testing.T) {
		n := nstest.NewNS(t)
		inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
		const victim = `oifname lo ip saddr 127.0.0.6 return`
		inNS(t, n, "delete rule", func() error {
			c, err := nftables.New()
			if err != nil {
				return err
			}
			rules, err := c.GetRules(table, &nftables.Chain{Name: ChainOutput, Table: table})
			if err != nil {
				return err
			}
			for _, r := range rules {
				if nftRuleCommentOf(r.UserData) == victim {
					if err := c.DelRule(r); err != nil {
						return err
					}
				}
			}
			return c.Flush()
		})
		checkDrift(t, n, nftRuleLine(ChainOutput, victim), "")
	})

	t.Run("deleted rule by nft handle", func(t *testing.T) {
		n := nstest.NewNS(t)
		inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
		out := nftCLI(t, n, "", "-a", "list", "chain", "inet", NFTTable, ChainRedirect)
		var handle string
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "redirect to :15001") {
				_, handle, _ = strings.Cut(l, "# handle ")
			}
		}
		if handle == "" {
			t.Fatalf("no handle in\n%s", out)
		}
		nftCLI(t, n, "", "delete", "rule", "inet", NFTTable, ChainRedirect, "handle", strings.TrimSpace(handle))
		checkDrift(t, n, nftRuleLine(ChainRedirect, "meta l4proto tcp redirect to :15001"), "")
	})

	t.Run("deleted set element", func(t *testing.T) {
		n := nstest.NewNS(t)
		inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
		nftCLI(t, n, "", "delete", "element", "inet", NFTTable, SetOutExcludeV4, "{ 192.168.0.0/16 }")
		checkDrift(t, n, "set "+SetOutExcludeV4+" element 192.168.0.0/16", "")
	})

	t.Run("added set element", func(t *testing.T) {
		n := nstest.NewNS(t)
		inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
		nftCLI(t, n, "", "add", "element", "inet", NFTTable, SetOutExcludeV6, "{ 2001:db8::/32 }")
		checkDrift(t, n, "", "set "+SetOutExcludeV6+" element 2001:db8::/32")
	})

	t.Run("added rule", func(t *testing.T) {
		n := nstest.NewNS(t)
		inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
		nftCLI(t, n, "", "insert", "rule", "inet", NFTTable, ChainOutput, "meta skuid 0", "return")
		var err error
		inNS(t, n, "Check", func() error { err = be.Check(context.Background(), rs); return nil })
		d, ok := errors.AsType[*DriftError](err)
		if !ok || len(d.Extra) != 1 || !strings.HasSuffix(d.Extra[0], "without comment") || len(d.Missing) != 0 {
			t.Errorf("Check: got %v, want one extra rule without comment", err)
		}
	})

	t.Run("rule replaced under the same comment", func(t *testing.T) {
		n := nstest.NewNS(t)
		inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
		const victim = "meta skuid 1337 return"
		out := nftCLI(t, n, "", "-a", "list", "chain", "inet", NFTTable, ChainOutput)
		var handle string
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "\t"+victim+" comment") {
				_, handle, _ = strings.Cut(l, "# handle ")
			}
		}
		if handle == "" {
			t.Fatalf("no handle in\n%s", out)
		}
		nftCLI(t, n, "", "replace", "rule", "inet", NFTTable, ChainOutput, "handle", strings.TrimSpace(handle),
			"meta", "skuid", "1338", "return", "comment", `"`+victim+`"`)
		var err error
		inNS(t, n, "Check", func() error { err = be.Check(context.Background(), rs); return nil })
		if !IsDrift(err) || !strings.Contains(err.Error(), "expressions differ") {
			t.Errorf("Check: got %v, want drift naming differing expressions", err)
		}
	})

	t.Run("stale table in another family", func(t *testing.T) {
		n := nstest.NewNS(t)
		inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
		nftCLI(t, n, "", "add", "table", "ip6", NFTTable)
		checkDrift(t, n, "", "table ip6 "+NFTTable)
		inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
		inNS(t, n, "Check", func() error { return be.Check(context.Background(), rs) })
	})

	t.Run("table only in the wrong family", func(t *testing.T) {
		n := nstest.NewNS(t)
		v4 := goldenRuleset(t, func(c *Config) { c.Families = IPv4Only })
		inNS(t, n, "Apply v4", func() error { return be.Apply(context.Background(), v4) })
		checkDrift(t, n, "table inet "+NFTTable, "table ip "+NFTTable)
	})

	t.Run("hook changed", func(t *testing.T) {
		n := nstest.NewNS(t)
		inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
		// A base chain's priority cannot be changed in place; recreate the
		// chain with another priority and the same rules.
		nftCLI(t, n, "", "delete", "chain", "inet", NFTTable, BasePrerouting)
		nftCLI(t, n, "", "add", "chain", "inet", NFTTable, BasePrerouting, "{ type nat hook prerouting priority -99; policy accept; }")
		checkDrift(t, n, "chain prerouting: type nat hook prerouting priority -100 policy accept",
			"chain prerouting: type nat hook prerouting priority -99 policy accept")
	})
}

// TestNFTApplyManyCIDRs applies 10,000 excluded CIDRs, which do not
// merge, in one batch and reads them back.
func TestNFTApplyManyCIDRs(t *testing.T) {
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	rs := goldenRuleset(t, func(c *Config) { c.OutboundExcludeCIDRs = nftSpreadCIDRs(10000) })
	if got := len(nftSetElementTexts(rs.Set(SetOutExcludeV4))); got != 10000 {
		t.Fatalf("%d intervals, want 10000", got)
	}
	be := newNFTBackend()
	start := time.Now()
	inNS(t, n, "Apply", func() error { return be.Apply(context.Background(), rs) })
	applied := time.Since(start)
	start = time.Now()
	inNS(t, n, "Check", func() error { return be.Check(context.Background(), rs) })
	t.Logf("Apply of 10000 CIDRs: %v; Check: %v", applied, time.Since(start))
	inNS(t, n, "Apply again", func() error { return be.Apply(context.Background(), rs) })
	inNS(t, n, "Check again", func() error { return be.Check(context.Background(), rs) })
}

// BenchmarkNFTApply measures Apply with N excluded CIDRs (which do not
// merge). "fresh" is the CNI ADD case: the first Apply in a new network
// namespace (created outside the timer), whose batch only adds.
// "replace" re-applies over an existing table: the batch also deletes
// it, and a commit that deletes waits for RCU grace periods.
func BenchmarkNFTApply(b *testing.B) {
	nstest.RequirePrivileged(b)
	for _, size := range []int{0, 100, 1000, 10000} {
		for _, mode := range []string{"fresh", "replace"} {
			b.Run(fmt.Sprintf("cidrs=%d/%s", size, mode), func(b *testing.B) {
				cfg := DefaultConfig()
				cfg.OutboundExcludeCIDRs = nftSpreadCIDRs(size)
				rs, err := Build(cfg)
				if err != nil {
					b.Fatal(err)
				}
				be := newNFTBackend()
				apply := func(n ns.NetNS) {
					if err := n.Do(func(ns.NetNS) error { return be.Apply(context.Background(), rs) }); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportAllocs()
				if mode == "replace" {
					n := nstest.NewNS(b)
					apply(n)
					for b.Loop() {
						apply(n)
					}
					inNS(b, n, "Check", func() error { return be.Check(context.Background(), rs) })
					return
				}
				for b.Loop() {
					b.StopTimer()
					n := nstest.NewNS(b)
					b.StartTimer()
					apply(n)
				}
			})
		}
	}
}
