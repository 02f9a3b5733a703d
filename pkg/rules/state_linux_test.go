package rules

// Tests of Probe, RemoveAll and CheckNoneOurs. The privileged ones run
// every call that reads or writes a firewall inside a fresh network
// namespace of their own (iptInNS), never the test's.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// removeBackend counts Remove calls and fails them with err.
type removeBackend struct {
	name    BackendName
	err     error
	removed int
}

func (r *removeBackend) Name() BackendName                     { return r.name }
func (r *removeBackend) Render(*Ruleset) (string, error)       { return "", nil }
func (r *removeBackend) Apply(context.Context, *Ruleset) error { return nil }
func (r *removeBackend) Check(context.Context, *Ruleset) error { return nil }
func (r *removeBackend) Remove(context.Context) error          { r.removed++; return r.err }

func TestRemoveAllJoinsErrorsAndSkipsMissingBinaries(t *testing.T) {
	calls := map[BackendName]*removeBackend{
		BackendNFTables:       {name: BackendNFTables, err: errors.New("netlink said no")},
		BackendIPTablesNFT:    {name: BackendIPTablesNFT, err: &MissingBinaryError{Binary: "iptables-nft-restore", Package: "iptables"}},
		BackendIPTablesLegacy: {name: BackendIPTablesLegacy, err: errors.New("xtables lock")},
	}
	newBackend := func(n BackendName, _ BackendOptions) (Backend, error) { return calls[n], nil }
	all := State{NFTFamilies: []nftables.TableFamily{nftables.TableFamilyINet}, IPTablesNFT: true, IPTablesLegacy: true}
	ran, err := removeAll(context.Background(), all, newBackend)
	if err == nil || !strings.Contains(err.Error(), "netlink said no") || !strings.Contains(err.Error(), "xtables lock") ||
		strings.Contains(err.Error(), "iptables-nft-restore") {
		t.Errorf("err = %v, want both real errors joined and the missing binary skipped", err)
	}
	// Each error names its backend.
	if err != nil && (!strings.Contains(err.Error(), "nftables: netlink said no") || !strings.Contains(err.Error(), "iptables-legacy: xtables lock")) {
		t.Errorf("err = %v, want each error prefixed with its backend", err)
	}
	if len(ran) != 0 {
		t.Errorf("ran = %v", ran)
	}
	for n, b := range calls {
		if b.removed != 1 {
			t.Errorf("%s: Remove called %d times", n, b.removed)
		}
	}
	// Backends that hold nothing are not run at all; nftables runs when
	// its tables could not be listed.
	for _, b := range calls {
		b.removed, b.err = 0, nil
	}
	ran, err = removeAll(context.Background(), State{}, newBackend)
	if err != nil || len(ran) != 0 || calls[BackendNFTables].removed != 0 || calls[BackendIPTablesLegacy].removed != 0 || calls[BackendIPTablesNFT].removed != 0 {
		t.Errorf("on an empty state: ran %v, err %v", ran, err)
	}
	ran, err = removeAll(context.Background(), State{Err: errors.New("no netlink")}, newBackend)
	if err != nil || !slices.Equal(ran, []BackendName{BackendNFTables, BackendIPTablesNFT}) || calls[BackendIPTablesLegacy].removed != 0 {
		t.Errorf("with nftables unreadable: ran %v, err %v", ran, err)
	}
}

// Every backend's rules are found by Probe and CheckNoneOurs, and
// RemoveAll removes them without running (or registering) the others.
func TestProbeRemoveAllEveryBackend(t *testing.T) {
	nstest.RequirePrivileged(t)
	rs := goldenRuleset(t, func(c *Config) {
		c.OutboundExcludeCIDRs = mustPrefixes("10.0.0.0/8", "fd00::/8")
	})
	for _, tc := range []struct {
		name BackendName
		want string // a line of CheckNoneOurs' Extra
	}{
		{BackendNFTables, "table egress_cni (family inet)"},
		{BackendIPTablesNFT, "iptables-nft-save: -A OUTPUT"},
		{BackendIPTablesLegacy, "iptables-legacy-save: -A OUTPUT"},
	} {
		t.Run(string(tc.name), func(t *testing.T) {
			n := nstest.NewNS(t)
			inNS(t, n, "fresh namespace", func() error {
				if st := Probe(); st.Err != nil || slices.ContainsFunc(concreteBackends, st.MayHold) {
					t.Errorf("Probe of a fresh namespace = %+v", st)
				}
				if err := CheckNoneOurs(context.Background()); err != nil {
					t.Errorf("CheckNoneOurs of a fresh namespace: %v", err)
				}
				ran, err := RemoveAll(context.Background())
				if err != nil || len(ran) != 0 {
					t.Errorf("RemoveAll of a fresh namespace: ran %v, err %v", ran, err)
				}
				return nil
			})
			b, err := NewBackend(tc.name, BackendOptions{})
			if err != nil {
				t.Fatal(err)
			}
			inNS(t, n, "Apply", func() error { return b.Apply(context.Background(), rs) })
			inNS(t, n, "after Apply", func() error {
				st := Probe()
				if st.Err != nil || !st.MayHold(tc.name) {
					t.Errorf("Probe after %s Apply = %+v", tc.name, st)
				}
				if tc.name != BackendIPTablesLegacy && st.IPTablesLegacy {
					t.Errorf("legacy tables registered after a %s Apply", tc.name)
				}
				err := CheckNoneOurs(context.Background())
				var d *DriftError
				if !errors.As(err, &d) {
					return fmt.Errorf("CheckNoneOurs after %s Apply: %w, want a drift error", tc.name, err)
				}
				if !slices.ContainsFunc(d.Extra, func(l string) bool { return strings.HasPrefix(l, tc.want) }) {
					t.Errorf("CheckNoneOurs extra = %q, want a line starting %q", d.Extra, tc.want)
				}
				ran, err := RemoveAll(context.Background())
				if err != nil || !slices.Contains(ran, tc.name) {
					t.Errorf("RemoveAll: ran %v, err %v", ran, err)
				}
				if slices.Contains(ran, BackendIPTablesLegacy) != (tc.name == BackendIPTablesLegacy) {
					t.Errorf("RemoveAll ran %v after a %s Apply", ran, tc.name)
				}
				if err := CheckNoneOurs(context.Background()); err != nil {
					t.Errorf("CheckNoneOurs after RemoveAll: %v", err)
				}
				if err := b.Check(context.Background(), rs); !IsDrift(err) {
					t.Errorf("%s Check after RemoveAll: %v, want drift", tc.name, err)
				}
				if _, err := RemoveAll(context.Background()); err != nil {
					t.Errorf("second RemoveAll: %v", err)
				}
				if tc.name != BackendIPTablesLegacy && legacyInUse() {
					t.Errorf("RemoveAll registered legacy tables")
				}
				return nil
			})
		})
	}
}

