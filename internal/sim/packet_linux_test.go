package sim

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// verify recomputes every checksum of a marshalled packet: each sums to
// zero (0xffff before the final complement) when correct.
func verify(t *testing.T, b []byte) {
	t.Helper()
	p, err := ParsePacket(b)
	if err != nil {
		t.Fatal(err)
	}
	var l4 []byte
	var pseudo uint32
	src, dst := p.Src.Addr(), p.Dst.Addr()
	if p.Is6() {
		l4 = b[40:]
		pseudo = pseudo6(src, dst, p.Proto, len(l4))
	} else {
		if c := checksum(b[:20], 0); c != 0 {
			t.Errorf("IPv4 header checksum does not verify (%#x)", c)
		}
		l4 = b[20:]
		if p.Proto != unix.IPPROTO_ICMP {
			pseudo = pseudo4(src, dst, p.Proto, len(l4))
		}
	}
	if c := checksum(l4, pseudo); c != 0 {
		t.Errorf("%s: transport checksum does not verify (%#x)", p, c)
	}
}

func TestPacketRoundTrip(t *testing.T) {
	ap := netip.MustParseAddrPort
	for _, p := range []Packet{
		{Src: ap("198.51.100.2:4000"), Dst: ap("203.0.113.10:8080"), Proto: unix.IPPROTO_UDP, Payload: []byte("token")},
		{Src: ap("[2001:db8:1a::2]:4000"), Dst: ap("[2001:db8:ff::10]:8080"), Proto: unix.IPPROTO_UDP, Payload: []byte("token6")},
		{Src: ap("198.51.100.2:4001"), Dst: ap("203.0.113.10:8081"), Proto: unix.IPPROTO_TCP, Flags: TCPAck | TCPPsh,
			Seq: 1 << 31, Ack: 77, Options: []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}, Payload: []byte("data")},
		{Src: ap("[2001:db8:1a::2]:4001"), Dst: ap("[2001:db8:ff::10]:8081"), Proto: unix.IPPROTO_TCP, Flags: TCPSyn, Seq: 9},
	} {
		b, err := p.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		verify(t, b)
		q, err := ParsePacket(b)
		if err != nil {
			t.Fatal(err)
		}
		if q.Src != p.Src || q.Dst != p.Dst || q.Proto != p.Proto || !bytes.Equal(q.Payload, p.Payload) || q.Seq != p.Seq || q.Ack != p.Ack || q.Flags != p.Flags {
			t.Errorf("round trip of %s gave %s (%+v)", p, q, q)
		}
		if p.Proto == unix.IPPROTO_TCP && !bytes.Equal(q.Options, p.Options) {
			t.Errorf("TCP options %x came back as %x", p.Options, q.Options)
		}
	}
}

func TestICMPUnreachableQuotes(t *testing.T) {
	for _, fam := range []struct{ own, far, gw string }{
		{"198.51.100.67", "203.0.113.10", "198.51.100.66"},
		{"2001:db8:1e::3", "2001:db8:ff::10", "2001:db8:1e::2"},
	} {
		quoted, err := Packet{Src: netip.AddrPortFrom(netip.MustParseAddr(fam.far), 8080),
			Dst: netip.AddrPortFrom(netip.MustParseAddr(fam.gw), 41000), Proto: unix.IPPROTO_UDP, Payload: []byte("secret")}.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		e := ICMPUnreachable(netip.MustParseAddr(fam.own), netip.MustParseAddr(fam.far), quoted)
		b, err := e.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		verify(t, b)
		p, err := ParsePacket(b)
		if err != nil {
			t.Fatal(err)
		}
		if !p.IsICMPError() {
			t.Fatalf("%s is not an ICMP error", p)
		}
		q, err := p.Quoted()
		if err != nil {
			t.Fatal(err)
		}
		if q.Dst.Port() != 41000 || string(q.Payload) != "secret" {
			t.Errorf("quote of %s: %s %q", p, q, q.Payload)
		}
	}
}

func TestFrames(t *testing.T) {
	dst, src := net.HardwareAddr{2, 0, 0, 0, 0, 1}, net.HardwareAddr{2, 0, 0, 0, 0, 2}
	ip, _ := Packet{Src: netip.MustParseAddrPort("[2001:db8::1]:1"), Dst: netip.MustParseAddrPort("[2001:db8::2]:2"), Proto: unix.IPPROTO_UDP}.Marshal()
	f := EthernetFrame(dst, src, []VLANTag{{TPID: unix.ETH_P_8021AD}, {TPID: unix.ETH_P_8021Q, VID: 5}}, ip)
	want := []uint16{unix.ETH_P_8021AD, 0, unix.ETH_P_8021Q, 5, unix.ETH_P_IPV6}
	for i, w := range want {
		if got := binary.BigEndian.Uint16(f[12+2*i:]); got != w {
			t.Errorf("frame word %d = %#x, want %#x", i, got, w)
		}
	}
	v := VXLAN(FlannelVNI, f)
	if v[0] != 0x08 || binary.BigEndian.Uint32(v[4:])>>8 != FlannelVNI || !bytes.Equal(v[8:], f) {
		t.Errorf("VXLAN header %x", v[:8])
	}
}

