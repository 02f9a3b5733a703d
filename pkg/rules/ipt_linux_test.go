package rules

// Privileged tests of the iptables backend, in both flavours. Each test
// runs in a fresh network namespace (never the root one) that is removed
// when the test ends, pass or fail.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/go-cmp/cmp"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

var iptFlavours = []BackendName{BackendIPTablesNFT, BackendIPTablesLegacy}

// inNS runs fn in n and fails the test on error.
func inNS(t testing.TB, n ns.NetNS, what string, fn func() error) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error { return fn() }); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// runIPT runs an iptables binary of the flavour and family in n.
func runIPT(t testing.TB, n ns.NetNS, flavour BackendName, f Family, op, stdin string, args ...string) string {
	t.Helper()
	bin := iptCommand(f) + strings.TrimPrefix(string(flavour), "iptables")
	if op != "" {
		bin += "-" + op
	}
	var out []byte
	inNS(t, n, bin, func() error {
		cmd := exec.Command(bin, args...)
		cmd.Stdin = strings.NewReader(stdin)
		var err error
		out, err = cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s %s: %w: %s", bin, strings.Join(args, " "), err, out)
		}
		return nil
	})
	return string(out)
}

// saveNat is "*-save -t nat" in n without the timestamped comments.
func saveNat(t testing.TB, n ns.NetNS, flavour BackendName, f Family) string {
	t.Helper()
	var b strings.Builder
	for _, l := range strings.SplitAfter(runIPT(t, n, flavour, f, "save", "", "-t", "nat"), "\n") {
		if !strings.HasPrefix(l, "#") {
			b.WriteString(l)
		}
	}
	return b.String()
}

func saveBoth(t testing.TB, n ns.NetNS, flavour BackendName) string {
	return saveNat(t, n, flavour, FamilyIPv4) + saveNat(t, n, flavour, FamilyIPv6)
}

func forFlavours(t *testing.T, fn func(t *testing.T, flavour BackendName, n ns.NetNS)) {
	nstest.RequirePrivileged(t)
	for _, fl := range iptFlavours {
		t.Run(string(fl), func(t *testing.T) {
			n := nstest.NewNS(t)
			fn(t, fl, n)
		})
	}
}

// Every golden config applies, and iptables-save prints back exactly the
// rendered lines (Check compares them), in both flavours.
func TestIPTApplyCheckGoldenConfigs(t *testing.T) {
	nstest.RequirePrivileged(t)
	for _, fl := range iptFlavours {
		for _, tc := range goldenCases() {
			t.Run(string(fl)+"/"+tc.name, func(t *testing.T) {
				n := nstest.NewNS(t)
				rs := goldenRuleset(t, tc.cfg)
				ipt := newIPTBackend(fl, BackendOptions{})
				inNS(t, n, "Apply", func() error { return ipt.Apply(context.Background(), rs) })
				inNS(t, n, "Check after Apply", func() error { return ipt.Check(context.Background(), rs) })
			})
		}
	}
}

func TestIPTApplyTwiceIsIdentical(t *testing.T) {
	forFlavours(t, func(t *testing.T, fl BackendName, n ns.NetNS) {
		rs := goldenRuleset(t, func(c *Config) {
			c.OutboundExcludeCIDRs = mustPrefixes("10.0.0.0/8", "fd00::/8")
			c.ExcludeInterfaces = []string{"eth1"}
		})
		ipt := newIPTBackend(fl, BackendOptions{})
		inNS(t, n, "first Apply", func() error { return ipt.Apply(context.Background(), rs) })
		first := saveBoth(t, n, fl)
		inNS(t, n, "second Apply", func() error { return ipt.Apply(context.Background(), rs) })
		if diff := cmp.Diff(first, saveBoth(t, n, fl)); diff != "" {
			t.Errorf("second Apply changed the tables (-first +second):\n%s", diff)
		}
		inNS(t, n, "Check", func() error { return ipt.Check(context.Background(), rs) })
	})
}

