package rules

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// NFTRecorder is a fake nf_tables kernel for unprivileged tests of code
// that programs nftables through google/nftables (this package's
// backend, pkg/node): its Conn is a nftables.WithTestDial connection, so
// nothing reaches a socket and no privilege is needed. It answers every
// listing with the Tables given (tables) or nothing (chains, sets,
// elements, objects), acknowledges everything, and records each batch
// it is sent as the bytes the kernel would read.
//
// What it checks is what a kernel would refuse silently or loudly: the
// recorded bytes are decoded again (so a netlink attribute longer than
// its 16-bit length field shows up as lost elements), and NFTBatch.Fits
// says whether the batch fits the socket buffer the caller asked for.
// It does not validate the ruleset itself.
type NFTRecorder struct {
	// Tables are answered to table listings.
	Tables []*nftables.Table

	mu      sync.Mutex
	batches []NFTBatch
}

// NFTBatch is one batch as sent.
type NFTBatch struct {
	// SockBuf is the socket buffer hint the connection was opened with
	// (the argument of NFTConn).
	SockBuf int
	// Messages are the batch's messages, batch begin and end included,
	// each as its marshalled bytes (header included).
	Messages [][]byte
}

// Conn opens a connection to r; it has NFTConn's signature.
func (r *NFTRecorder) Conn(sockBuf int) (*nftables.Conn, error) {
	return nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
		return r.dial(sockBuf, req)
	}))
}

// Batches returns the batches recorded so far.
func (r *NFTRecorder) Batches() []NFTBatch {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]NFTBatch(nil), r.batches...)
}

func nftMsgTypeOf(m netlink.Message) uint16 { return uint16(m.Header.Type) & 0xff }

func (r *NFTRecorder) dial(sockBuf int, req []netlink.Message) ([]netlink.Message, error) {
	if len(req) == 0 {
		return nil, nil
	}
	if uint16(req[0].Header.Type) == unix.NFNL_MSG_BATCH_BEGIN {
		b := NFTBatch{SockBuf: sockBuf}
		for _, m := range req {
			raw, err := m.MarshalBinary()
			if err != nil {
				return nil, err
			}
			b.Messages = append(b.Messages, raw)
		}
		r.mu.Lock()
		r.batches = append(r.batches, b)
		r.mu.Unlock()
		return req, nil
	}
	// A listing (one message, a dump): its answer, then done.
	var replies []netlink.Message
	m := req[0]
	reply := func(typ uint16, data []byte) {
		replies = append(replies, netlink.Message{Header: netlink.Header{Type: netlink.HeaderType(typ),
			Flags: netlink.Multi, Sequence: m.Header.Sequence, PID: m.Header.PID}, Data: data})
	}
	if uint16(m.Header.Type) == unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETTABLE {
		for _, t := range r.Tables {
			ae := netlink.NewAttributeEncoder()
			ae.String(unix.NFTA_TABLE_NAME, t.Name)
			b, err := ae.Encode()
			if err != nil {
				return nil, err
			}
			reply(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWTABLE, append([]byte{byte(t.Family), unix.NFNETLINK_V0, 0, 0}, b...))
		}
	}
	reply(uint16(netlink.Done), make([]byte, 4))
	return replies, nil
}

// Bytes is the length of the batch: one sendmsg.
func (b NFTBatch) Bytes() int {
	n := 0
	for _, m := range b.Messages {
		n += len(m)
	}
	return n
}

// Fits says whether the batch fits the send buffer of a socket that
// NFTConn opens for SockBuf: netlink refuses a sendmsg longer than the
// buffer minus 32 bytes (EMSGSIZE); NFTConn keeps the default buffer
// (nftDefaultSockBuf) for a small hint, and else asks for SockBuf, which
// the kernel doubles.
func (b NFTBatch) Fits() bool {
	limit := nftDefaultSockBuf
	if b.SockBuf > nftDefaultSockBuf/2 {
		limit = 2 * b.SockBuf
	}
	return b.Bytes() <= limit-32
}

// Elements decodes the set elements the batch adds, by set (NFTSetKey),
// in the order sent: each element's key in hex, with "-end" appended to
// the key of an interval end.
func (b NFTBatch) Elements() (map[string][]string, error) {
	out := map[string][]string{}
	for i, raw := range b.Messages {
		var m netlink.Message
		if err := m.UnmarshalBinary(raw); err != nil {
			return nil, fmt.Errorf("message %d: %w", i, err)
		}
		if uint16(m.Header.Type)>>8 != unix.NFNL_SUBSYS_NFTABLES || nftMsgTypeOf(m) != unix.NFT_MSG_NEWSETELEM {
			continue
		}
		if len(m.Data) < 4 {
			return nil, fmt.Errorf("message %d: short", i)
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return nil, fmt.Errorf("message %d: %w", i, err)
		}
		ad.ByteOrder = binary.BigEndian
		var set string
		var els []string
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_SET_ELEM_LIST_SET:
				set = ad.String()
			case unix.NFTA_SET_ELEM_LIST_ELEMENTS:
				ad.Nested(func(nd *netlink.AttributeDecoder) error {
					for nd.Next() {
						nd.Nested(func(ed *netlink.AttributeDecoder) error {
							var key string
							end := false
							for ed.Next() {
								switch ed.Type() {
								case unix.NFTA_SET_ELEM_KEY:
									ed.Nested(func(kd *netlink.AttributeDecoder) error {
										for kd.Next() {
											if kd.Type() == unix.NFTA_DATA_VALUE {
												key = fmt.Sprintf("%x", kd.Bytes())
											}
										}
										return nil
									})
								case unix.NFTA_SET_ELEM_FLAGS:
									end = ed.Uint32()&unix.NFT_SET_ELEM_INTERVAL_END != 0
								}
							}
							if end {
								key += "-end"
							}
							els = append(els, key)
							return nil
						})
					}
					return nil
				})
			}
		}
		if err := ad.Err(); err != nil {
			return nil, fmt.Errorf("message %d (set %q): %w", i, set, err)
		}
		k := nftFamilyName(nftables.TableFamily(m.Data[0])) + " " + set
		out[k] = append(out[k], els...)
	}
	return out, nil
}

// NFTSetKey names s in NFTBatch.Elements: "FAMILY NAME".
func NFTSetKey(s *nftables.Set) string { return nftFamilyName(s.Table.Family) + " " + s.Name }

// NFTElementKeys are els as NFTBatch.Elements decodes them.
func NFTElementKeys(els []nftables.SetElement) []string {
	out := make([]string, len(els))
	for i, e := range els {
		out[i] = fmt.Sprintf("%x", e.Key)
		if e.IntervalEnd {
			out[i] += "-end"
		}
	}
	return out
}
