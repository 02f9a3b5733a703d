package rules

// Unprivileged tests of the nftables backend through its newConn seam:
// a connection to an NFTRecorder (nftables.WithTestDial), a fake kernel
// that holds the tables given. nft_batch_linux_test.go reads Apply's
// batch the same way.

import (
	"context"
	"testing"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// nftTableMessages lists the table messages of r's batches, as "add
// table FAMILY" and "delete table FAMILY".
func nftTableMessages(t *testing.T, r *NFTRecorder) []string {
	var out []string
	for _, b := range r.Batches() {
		for _, raw := range b.Messages {
			var m netlink.Message
			if err := m.UnmarshalBinary(raw); err != nil {
				t.Fatal(err)
			}
			name := map[uint16]string{unix.NFT_MSG_NEWTABLE: "add table", unix.NFT_MSG_DELTABLE: "delete table"}[nftMsgTypeOf(m)]
			if uint16(m.Header.Type)>>8 == unix.NFNL_SUBSYS_NFTABLES && name != "" {
				out = append(out, name+" "+nftFamilyName(nftables.TableFamily(m.Data[0])))
			}
		}
	}
	return out
}

// Remove deletes our table in every family that holds it, in one batch
// that names no table of others; with no table of ours it sends nothing.
func TestNFTRemoveThroughTheSeam(t *testing.T) {
	r := &NFTRecorder{Tables: []*nftables.Table{
		{Name: NFTTable, Family: nftables.TableFamilyINet},
		{Name: "nat", Family: nftables.TableFamilyIPv4},
		{Name: NFTTable, Family: nftables.TableFamilyIPv4},
	}}
	if err := (&nftBackend{newConn: r.Conn}).Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := []string{"add table inet", "delete table inet", "add table ip", "delete table ip"}
	if got := nftTableMessages(t, r); !slicesEqual(got, want) || len(r.Batches()) != 1 {
		t.Errorf("Remove sent %q in %d batches, want %q in one", got, len(r.Batches()), want)
	}
	r = &NFTRecorder{Tables: []*nftables.Table{{Name: "nat", Family: nftables.TableFamilyIPv4}}}
	if err := (&nftBackend{newConn: r.Conn}).Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := len(r.Batches()); n != 0 {
		t.Errorf("Remove with no table of ours sent %d batches: %q", n, nftTableMessages(t, r))
	}
}