func TestIPTApplyReplacesChangedConfig(t *testing.T) {
	forFlavours(t, func(t *testing.T, fl BackendName, n ns.NetNS) {
		a := goldenRuleset(t, func(c *Config) {
			c.OutboundExcludeCIDRs = mustPrefixes("10.0.0.0/8", "192.168.0.0/16", "fd00::/8")
			c.ExcludeInterfaces = []string{"eth1", "eth2"}
			c.RedirectDNS = true
		})
		b := goldenRuleset(t, func(c *Config) {
			c.Families = IPv4Only
			c.OutboundExcludeCIDRs = mustPrefixes("172.16.0.0/12")
			c.InboundIncludeAll, c.InboundIncludePorts, c.InboundExcludePorts = false, []PortRange{{80, 80}}, nil
		})
		ipt := newIPTBackend(fl, BackendOptions{})
		inNS(t, n, "Apply a", func() error { return ipt.Apply(context.Background(), a) })
		inNS(t, n, "Apply b", func() error { return ipt.Apply(context.Background(), b) })
		inNS(t, n, "Check b", func() error { return ipt.Check(context.Background(), b) })
		inNS(t, n, "Check a", func() error {
			if err := ipt.Check(context.Background(), a); !IsDrift(err) {
				return fmt.Errorf("Check of the old config: want drift, got %w", err)
			}
			return nil
		})
		if v6 := saveNat(t, n, fl, FamilyIPv6); strings.Contains(v6, "ISTIO") || strings.Contains(v6, Comment) {
			t.Errorf("IPv6 still holds our rules after switching to ipv4 only:\n%s", v6)
		}
		want, err := RenderIPTablesFamily(b, FamilyIPv4)
		if err != nil {
			t.Fatal(err)
		}
		got := parseIPTSave(saveNat(t, n, fl, FamilyIPv4), FamilyIPv4).String()
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("IPv4 rules after the change (-want +got):\n%s", diff)
		}
	})
}

// foreign rules and a foreign chain that must survive Apply and Remove.
const iptForeign4 = `*nat
:FOREIGN - [0:0]
-A PREROUTING -i eth9 -j FOREIGN
-A OUTPUT -d 198.51.100.7/32 -j ACCEPT
-A FOREIGN -p udp -m udp --dport 4789 -j RETURN
COMMIT
`

var iptForeign6 = strings.ReplaceAll(iptForeign4, "198.51.100.7/32", "2001:db8::7/128")

func TestIPTRemoveKeepsForeignRules(t *testing.T) {
	forFlavours(t, func(t *testing.T, fl BackendName, n ns.NetNS) {
		ipt := newIPTBackend(fl, BackendOptions{})
		// Remove where nothing exists succeeds, and (legacy) does not
		// create the nat table, which would make Detect see legacy in use.
		inNS(t, n, "Remove on an empty namespace", func() error { return ipt.Remove(context.Background()) })
		if fl == BackendIPTablesLegacy {
			inNS(t, n, "legacy tables", func() error {
				if legacyInUse() {
					return errors.New("Remove registered legacy tables in an empty namespace")
				}
				return nil
			})
		}

		runIPT(t, n, fl, FamilyIPv4, "restore", iptForeign4, "--noflush")
		runIPT(t, n, fl, FamilyIPv6, "restore", iptForeign6, "--noflush")
		before := saveBoth(t, n, fl)

		rs := goldenRuleset(t, func(c *Config) {
			c.OutboundExcludeCIDRs = mustPrefixes("10.0.0.0/8", "fd00::/8")
			c.ExcludeInterfaces = []string{"eth1"}
		})
		inNS(t, n, "Apply", func() error { return ipt.Apply(context.Background(), rs) })
		applied := saveBoth(t, n, fl)
		for _, l := range []string{"-A OUTPUT -d 198.51.100.7/32 -j ACCEPT", "-A OUTPUT -d 2001:db8::7/128 -j ACCEPT", "-A FOREIGN -p udp -m udp --dport 4789 -j RETURN", "-A PREROUTING -i eth9 -j FOREIGN"} {
			if !strings.Contains(applied, l+"\n") {
				t.Errorf("Apply lost foreign rule %q:\n%s", l, applied)
			}
		}
		inNS(t, n, "Check with foreign rules present", func() error { return ipt.Check(context.Background(), rs) })

		inNS(t, n, "Remove", func() error { return ipt.Remove(context.Background()) })
		if diff := cmp.Diff(before, saveBoth(t, n, fl)); diff != "" {
			t.Errorf("Remove did not restore the tables as they were (-before +after):\n%s", diff)
		}
		inNS(t, n, "second Remove", func() error { return ipt.Remove(context.Background()) })
		inNS(t, n, "Check after Remove", func() error {
			err := ipt.Check(context.Background(), rs)
			if !IsDrift(err) {
				return fmt.Errorf("want drift after Remove, got %w", err)
			}
			return nil
		})
	})
}

