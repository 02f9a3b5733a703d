package rules

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// cancelAfter is an iptRunner that cancels the Apply's context once the
// first restore succeeded, as a SIGTERM between the two families would.
type cancelAfter struct {
	iptRunner
	cancel   context.CancelFunc
	restores int
}

func (c *cancelAfter) Restore(ctx context.Context, f Family, input string) error {
	err := c.iptRunner.Restore(ctx, f, input)
	if c.restores++; c.restores == 1 {
		c.cancel()
	}
	return err
}

// A context cancelled in the middle of an iptables Apply leaves the old
// rules in both families: the second family's restore is refused, and
// the first family is rolled back although the context is done.
// Control: the same Apply with a live context writes the new rules.
func TestIPTApplyCancelledRollsBack(t *testing.T) {
	nstest.RequirePrivileged(t)
	for _, name := range []BackendName{BackendIPTablesNFT, BackendIPTablesLegacy} {
		t.Run(string(name), func(t *testing.T) {
			n := nstest.NewNS(t)
			old := ctxRuleset(t, nil)
			next := ctxRuleset(t, []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")})
			err := n.Do(func(ns.NetNS) error {
				be := newIPTBackend(name, BackendOptions{}).(*iptBackend)
				if err := be.Apply(context.Background(), old); err != nil {
					return err
				}
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				be.run = &cancelAfter{iptRunner: be.run, cancel: cancel}
				err := be.Apply(ctx, next)
				if !errors.Is(err, context.Canceled) {
					t.Errorf("cancelled Apply: got %v, want an error wrapping context.Canceled", err)
				}
				if err := be.Check(context.Background(), old); err != nil {
					t.Errorf("after a cancelled Apply the namespace does not hold the old rules: %v", err)
				}
				// Control: the same runner, a live context.
				be.run = be.run.(*cancelAfter).iptRunner
				if err := be.Apply(context.Background(), next); err != nil {
					return err
				}
				if err := be.Check(context.Background(), next); err != nil {
					t.Errorf("control: the new rules were not applied: %v", err)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// An nftables Apply or Remove under a cancelled context sends nothing.
func TestNFTCancelledSendsNothing(t *testing.T) {
	nstest.RequirePrivileged(t)
	n := nstest.NewNS(t)
	rs := ctxRuleset(t, nil)
	done, cancel := context.WithCancel(context.Background())
	cancel()
	err := n.Do(func(ns.NetNS) error {
		be := newNFTBackend()
		if err := be.Apply(done, rs); !errors.Is(err, context.Canceled) {
			t.Errorf("Apply under a cancelled context: %v", err)
		}
		if st := Probe(); len(st.NFTFamilies) != 0 {
			t.Errorf("a cancelled Apply left tables in %v", st.NFTFamilies)
		}
		if err := be.Apply(context.Background(), rs); err != nil {
			return err
		}
		if err := be.Remove(done); !errors.Is(err, context.Canceled) {
			t.Errorf("Remove under a cancelled context: %v", err)
		}
		return be.Check(context.Background(), rs)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func ctxRuleset(t *testing.T, exclude []netip.Prefix) *Ruleset {
	t.Helper()
	c := DefaultConfig()
	c.OutboundExcludeCIDRs = exclude
	rs, err := Build(c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(RenderNFT(rs), "ISTIO_OUTPUT") {
		t.Fatal("the ruleset captures nothing; the test would prove nothing")
	}
	return rs
}
