package audit

import (
	"testing"

	"github.com/egress-cni/egress-cni/pkg/node"
)

// The bytes Decode reads are what a pod sent (the NFLOG payload of a
// dropped packet, snaplen 256): any of them must give a Packet or an
// error, never a panic, which would take the agent down with the
// installer's run mode.
func FuzzDecode(f *testing.F) {
	f.Add(uint16(etherTypeIPv4), ipv4("198.51.100.7", "203.0.113.10", 6, 0x4000, ports(40000, 8080)))
	f.Add(uint16(0), ipv4("198.51.100.7", "203.0.113.10", 17, 0x0010, ports(1, 53)))
	f.Add(uint16(etherTypeIPv6), ipv6("2001:db8:1a::7", "2001:db8:ff::10", 0,
		append([]byte{44, 0, 0, 0, 0, 0, 0, 0}, append([]byte{17, 0, 0, 1, 0, 0, 0, 1}, ports(5353, 53)...)...)))
	f.Add(uint16(etherTypeIPv6), ipv6("2001:db8:1a::7", "2001:db8:ff::10", 60, []byte{60, 255}))
	f.Add(uint16(etherTypeIPv4), []byte{0x4f, 0, 0, 0})
	f.Fuzz(func(t *testing.T, etherType uint16, b []byte) {
		p, err := Decode(etherType, b)
		if err != nil {
			return
		}
		// A non-IP frame (a bridge drop of another ether type) has no
		// addresses; an IP packet has both, of its family.
		ip := p.Family == node.FamilyIPv4 || p.Family == node.FamilyIPv6
		if ip != p.Src.IsValid() || ip != p.Dst.IsValid() || (ip && p.Src.Is4() != (p.Family == node.FamilyIPv4)) {
			t.Fatalf("Decode(%#x, %x) = %+v without an error: addresses do not match the family", etherType, b, p)
		}
	})
}