func TestIPTCheckReportsDrift(t *testing.T) {
	forFlavours(t, func(t *testing.T, fl BackendName, n ns.NetNS) {
		rs := goldenRuleset(t, func(*Config) {})
		ipt := newIPTBackend(fl, BackendOptions{})
		inNS(t, n, "Apply", func() error { return ipt.Apply(context.Background(), rs) })

		bin := "ip6tables" + strings.TrimPrefix(string(fl), "iptables")
		runIPT(t, n, fl, FamilyIPv6, "", "", "-t", "nat", "-D", "ISTIO_OUTPUT", "-d", "::1/128", "-j", "RETURN")
		runIPT(t, n, fl, FamilyIPv4, "", "", "-t", "nat", "-A", "ISTIO_REDIRECT", "-j", "RETURN")
		var err error
		_ = n.Do(func(ns.NetNS) error { err = ipt.Check(context.Background(), rs); return nil })
		var d *DriftError
		if !errors.As(err, &d) {
			t.Fatalf("want a DriftError after %s -D, got %v", bin, err)
		}
		want := &DriftError{
			Backend: string(fl),
			Missing: []string{"ip6tables: -A ISTIO_OUTPUT -d ::1/128 -j RETURN"},
			Extra:   []string{"iptables: -A ISTIO_REDIRECT -j RETURN"},
		}
		if diff := cmp.Diff(want, d); diff != "" {
			t.Errorf("drift (-want +got):\n%s", diff)
		}

		// A missing chain is drift too.
		runIPT(t, n, fl, FamilyIPv4, "restore", "*nat\n:ISTIO_INBOUND - [0:0]\n-D PREROUTING -p tcp -m comment --comment egress-cni -j ISTIO_INBOUND\n-X ISTIO_INBOUND\nCOMMIT\n", "--noflush")
		_ = n.Do(func(ns.NetNS) error { err = ipt.Check(context.Background(), rs); return nil })
		if !IsDrift(err) || !strings.Contains(err.Error(), "missing: iptables: :ISTIO_INBOUND - [0:0]") {
			t.Errorf("want the missing chain reported, got %v", err)
		}

		// Apply repairs it.
		inNS(t, n, "Apply again", func() error { return ipt.Apply(context.Background(), rs) })
		inNS(t, n, "Check after repair", func() error { return ipt.Check(context.Background(), rs) })
	})
}

// What istio-iptables leaves: its entry rules carry no comment. Apply
// takes them over instead of adding a second jump.
const istioRules4 = `*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -d 198.51.100.7/32 -j ACCEPT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
`