func TestKubeProxyRuleset(t *testing.T) {
	kp := KubeProxy{
		ClusterCIDRs: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/25")},
		Services: []Service{{Name: "a/b", ClusterIPs: []netip.Addr{netip.MustParseAddr("198.51.100.140")}, Port: 80, NodePort: 30080,
			ExternalIPs: []netip.Addr{netip.MustParseAddr("198.51.100.200")},
			Endpoints:   []netip.AddrPort{netip.MustParseAddrPort("203.0.113.10:8080"), netip.MustParseAddrPort("[2001:db8:ff::10]:8080")}}},
		HostPorts: []HostPort{{Protocol: "tcp", Port: 8088, Pod: netip.MustParseAddrPort("198.51.100.3:8080")}},
	}
	rs, err := kp.Ruleset()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"meta mark set meta mark | 0x4000",
		"ip daddr 198.51.100.140 meta l4proto { tcp, udp } th dport 80 ip saddr != { 198.51.100.0/25 } jump mark-masq",
		"ip daddr 198.51.100.200 meta l4proto { tcp, udp } th dport 80 dnat to 203.0.113.10:8080",
		"meta l4proto { tcp, udp } th dport 30080 dnat to [2001:db8:ff::10]:8080",
		"fib daddr type local tcp dport 8088 dnat to 198.51.100.3:8080",
		"meta mark set meta mark & 0xffffbfff masquerade",
	} {
		if !bytes.Contains([]byte(rs), []byte(want)) {
			t.Errorf("ruleset lacks %q:\n%s", want, rs)
		}
	}
}

// IPv4 options: padded into the header (IHL counts them), the header
// checksum covers them, and with a source route the UDP checksum is the
// final destination's (as the receiver checks it).
func TestMarshalIPOptions(t *testing.T) {
	final := netip.MustParseAddr("203.0.113.10")
	p := Packet{Src: netip.MustParseAddrPort("198.51.100.67:4000"), Dst: netip.MustParseAddrPort("192.0.2.6:8080"),
		Proto: unix.IPPROTO_UDP, Payload: []byte("x"), IPOptions: append([]byte{131, 7, 4}, final.AsSlice()...)}
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if hl := int(b[0]&0x0f) * 4; hl != 28 || b[20] != 131 || b[27] != 0 {
		t.Fatalf("header length %d, options % x", hl, b[20:28])
	}
	if checksum(b[:28], 0) != 0 {
		t.Error("IPv4 header checksum does not cover the options")
	}
	if got := checksum(b[28:], pseudo4(p.Src.Addr(), final, unix.IPPROTO_UDP, len(b)-28)); got != 0 {
		t.Errorf("UDP checksum is not the final destination's (residue %#x)", got)
	}
	q, err := ParsePacket(b)
	if err != nil || q.Dst != p.Dst || string(q.Payload) != "x" {
		t.Fatalf("parse: %v %v", q, err)
	}
}

func TestMarshalHopByHop(t *testing.T) {
	p := Packet{Src: netip.MustParseAddrPort("[2001:db8:ff::10]:4000"), Dst: netip.MustParseAddrPort("[2001:db8:e::2]:8080"),
		Proto: unix.IPPROTO_UDP, Payload: []byte("exfil"), HopByHop: []byte{0x80, 0}}
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	// next header 0 (Hop-by-Hop), then: next header UDP, length 0 (8
	// bytes), option 0x80 of length 0, PadN of 2 bytes.
	if b[6] != 0 || !bytes.Equal(b[40:48], []byte{unix.IPPROTO_UDP, 0, 0x80, 0, 1, 2, 0, 0}) {
		t.Fatalf("next header %d, extension % x", b[6], b[40:48])
	}
	if n := int(binary.BigEndian.Uint16(b[4:])); n != len(b)-40 {
		t.Errorf("payload length %d, want %d", n, len(b)-40)
	}
	if got := checksum(b[48:], pseudo6(p.Src.Addr(), p.Dst.Addr(), unix.IPPROTO_UDP, len(b)-48)); got != 0 {
		t.Errorf("UDP checksum residue %#x", got)
	}
	q, err := ParsePacket(b)
	if err != nil || q.Proto != unix.IPPROTO_UDP || q.Dst != p.Dst || string(q.Payload) != "exfil" {
		t.Fatalf("parse: %+v %v", q, err)
	}
	if _, err := (Packet{Src: p.Src, Dst: p.Dst, Proto: unix.IPPROTO_UDP, IPOptions: []byte{1}}).Marshal(); err == nil {
		t.Error("IPv4 options on an IPv6 packet were accepted")
	}
}
