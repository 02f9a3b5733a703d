package rules

import (
	"context"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
)

// TestNFTApplyBatchBytes applies a large ruleset (10,000 IPv4 and 3,000
// IPv6 intervals that do not merge) through the newConn seam into an
// NFTRecorder, without root, and reads the batch back from its bytes:
// one batch, every element of every set in it, in order, and a size
// that fits the socket buffer Apply asked for. A truncated element
// list, an element attribute past 64 KiB, or a socket sized too small
// fails it.
func TestNFTApplyBatchBytes(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tables []*nftables.Table
	}{
		{"fresh namespace", nil},
		{"replacing our table", []*nftables.Table{{Name: NFTTable, Family: nftables.TableFamilyINet}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs := goldenRuleset(t, func(c *Config) {
				c.OutboundExcludeCIDRs = append(nftSpreadCIDRs(10000), nftSpreadCIDRs6(3000)...)
				c.OutboundExcludePorts = []PortRange{{22, 22}, {9000, 9100}}
			})
			r := &NFTRecorder{Tables: tc.tables}
			be := &nftBackend{newConn: r.Conn}
			if err := be.Apply(context.Background(), rs); err != nil {
				t.Fatal(err)
			}
			bs := r.Batches()
			if len(bs) != 1 {
				t.Fatalf("Apply sent %d batches, want 1", len(bs))
			}
			checkNFTBatch(t, bs[0], rs)
		})
	}
}

// checkNFTBatch checks that b holds every element of rs's sets, and fits.
func checkNFTBatch(t *testing.T, b NFTBatch, rs *Ruleset) {
	t.Helper()
	objs, err := nftObjectsFor(rs)
	if err != nil {
		t.Fatal(err)
	}
	got, err := b.Elements()
	if err != nil {
		t.Fatalf("the batch does not decode: %v", err)
	}
	total := 0
	for _, s := range objs.Sets {
		want := NFTElementKeys(s.Elements)
		total += len(want)
		k := NFTSetKey(s.Set)
		if diff := cmp.Diff(want, got[k]); diff != "" {
			t.Errorf("set %s: %d elements sent, want %d (-want +got):\n%.2000s", k, len(got[k]), len(want), diff)
		}
	}
	if len(got) != len(objs.Sets) {
		t.Errorf("elements of %d sets sent, want %d", len(got), len(objs.Sets))
	}
	if total < 2*nftElemChunk {
		t.Fatalf("only %d elements: the test no longer needs more than one message per set", total)
	}
	if !b.Fits() {
		t.Errorf("the batch is %d bytes; a socket for the hint %d holds less", b.Bytes(), b.SockBuf)
	}
	t.Logf("%d messages, %d bytes, %d elements, socket hint %d", len(b.Messages), b.Bytes(), total, b.SockBuf)
}

// nftSpreadCIDRs6 is nftSpreadCIDRs for IPv6: n host routes of
// 2001:db8::/64 that do not merge.
func nftSpreadCIDRs6(n int) []netip.Prefix {
	out := make([]netip.Prefix, 0, n)
	base := netip.MustParseAddr("2001:db8::").As16()
	for i := range n {
		a := base
		v := uint16(2 * i)
		a[14], a[15] = byte(v>>8), byte(v)
		out = append(out, netip.PrefixFrom(netip.AddrFrom16(a), 128))
	}
	return out
}
