package rules

// Unprivileged tests of the nftables backend through its newConn seam:
// a connection whose netlink socket is nftables.WithTestDial's, answered
// by a fake kernel that holds the tables given.

import (
	"context"
	"testing"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// fakeNFTKernel answers table listings with tables and acknowledges
// everything else; it records the type and family of every message it
// is sent outside a listing.
type fakeNFTKernel struct {
	tables []*nftables.Table
	sent   []string
}

func nftMsgType(t netlink.HeaderType) uint16 { return uint16(t) & 0xff }

func (k *fakeNFTKernel) dial(req []netlink.Message) ([]netlink.Message, error) {
	var replies []netlink.Message
	for _, m := range req {
		switch {
		case m.Header.Type == netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETTABLE):
			for _, t := range k.tables {
				ae := netlink.NewAttributeEncoder()
				ae.String(unix.NFTA_TABLE_NAME, t.Name)
				b, err := ae.Encode()
				if err != nil {
					return nil, err
				}
				replies = append(replies, netlink.Message{
					Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWTABLE),
						Flags: netlink.Multi, Sequence: m.Header.Sequence, PID: m.Header.PID},
					Data: append([]byte{byte(t.Family), unix.NFNETLINK_V0, 0, 0}, b...),
				})
			}
			replies = append(replies, netlink.Message{Header: netlink.Header{Type: netlink.Done, Flags: netlink.Multi,
				Sequence: m.Header.Sequence, PID: m.Header.PID}, Data: make([]byte, 4)})
		default:
			name := map[uint16]string{unix.NFT_MSG_NEWTABLE: "add table", unix.NFT_MSG_DELTABLE: "delete table"}[nftMsgType(m.Header.Type)]
			if name == "" {
				// Batch begin and end, and anything else.
				continue
			}
			k.sent = append(k.sent, name+" "+nftFamilyName(nftables.TableFamily(m.Data[0])))
			replies = append(replies, m)
		}
	}
	return replies, nil
}

func (k *fakeNFTKernel) backend() *nftBackend {
	return &nftBackend{newConn: func(int) (*nftables.Conn, error) {
		return nftables.New(nftables.WithTestDial(k.dial))
	}}
}

// Remove deletes our table in every family that holds it, in one batch
// that names no table of others; with no table of ours it sends nothing.
func TestNFTRemoveThroughTheSeam(t *testing.T) {
	k := &fakeNFTKernel{tables: []*nftables.Table{
		{Name: NFTTable, Family: nftables.TableFamilyINet},
		{Name: "nat", Family: nftables.TableFamilyIPv4},
		{Name: NFTTable, Family: nftables.TableFamilyIPv4},
	}}
	if err := k.backend().Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := []string{"add table inet", "delete table inet", "add table ip", "delete table ip"}
	if !slicesEqual(k.sent, want) {
		t.Errorf("Remove sent %q, want %q", k.sent, want)
	}
	k = &fakeNFTKernel{tables: []*nftables.Table{{Name: "nat", Family: nftables.TableFamilyIPv4}}}
	if err := k.backend().Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(k.sent) != 0 {
		t.Errorf("Remove with no table of ours sent %q", k.sent)
	}
}
