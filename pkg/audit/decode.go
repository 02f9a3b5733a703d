// Package audit turns the node layer's drops into one structured log line
// per connection attempt, naming the pod that sent it, and per-pod drop
// counters. The kernel sends each drop to an NFLOG group, rate limited
// per reason (pkg/node); the agent (pkg/install's run mode) reads the
// group with github.com/florianl/go-nflog.
package audit

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/egress-cni/egress-cni/pkg/node"
)

// Packet is what the audit reads from a dropped packet's headers.
type Packet struct {
	Family   string // node.FamilyIPv4, node.FamilyIPv6 or node.FamilyOther
	Src, Dst netip.Addr
	// Proto is the transport protocol's name (tcp, udp, icmp, ipv6-icmp,
	// sctp) or its number, or ProtoTruncated.
	Proto string
	// DPort is the destination port of tcp, udp and sctp; 0 otherwise.
	DPort uint16
}

// EtherTypes of NFULA_PACKET_HDR's hw_protocol.
const (
	etherTypeIPv4 = 0x0800
	etherTypeIPv6 = 0x86dd
)

var errShort = errors.New("packet too short")

// ProtoTruncated is the Proto of an IPv6 packet whose extension headers
// run past the bytes NFLOG copied (its snaplen): its transport protocol
// and port are unknown. A pod can choose such a chain (a destination
// options header is up to 2,048 bytes); the drop is still counted and
// logged, with what the headers said.
const ProtoTruncated = "truncated"

// Decode reads the network and transport headers of an NFLOG payload
// (which starts at the network header). etherType is the packet's
// protocol as NFLOG reports it, 0 if unknown: the IP version nibble
// decides then.
func Decode(etherType uint16, b []byte) (Packet, error) {
	if etherType == 0 && len(b) > 0 {
		switch b[0] >> 4 {
		case 4:
			etherType = etherTypeIPv4
		case 6:
			etherType = etherTypeIPv6
		}
	}
	switch etherType {
	case etherTypeIPv4:
		return decode4(b)
	case etherTypeIPv6:
		return decode6(b)
	}
	return Packet{Family: node.FamilyOther, Proto: fmt.Sprintf("ethertype-0x%04x", etherType)}, nil
}

func decode4(b []byte) (Packet, error) {
	p := Packet{Family: node.FamilyIPv4}
	if len(b) < 20 || b[0]>>4 != 4 {
		return p, fmt.Errorf("ipv4: %w", errShort)
	}
	ihl := int(b[0]&0x0f) * 4
	if ihl < 20 || len(b) < ihl {
		return p, fmt.Errorf("ipv4: header length %d: %w", ihl, errShort)
	}
	p.Src = netip.AddrFrom4([4]byte(b[12:16]))
	p.Dst = netip.AddrFrom4([4]byte(b[16:20]))
	proto := b[9]
	// A non-first fragment carries no transport header.
	if binary.BigEndian.Uint16(b[6:8])&0x1fff != 0 {
		p.Proto = protoName(proto)
		return p, nil
	}
	p.transport(proto, b[ihl:])
	return p, nil
}

func decode6(b []byte) (Packet, error) {
	p := Packet{Family: node.FamilyIPv6}
	if len(b) < 40 || b[0]>>4 != 6 {
		return p, fmt.Errorf("ipv6: %w", errShort)
	}
	p.Src = netip.AddrFrom16([16]byte(b[8:24]))
	p.Dst = netip.AddrFrom16([16]byte(b[24:40]))
	next, rest := b[6], b[40:]
	// Walk the extension headers (at most 8: a chain longer than that is
	// reported by its last header's number).
	for range 8 {
		switch next {
		case 0, 43, 60: // hop-by-hop, routing, destination options
			if len(rest) < 8 {
				p.Proto = ProtoTruncated
				return p, nil
			}
			n := 8 + int(rest[1])*8
			if len(rest) < n {
				p.Proto = ProtoTruncated
				return p, nil
			}
			next, rest = rest[0], rest[n:]
		case 44: // fragment
			if len(rest) < 8 {
				p.Proto = ProtoTruncated
				return p, nil
			}
			off := binary.BigEndian.Uint16(rest[2:4]) &^ 7
			next, rest = rest[0], rest[8:]
			if off != 0 {
				p.Proto = protoName(next)
				return p, nil
			}
		default:
			p.transport(next, rest)
			return p, nil
		}
	}
	p.Proto = protoName(next)
	return p, nil
}

func (p *Packet) transport(proto byte, b []byte) {
	p.Proto = protoName(proto)
	switch proto {
	case 6, 17, 132: // tcp, udp, sctp: the destination port follows the source port
		if len(b) >= 4 {
			p.DPort = binary.BigEndian.Uint16(b[2:4])
		}
	}
}

func protoName(p byte) string {
	switch p {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 58:
		return "ipv6-icmp"
	case 132:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}