func TestIPTTakesOverIstioRules(t *testing.T) {
	forFlavours(t, func(t *testing.T, fl BackendName, n ns.NetNS) {
		runIPT(t, n, fl, FamilyIPv4, "restore", istioRules4, "--noflush")
		rs := goldenRuleset(t, func(*Config) {})
		ipt := newIPTBackend(fl, BackendOptions{})
		inNS(t, n, "Check before takeover", func() error {
			if err := ipt.Check(context.Background(), rs); !IsDrift(err) {
				return fmt.Errorf("want drift before Apply, got %w", err)
			}
			return nil
		})
		inNS(t, n, "Apply", func() error { return ipt.Apply(context.Background(), rs) })
		inNS(t, n, "Check", func() error { return ipt.Check(context.Background(), rs) })
		v4 := saveNat(t, n, fl, FamilyIPv4)
		for _, l := range []string{"-j ISTIO_OUTPUT\n", "-j ISTIO_INBOUND\n"} {
			if c := strings.Count(v4, l); c != 1 {
				t.Errorf("%d rules end in %q, want 1:\n%s", c, l, v4)
			}
		}
		if !strings.Contains(v4, "-A OUTPUT -d 198.51.100.7/32 -j ACCEPT\n") {
			t.Errorf("takeover removed a foreign rule:\n%s", v4)
		}
	})
}

func TestIPTMissingBinary(t *testing.T) {
	forFlavours(t, func(t *testing.T, fl BackendName, n ns.NetNS) {
		r := newExecRunner(fl, BackendOptions{})
		r.dirs = []string{t.TempDir()}
		ipt := &iptBackend{name: fl, run: r}
		rs := goldenRuleset(t, func(*Config) {})
		var err error
		_ = n.Do(func(ns.NetNS) error { err = ipt.Apply(context.Background(), rs); return nil })
		if !IsBinaryMissing(err) {
			t.Fatalf("want a missing-binary error, got %v", err)
		}
		bin := "iptables-nft-"
		if fl == BackendIPTablesLegacy {
			bin = "iptables-legacy-"
		}
		if !strings.Contains(err.Error(), bin) || !strings.Contains(err.Error(), `"iptables"`) {
			t.Errorf("error should name the %s* binary and the iptables package: %v", bin, err)
		}
	})
}

// excludedCIDRs returns n distinct IPv4 /32s.
func excludedCIDRs(n int) []netip.Prefix {
	out := make([]netip.Prefix, n)
	for i := range out {
		out[i] = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32)
	}
	return out
}

// BenchmarkIPTApply measures Apply in both families with N excluded
// IPv4 CIDRs, i.e. N more rules in the IPv4 ISTIO_OUTPUT:
//   - fresh: into a namespace holding none of our rules (a CNI ADD);
//     the Remove between iterations is not timed;
//   - change: over a ruleset that differs in one CIDR: save, then one
//     restore per family that deletes and re-adds everything of ours;
//   - noop: over the identical ruleset (a repeated ADD): save only.
func BenchmarkIPTApply(b *testing.B) {
	nstest.RequirePrivileged(b)
	for _, fl := range iptFlavours {
		for _, mode := range []string{"fresh", "change", "noop"} {
			for _, size := range []int{0, 100, 1000, 10000} {
				b.Run(fmt.Sprintf("%s/%s/N=%d", fl, mode, size), func(b *testing.B) {
					n := nstest.NewNS(b)
					rs := goldenRuleset(b, func(c *Config) { c.OutboundExcludeCIDRs = excludedCIDRs(size) })
					// other differs from rs in its last IPv4 rule.
					other := goldenRuleset(b, func(c *Config) {
						c.OutboundExcludeCIDRs = append(excludedCIDRs(size), netip.MustParsePrefix("192.0.2.0/24"))
					})
					ipt := newIPTBackend(fl, BackendOptions{})
					inNS(b, n, "first Apply", func() error { return ipt.Apply(context.Background(), rs) })
					last := rs
					inNS(b, n, "Apply", func() error {
						for b.Loop() {
							switch mode {
							case "fresh":
								b.StopTimer()
								if err := ipt.Remove(context.Background()); err != nil {
									return err
								}
								b.StartTimer()
							case "change":
								if last == rs {
									last = other
								} else {
									last = rs
								}
							}
							if err := ipt.Apply(context.Background(), last); err != nil {
								return err
							}
						}
						return nil
					})
					b.StopTimer()
					inNS(b, n, "Check", func() error { return ipt.Check(context.Background(), last) })
				})
			}
		}
	}
}

