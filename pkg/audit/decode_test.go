package audit

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/egress-cni/egress-cni/pkg/node"
)

func ipv4(src, dst string, proto byte, frag uint16, l4 []byte) []byte {
	b := make([]byte, 20, 20+len(l4))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[6:], frag)
	b[9] = proto
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	return append(b, l4...)
}

func ipv6(src, dst string, next byte, rest []byte) []byte {
	b := make([]byte, 40, 40+len(rest))
	b[0] = 0x60
	b[6] = next
	s, d := netip.MustParseAddr(src).As16(), netip.MustParseAddr(dst).As16()
	copy(b[8:], s[:])
	copy(b[24:], d[:])
	return append(b, rest...)
}

func ports(sport, dport uint16) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint16(b, sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	return b
}

func TestDecode(t *testing.T) {
	// A hop-by-hop header (8 bytes) then a fragment header (first
	// fragment) before UDP.
	ext := append([]byte{44, 0, 0, 0, 0, 0, 0, 0}, append([]byte{17, 0, 0, 1, 0, 0, 0, 1}, ports(5353, 53)...)...)
	for _, tc := range []struct {
		name      string
		etherType uint16
		b         []byte
		want      Packet
	}{
		{"tcp v4", etherTypeIPv4, ipv4("198.51.100.7", "203.0.113.10", 6, 0x4000, ports(40000, 8080)),
			Packet{node.FamilyIPv4, netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("203.0.113.10"), "tcp", 8080}},
		{"udp v4 by version nibble", 0, ipv4("198.51.100.7", "203.0.113.10", 17, 0, ports(1, 53)),
			Packet{node.FamilyIPv4, netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("203.0.113.10"), "udp", 53}},
		{"icmp v4", etherTypeIPv4, ipv4("192.0.2.9", "203.0.113.10", 1, 0, []byte{8, 0, 0, 0}),
			Packet{node.FamilyIPv4, netip.MustParseAddr("192.0.2.9"), netip.MustParseAddr("203.0.113.10"), "icmp", 0}},
		{"v4 later fragment has no port", etherTypeIPv4, ipv4("198.51.100.7", "203.0.113.10", 17, 0x0010, ports(1, 53)),
			Packet{node.FamilyIPv4, netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("203.0.113.10"), "udp", 0}},
		{"tcp v6", etherTypeIPv6, ipv6("2001:db8:1a::7", "2001:db8:ff::10", 6, ports(40000, 443)),
			Packet{node.FamilyIPv6, netip.MustParseAddr("2001:db8:1a::7"), netip.MustParseAddr("2001:db8:ff::10"), "tcp", 443}},
		{"udp v6 behind extension headers", etherTypeIPv6, ipv6("2001:db8:1a::7", "2001:db8:ff::10", 0, ext),
			Packet{node.FamilyIPv6, netip.MustParseAddr("2001:db8:1a::7"), netip.MustParseAddr("2001:db8:ff::10"), "udp", 53}},
		{"icmpv6", etherTypeIPv6, ipv6("2001:db8:1a::7", "2001:db8:ff::10", 58, []byte{128, 0, 0, 0}),
			Packet{node.FamilyIPv6, netip.MustParseAddr("2001:db8:1a::7"), netip.MustParseAddr("2001:db8:ff::10"), "ipv6-icmp", 0}},
		{"arp", 0x0806, []byte{0, 1, 8, 0}, Packet{Family: node.FamilyOther, Proto: "ethertype-0x0806"}},
	} {
		got, err := Decode(tc.etherType, tc.b)
		if err != nil || got != tc.want {
			t.Errorf("%s: got %+v, %v; want %+v", tc.name, got, err, tc.want)
		}
	}
	// A 96-byte destination options header before UDP: the whole of it
	// within the node's snaplen, the port is read; cut at the snaplen
	// the node had before (128), the decoder says truncated, not the
	// options header's number or a port read from its padding.
	dstopts := make([]byte, 96)
	dstopts[0], dstopts[1] = 17, 11 // next header udp; (11+1)*8 bytes
	v6 := ipv6("2001:db8:1a::7", "2001:db8:ff::10", 60, append(dstopts, ports(5353, 8443)...))
	if len(v6) > node.AuditSnaplen {
		t.Fatalf("the test packet (%d bytes) exceeds the node's snaplen %d", len(v6), node.AuditSnaplen)
	}
	want := Packet{node.FamilyIPv6, netip.MustParseAddr("2001:db8:1a::7"), netip.MustParseAddr("2001:db8:ff::10"), "udp", 8443}
	if got, err := Decode(etherTypeIPv6, v6[:min(len(v6), node.AuditSnaplen)]); err != nil || got != want {
		t.Errorf("udp behind 96 bytes of destination options, snapped at %d: got %+v, %v; want %+v", node.AuditSnaplen, got, err, want)
	}
	for _, cut := range []int{128, 40 + 4, 40 + 95} {
		want := Packet{node.FamilyIPv6, netip.MustParseAddr("2001:db8:1a::7"), netip.MustParseAddr("2001:db8:ff::10"), ProtoTruncated, 0}
		if got, err := Decode(etherTypeIPv6, v6[:cut]); err != nil || got != want {
			t.Errorf("the same cut at %d bytes: got %+v, %v; want %+v", cut, got, err, want)
		}
	}
	frag := ipv6("2001:db8:1a::7", "2001:db8:ff::10", 44, []byte{17, 0, 0})
	if got, _ := Decode(etherTypeIPv6, frag); got.Proto != ProtoTruncated {
		t.Errorf("a cut fragment header: proto %q, want %q", got.Proto, ProtoTruncated)
	}

	for _, b := range [][]byte{{0x45, 0}, ipv4("198.51.100.7", "203.0.113.10", 6, 0, nil)[:19], {0x60}} {
		if _, err := Decode(0, b); err == nil {
			t.Errorf("%x: truncated header accepted", b)
		}
	}
}