// A foreign rule whose comment merely contains our name is not ours; an
// entry rule without our comment that jumps to our chain (as
// istio-iptables writes it) and the rules of our chains are, in every
// table we write. Finding rules by substring got both wrong.
func TestCheckNoneOursUsesTheParsers(t *testing.T) {
	forFlavours(t, func(t *testing.T, fl BackendName, n ns.NetNS) {
		foreignOnly := `*nat
-A OUTPUT -d 198.51.100.7/32 -m comment --comment egress-cni-foreign -j ACCEPT
-A OUTPUT -d 198.51.100.8/32 -m comment --comment "egress-cni but not ours" -j ACCEPT
COMMIT
*mangle
-A PREROUTING -p tcp -m comment --comment egress-cnix -j ACCEPT
COMMIT
`
		runIPT(t, n, fl, FamilyIPv4, "restore", foreignOnly, "--noflush")
		inNS(t, n, "foreign look-alikes only", func() error {
			if !Probe().MayHold(fl) {
				t.Errorf("Probe does not see the %s tables", fl)
			}
			if err := CheckNoneOurs(context.Background()); err != nil {
				t.Errorf("CheckNoneOurs with only foreign rules whose comment contains %q: %v", Comment, err)
			}
			return nil
		})
		runIPT(t, n, fl, FamilyIPv4, "restore", `*nat
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -j RETURN
COMMIT
*mangle
:ISTIO_DIVERT - [0:0]
-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff
COMMIT
`, "--noflush")
		bin := "iptables-nft-save: "
		if fl == BackendIPTablesLegacy {
			bin = "iptables-legacy-save: "
		}
		inNS(t, n, "ours without our comment", func() error {
			err := CheckNoneOurs(context.Background())
			var d *DriftError
			if !errors.As(err, &d) {
				return fmt.Errorf("CheckNoneOurs: %w, want a drift error", err)
			}
			want := []string{
				bin + ":ISTIO_OUTPUT - [0:0]",
				bin + "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
				bin + "-A ISTIO_OUTPUT -o lo -j RETURN",
				bin + "mangle: :ISTIO_DIVERT - [0:0]",
				bin + "mangle: -A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff",
			}
			for _, w := range want {
				if !slices.Contains(d.Extra, w) {
					t.Errorf("CheckNoneOurs extra = %q, want %q", d.Extra, w)
				}
			}
			for _, l := range d.Extra {
				if strings.Contains(l, "198.51.100.") || strings.Contains(l, "egress-cnix") {
					t.Errorf("CheckNoneOurs counts a foreign rule as ours: %q", l)
				}
			}
			if ran, err := RemoveAll(context.Background()); err != nil || !slices.Contains(ran, fl) {
				t.Errorf("RemoveAll: ran %v, err %v", ran, err)
			}
			if err := CheckNoneOurs(context.Background()); err != nil {
				t.Errorf("CheckNoneOurs after RemoveAll: %v", err)
			}
			return nil
		})
		after := runIPT(t, n, fl, FamilyIPv4, "save", "")
		for _, l := range []string{"--comment egress-cni-foreign", `--comment "egress-cni but not ours"`, "--comment egress-cnix"} {
			if !strings.Contains(after, l) {
				t.Errorf("RemoveAll removed the foreign rule with %s:\n%s", l, after)
			}
		}
		if strings.Contains(after, "ISTIO") {
			t.Errorf("RemoveAll left our chains:\n%s", after)
		}
	})
}

func TestAvailable(t *testing.T) {
	if err := Available("bogus"); err == nil {
		t.Error("Available accepted an unknown backend")
	}
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	inNS(t, n, "Available", func() error {
		for _, b := range []BackendName{BackendAuto, BackendNFTables} {
			if err := Available(b); err != nil {
				t.Errorf("Available(%s): %v", b, err)
			}
		}
		return nil
	})
}