// The legacy flavour waits for the xtables lock at most LockWait, then
// fails with ErrXtablesLocked. The lock file is redirected
// (XTABLES_LOCKFILE) so the test never holds the host's lock.
func TestIPTLegacyLockWait(t *testing.T) {
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	lock := filepath.Join(t.TempDir(), "xtables.lock")
	t.Setenv("XTABLES_LOCKFILE", lock)
	fh, err := os.Create(lock)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if err := syscall.Flock(int(fh.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	ipt := newIPTBackend(BackendIPTablesLegacy, BackendOptions{LockWait: time.Second})
	rs := goldenRuleset(t, func(*Config) {})
	start := time.Now()
	_ = n.Do(func(ns.NetNS) error { err = ipt.Apply(context.Background(), rs); return nil })
	if !errors.Is(err, ErrXtablesLocked) {
		t.Fatalf("want ErrXtablesLocked, got %v", err)
	}
	if d := time.Since(start); d < time.Second || d > 10*time.Second {
		t.Errorf("Apply gave up after %v, want about 1s", d)
	}
	if err := syscall.Flock(int(fh.Fd()), syscall.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	inNS(t, n, "Apply once the lock is free", func() error { return ipt.Apply(context.Background(), rs) })
	inNS(t, n, "Check", func() error { return ipt.Check(context.Background(), rs) })
}

// Once we applied rules with a flavour, auto-detection keeps choosing it
// in that namespace, so later runs never mix flavours.
func TestIPTDetectKeepsFlavour(t *testing.T) {
	forFlavours(t, func(t *testing.T, fl BackendName, n ns.NetNS) {
		ipt := newIPTBackend(fl, BackendOptions{})
		// Check and Remove on an empty namespace must not tip detection.
		inNS(t, n, "Check and Remove", func() error {
			_ = ipt.Check(context.Background(), goldenRuleset(t, func(*Config) {}))
			return ipt.Remove(context.Background())
		})
		inNS(t, n, "Detect before", func() error {
			if d, err := Detect(); err != nil || d != BackendNFTables {
				return fmt.Errorf("Detect in an empty namespace = %q, %w; want %q", d, err, BackendNFTables)
			}
			return nil
		})
		inNS(t, n, "Apply", func() error { return ipt.Apply(context.Background(), goldenRuleset(t, func(*Config) {})) })
		inNS(t, n, "Detect after", func() error {
			if d, err := Detect(); err != nil || d != fl {
				return fmt.Errorf("Detect after Apply = %q, %w; want %q", d, err, fl)
			}
			return nil
		})
	})
}

// Both flavours print our rules identically: apart from the "# Generated
// by" comments, iptables-save output is the same text.
func TestIPTFlavoursSaveIdentically(t *testing.T) {
	nstest.RequirePrivileged(t)
	for _, tc := range goldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			rs := goldenRuleset(t, tc.cfg)
			saved := map[BackendName]string{}
			for _, fl := range iptFlavours {
				n := nstest.NewNS(t)
				ipt := newIPTBackend(fl, BackendOptions{})
				inNS(t, n, "Apply", func() error { return ipt.Apply(context.Background(), rs) })
				saved[fl] = saveBoth(t, n, fl)
			}
			if diff := cmp.Diff(saved[BackendIPTablesNFT], saved[BackendIPTablesLegacy]); diff != "" {
				t.Errorf("line %d: save output differs (-nft +legacy):\n%s", tc.line, diff)
			}
		})
	}
}
