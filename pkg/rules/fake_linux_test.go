package rules

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// The Fake keeps the Backend contract: Apply replaces, Check reports
// drift as a *DriftError, Remove forgets, and each flavour has its own
// record and syntax.
func TestFake(t *testing.T) {
	f := NewFake()
	a := goldenRuleset(t, func(*Config) {})
	b := goldenRuleset(t, func(c *Config) { c.OutboundExcludeCIDRs = mustPrefixes("192.0.2.0/24") })
	var d *DriftError
	if err := f.Check(context.Background(), a); !errors.As(err, &d) || len(d.Missing) == 0 || len(d.Extra) != 0 {
		t.Fatalf("Check of an empty namespace: %v", err)
	}
	for _, rs := range []*Ruleset{b, a} {
		if err := f.Apply(context.Background(), rs); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Check(context.Background(), a); err != nil {
		t.Errorf("Check after Apply: %v", err)
	}
	if err := f.Check(context.Background(), b); !errors.As(err, &d) || !strings.Contains(err.Error(), "missing: 192.0.2.0/24") {
		t.Errorf("Check of another ruleset: %v", err)
	}
	want := "# netns self: nftables\n" + RenderNFT(a)
	if f.Dump() != want {
		t.Errorf("Dump after two Applies:\n%s\nwant:\n%s", f.Dump(), want)
	}
	// The record is what was applied, not the Ruleset as it is now.
	g, c := NewFake(), goldenRuleset(t, func(*Config) {})
	if err := g.Apply(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	before := g.Dump()
	c.Chain(ChainRedirect).Rules = nil
	if g.Dump() != before {
		t.Errorf("a change to an applied Ruleset changed the record")
	}
	ipt, err := f.NewBackend(BackendIPTablesNFT, BackendOptions{})
	if err != nil || ipt.Name() != BackendIPTablesNFT {
		t.Fatalf("NewBackend(iptables-nft) = %v, %v", ipt, err)
	}
	if err := ipt.Check(context.Background(), a); !IsDrift(err) {
		t.Errorf("iptables-nft sees the nftables record: %v", err)
	}
	if err := ipt.Apply(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	if want := "# netns self: nftables\n" + RenderNFT(a) + "# netns self: iptables-nft\n" + RenderIPTables(b); f.Dump() != want {
		t.Errorf("Dump with two backends:\n%s", f.Dump())
	}
	for _, be := range []Backend{f, ipt, f} {
		if err := be.Remove(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if got := f.Dump(); got != "" {
		t.Errorf("Dump after Remove: %q", got)
	}
	if _, err := f.NewBackend("pf", BackendOptions{}); err == nil {
		t.Error("NewBackend accepted an unknown name")
	}
	// A model the backend cannot render is refused, as by the real ones.
	bad := goldenRuleset(t, func(*Config) {})
	bad.Chain(ChainRedirect).Rules[0].Proto = ProtoAny
	for _, be := range []Backend{f, ipt} {
		if err := be.Apply(context.Background(), bad); err == nil || f.Dump() != "" {
			t.Errorf("%s: Apply of an unrenderable model: %v, holds %q", be.Name(), err, f.Dump())
		}
	}
	f.ApplyErr = errors.New("no")
	if err := f.Apply(context.Background(), a); !errors.Is(err, f.ApplyErr) || f.Dump() != "" {
		t.Errorf("Apply with ApplyErr: %v, holds %q", err, f.Dump())
	}
}
