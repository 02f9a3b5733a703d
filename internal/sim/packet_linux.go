package sim

// Packets made by hand, for the attacks of the escape matrix: IPv4 and
// IPv6 datagrams with any 5-tuple (UDP, TCP with chosen flags, sequence
// numbers and options), ICMP errors quoting another flow, Ethernet frames
// with VLAN tags, VXLAN encapsulation; and the ways to send them from
// inside a namespace (a raw IP socket, or a packet socket for whole
// frames). Parsing is the inverse, for the packet recorder.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TCP flags.
const (
	TCPFin = 0x01
	TCPSyn = 0x02
	TCPRst = 0x04
	TCPPsh = 0x08
	TCPAck = 0x10
)

// Packet is one IPv4 or IPv6 packet (the family is the addresses'): UDP,
// TCP, ICMP or ICMPv6. Marshal builds it with correct lengths and
// checksums; ParsePacket reads one.
type Packet struct {
	// Src and Dst are the addresses and, for UDP and TCP, the ports.
	Src, Dst netip.AddrPort
	// Proto is unix.IPPROTO_UDP, IPPROTO_TCP, IPPROTO_ICMP or
	// IPPROTO_ICMPV6.
	Proto uint8
	// TTL is the IPv4 TTL or IPv6 hop limit; 0 means 64.
	TTL uint8
	// IPOptions are IPv4 header options, padded to 4 bytes by Marshal.
	// A source route's last address is the final destination: the UDP
	// and TCP checksums are computed for it.
	IPOptions []byte
	// FirstFragment, IPv4 only: the packet is sent as the first fragment
	// (more fragments set, offset 0) of a datagram whose rest never
	// comes; its identification is ID.
	FirstFragment bool
	ID            uint16
	// HopByHop, IPv6 only: the options of a Hop-by-Hop extension header
	// before the upper layer, padded with PadN to 8 bytes by Marshal.
	HopByHop []byte
	// TCP only.
	Flags    uint8
	Seq, Ack uint32
	Window   uint16 // 0 means 64240
	Options  []byte // TCP options, padded to 4 bytes by Marshal
	// ICMP and ICMPv6 only: type, code and the 4 bytes after the
	// checksum (unused in errors, identifier and sequence in echoes).
	Type, Code uint8
	Rest       uint32
	// Payload is what follows the UDP, TCP or ICMP header (for an ICMP
	// error, the quoted packet).
	Payload []byte
}

// Is6 says whether p is IPv6.
func (p Packet) Is6() bool { return p.Src.Addr().Is6() && !p.Src.Addr().Is4In6() }

// String names the packet: "udp 192.0.2.2:4000 -> 203.0.113.10:8080 len 5".
func (p Packet) String() string {
	switch p.Proto {
	case unix.IPPROTO_UDP:
		return fmt.Sprintf("udp %s -> %s len %d", p.Src, p.Dst, len(p.Payload))
	case unix.IPPROTO_TCP:
		return fmt.Sprintf("tcp %s -> %s [%s] len %d", p.Src, p.Dst, tcpFlagString(p.Flags), len(p.Payload))
	case unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6:
		name := "icmp"
		if p.Proto == unix.IPPROTO_ICMPV6 {
			name = "icmpv6"
		}
		s := fmt.Sprintf("%s %s -> %s type %d code %d", name, p.Src.Addr(), p.Dst.Addr(), p.Type, p.Code)
		if p.IsICMPError() {
			if q, err := ParsePacket(p.Payload); err == nil {
				s += " quoting [" + q.String() + "]"
			}
		}
		return s
	}
	return fmt.Sprintf("proto %d %s -> %s", p.Proto, p.Src.Addr(), p.Dst.Addr())
}

func tcpFlagString(f uint8) string {
	var s []string
	for _, x := range []struct {
		bit  uint8
		name string
	}{{TCPSyn, "S"}, {TCPAck, "A"}, {TCPPsh, "P"}, {TCPFin, "F"}, {TCPRst, "R"}} {
		if f&x.bit != 0 {
			s = append(s, x.name)
		}
	}
	return strings.Join(s, "")
}

// IsICMPError says whether p is an ICMP or ICMPv6 error, whose payload
// quotes the packet that caused it.
func (p Packet) IsICMPError() bool {
	switch p.Proto {
	case unix.IPPROTO_ICMP:
		return p.Type == 3 || p.Type == 11 || p.Type == 12
	case unix.IPPROTO_ICMPV6:
		return p.Type >= 1 && p.Type <= 4
	}
	return false
}

// Quoted parses the packet an ICMP error quotes (possibly truncated: a
// quote need only hold the header and 8 bytes).
func (p Packet) Quoted() (Packet, error) {
	if !p.IsICMPError() {
		return Packet{}, errors.New("not an ICMP error")
	}
	return ParsePacket(p.Payload)
}

// ICMPUnreachable is the ICMP error a host on the path would send to
// dst: port unreachable (ICMP type 3 code 3, or ICMPv6 type 1 code 4)
// from src, quoting the packet quoted (which need not be a packet that
// was ever sent: its tuple decides which connection the error is
// RELATED to, and everything after its headers is free data).
func ICMPUnreachable(src, dst netip.Addr, quoted []byte) Packet {
	p := Packet{Src: netip.AddrPortFrom(src, 0), Dst: netip.AddrPortFrom(dst, 0), Proto: unix.IPPROTO_ICMP, Type: 3, Code: 3, Payload: quoted}
	if src.Is6() {
		p.Proto, p.Type, p.Code = unix.IPPROTO_ICMPV6, 1, 4
	}
	return p
}

// Marshal builds the packet.
func (p Packet) Marshal() ([]byte, error) {
	src, dst := p.Src.Addr().Unmap(), p.Dst.Addr().Unmap()
	if !src.IsValid() || !dst.IsValid() || src.Is4() != dst.Is4() {
		return nil, fmt.Errorf("packet %s -> %s: addresses of one family needed", p.Src, p.Dst)
	}
	var l4 []byte
	switch p.Proto {
	case unix.IPPROTO_UDP:
		l4 = make([]byte, 8+len(p.Payload))
		binary.BigEndian.PutUint16(l4[0:], p.Src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.Dst.Port())
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		copy(l4[8:], p.Payload)
	case unix.IPPROTO_TCP:
		opts := append([]byte(nil), p.Options...)
		for len(opts)%4 != 0 {
			opts = append(opts, 0) // end of options list, then padding
		}
		if len(opts) > 40 {
			return nil, fmt.Errorf("tcp options of %d bytes: at most 40", len(opts))
		}
		hl := 20 + len(opts)
		l4 = make([]byte, hl+len(p.Payload))
		binary.BigEndian.PutUint16(l4[0:], p.Src.Port())
		binary.BigEndian.PutUint16(l4[2:], p.Dst.Port())
		binary.BigEndian.PutUint32(l4[4:], p.Seq)
		binary.BigEndian.PutUint32(l4[8:], p.Ack)
		l4[12] = byte(hl/4) << 4
		l4[13] = p.Flags
		w := p.Window
		if w == 0 {
			w = 64240
		}
		binary.BigEndian.PutUint16(l4[14:], w)
		copy(l4[20:], opts)
		copy(l4[hl:], p.Payload)
	case unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6:
		if (p.Proto == unix.IPPROTO_ICMPV6) != src.Is6() {
			return nil, fmt.Errorf("protocol %d does not go with %s", p.Proto, src)
		}
		l4 = make([]byte, 8+len(p.Payload))
		l4[0], l4[1] = p.Type, p.Code
		binary.BigEndian.PutUint32(l4[4:], p.Rest)
		copy(l4[8:], p.Payload)
	default:
		return nil, fmt.Errorf("protocol %d is not supported", p.Proto)
	}
	ttl := p.TTL
	if ttl == 0 {
		ttl = 64
	}
	if src.Is4() {
		opts := append([]byte(nil), p.IPOptions...)
		for len(opts)%4 != 0 {
			opts = append(opts, 0) // end of options list
		}
		hl := 20 + len(opts)
		if len(l4) > 65535-hl || hl > 60 {
			return nil, errors.New("packet too long")
		}
		if p.Proto != unix.IPPROTO_ICMP {
			putL4Checksum(l4, p.Proto, pseudo4(src, finalDst(dst, p.IPOptions), p.Proto, len(l4)))
		} else {
			binary.BigEndian.PutUint16(l4[2:], checksum(l4, 0))
		}
		h := make([]byte, hl, hl+len(l4))
		h[0] = 0x40 | byte(hl/4)
		copy(h[20:], opts)
		binary.BigEndian.PutUint16(h[2:], uint16(hl+len(l4)))
		binary.BigEndian.PutUint16(h[4:], 0x5e5e) // identification
		h[6] = 0x40                               // don't fragment
		if p.FirstFragment {
			binary.BigEndian.PutUint16(h[4:], p.ID)
			h[6] = 0x20 // more fragments, offset 0
		}
		h[8], h[9] = ttl, p.Proto
		s4, d4 := src.As4(), dst.As4()
		copy(h[12:], s4[:])
		copy(h[16:], d4[:])
		binary.BigEndian.PutUint16(h[10:], checksum(h, 0))
		return append(h, l4...), nil
	}
	if p.FirstFragment {
		return nil, errors.New("FirstFragment on an IPv6 packet")
	}
	if len(p.IPOptions) > 0 {
		return nil, errors.New("IPv4 options on an IPv6 packet")
	}
	putL4Checksum(l4, p.Proto, pseudo6(src, dst, p.Proto, len(l4)))
	next := p.Proto
	if len(p.HopByHop) > 0 {
		ext := append([]byte{p.Proto, 0}, p.HopByHop...)
		if pad := (8 - len(ext)%8) % 8; pad == 1 {
			ext = append(ext, 0) // Pad1
		} else if pad > 1 {
			ext = append(ext, 1, byte(pad-2)) // PadN
			ext = append(ext, make([]byte, pad-2)...)
		}
		if len(ext) > 2048 {
			return nil, errors.New("hop-by-hop options too long")
		}
		ext[1] = byte(len(ext)/8 - 1)
		next, l4 = 0, append(ext, l4...)
	}
	if len(l4) > 65535 {
		return nil, errors.New("packet too long")
	}
	h := make([]byte, 40, 40+len(l4))
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(len(l4)))
	h[6], h[7] = next, ttl
	s16, d16 := src.As16(), dst.As16()
	copy(h[8:], s16[:])
	copy(h[24:], d16[:])
	return append(h, l4...), nil
}

// finalDst is the last address of a loose or strict source route among
// the IPv4 options, else dst.
func finalDst(dst netip.Addr, opts []byte) netip.Addr {
	for i := 0; i < len(opts); {
		switch t := opts[i]; {
		case t == 0:
			return dst
		case t == 1:
			i++
			continue
		case i+1 >= len(opts) || opts[i+1] < 2 || i+int(opts[i+1]) > len(opts):
			return dst
		case (t == 131 || t == 137) && opts[i+1] >= 7:
			end := i + int(opts[i+1])
			return netip.AddrFrom4([4]byte(opts[end-4 : end]))
		}
		i += int(opts[i+1])
	}
	return dst
}

func putL4Checksum(l4 []byte, proto uint8, pseudo uint32) {
	off := map[uint8]int{unix.IPPROTO_UDP: 6, unix.IPPROTO_TCP: 16, unix.IPPROTO_ICMPV6: 2}[proto]
	c := checksum(l4, pseudo)
	if proto == unix.IPPROTO_UDP && c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(l4[off:], c)
}

func pseudo4(src, dst netip.Addr, proto uint8, n int) uint32 {
	s, d := src.As4(), dst.As4()
	var b [12]byte
	copy(b[0:], s[:])
	copy(b[4:], d[:])
	b[9] = proto
	binary.BigEndian.PutUint16(b[10:], uint16(n))
	return sum(b[:], 0)
}

func pseudo6(src, dst netip.Addr, proto uint8, n int) uint32 {
	s, d := src.As16(), dst.As16()
	var b [40]byte
	copy(b[0:], s[:])
	copy(b[16:], d[:])
	binary.BigEndian.PutUint32(b[32:], uint32(n))
	b[39] = proto
	return sum(b[:], 0)
}

func sum(b []byte, acc uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		acc += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		acc += uint32(b[len(b)-1]) << 8
	}
	return acc
}

// checksum is the Internet checksum of b (its checksum field zero) plus
// a pseudo-header sum.
func checksum(b []byte, pseudo uint32) uint16 {
	acc := sum(b, pseudo)
	for acc>>16 != 0 {
		acc = acc&0xffff + acc>>16
	}
	return ^uint16(acc)
}

// ParsePacket reads an IPv4 or IPv6 packet. A truncated transport
// header (a quote in an ICMP error may end after 8 bytes) leaves the
// fields it lacks zero.
func ParsePacket(b []byte) (Packet, error) {
	var p Packet
	if len(b) < 1 {
		return p, errors.New("empty packet")
	}
	var src, dst netip.Addr
	var l4 []byte
	switch b[0] >> 4 {
	case 4:
		hl := int(b[0]&0x0f) * 4
		if len(b) < 20 || hl < 20 || len(b) < hl {
			return p, errors.New("truncated IPv4 header")
		}
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
		p.TTL, p.Proto = b[8], b[9]
		end := int(binary.BigEndian.Uint16(b[2:]))
		if end > len(b) || end < hl {
			end = len(b)
		}
		l4 = b[hl:end]
	case 6:
		if len(b) < 40 {
			return p, errors.New("truncated IPv6 header")
		}
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
		p.Proto, p.TTL = b[6], b[7]
		end := 40 + int(binary.BigEndian.Uint16(b[4:]))
		if end > len(b) {
			end = len(b)
		}
		l4 = b[40:end]
		// Hop-by-hop, routing and destination options: skip them.
		for (p.Proto == 0 || p.Proto == 43 || p.Proto == 60) && len(l4) >= 8 {
			n := 8 + int(l4[1])*8
			if n > len(l4) {
				break
			}
			p.Proto, l4 = l4[0], l4[n:]
		}
	default:
		return p, fmt.Errorf("IP version %d", b[0]>>4)
	}
	var sport, dport uint16
	switch p.Proto {
	case unix.IPPROTO_UDP:
		if len(l4) >= 4 {
			sport, dport = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		}
		if len(l4) >= 8 {
			p.Payload = l4[8:]
		}
	case unix.IPPROTO_TCP:
		if len(l4) >= 4 {
			sport, dport = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		}
		if len(l4) >= 8 {
			p.Seq = binary.BigEndian.Uint32(l4[4:])
		}
		if len(l4) >= 20 {
			p.Ack = binary.BigEndian.Uint32(l4[8:])
			p.Flags, p.Window = l4[13], binary.BigEndian.Uint16(l4[14:])
			if hl := int(l4[12]>>4) * 4; hl >= 20 && hl <= len(l4) {
				p.Options, p.Payload = l4[20:hl], l4[hl:]
			}
		}
	case unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6:
		if len(l4) >= 8 {
			p.Type, p.Code, p.Rest, p.Payload = l4[0], l4[1], binary.BigEndian.Uint32(l4[4:]), l4[8:]
		}
	}
	p.Src, p.Dst = netip.AddrPortFrom(src, sport), netip.AddrPortFrom(dst, dport)
	return p, nil
}

// VLANTag is one 802.1Q (TPID 0x8100) or 802.1ad (0x88a8) tag. VID 0 is
// a priority tag: a receiver treats the frame as untagged.
type VLANTag struct {
	TPID uint16
	VID  uint16
}

// EthernetFrame wraps an IP packet in an Ethernet header, with the tags
// in order, outermost first.
func EthernetFrame(dst, src net.HardwareAddr, tags []VLANTag, ipPacket []byte) []byte {
	f := make([]byte, 0, 14+4*len(tags)+len(ipPacket))
	f = append(f, dst[:6]...)
	f = append(f, src[:6]...)
	for _, t := range tags {
		f = binary.BigEndian.AppendUint16(f, t.TPID)
		f = binary.BigEndian.AppendUint16(f, t.VID&0x0fff)
	}
	et := uint16(unix.ETH_P_IP)
	if len(ipPacket) > 0 && ipPacket[0]>>4 == 6 {
		et = unix.ETH_P_IPV6
	}
	f = binary.BigEndian.AppendUint16(f, et)
	return append(f, ipPacket...)
}

// VXLAN is the payload of a VXLAN datagram: the 8-byte header (flags
// with the VNI bit, the VNI) and the inner Ethernet frame.
func VXLAN(vni uint32, frame []byte) []byte {
	h := make([]byte, 8, 8+len(frame))
	h[0] = 0x08
	binary.BigEndian.PutUint32(h[4:], vni<<8)
	return append(h, frame...)
}

// SendRaw sends one IP packet, header included, from a raw socket inside
// n (as root: CAP_NET_RAW, which containerd's default capability set
// gives every container). The kernel routes it by its destination and
// sends it as it is: any source, any tuple.
func SendRaw(n ns.NetNS, pkt []byte) error {
	p, err := ParsePacket(pkt)
	if err != nil {
		return err
	}
	return n.Do(func(ns.NetNS) error {
		var fam int
		var sa unix.Sockaddr
		if p.Is6() {
			fam, sa = unix.AF_INET6, &unix.SockaddrInet6{Addr: p.Dst.Addr().As16()}
		} else {
			fam, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: p.Dst.Addr().As4()}
		}
		// IPPROTO_RAW implies IP_HDRINCL (and IPV6_HDRINCL).
		fd, err := unix.Socket(fam, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return fmt.Errorf("raw socket: %w", err)
		}
		defer unix.Close(fd)
		if err := unix.Sendto(fd, pkt, 0, sa); err != nil {
			return fmt.Errorf("raw send of %s: %w", p, err)
		}
		return nil
	})
}

// SendFrame sends one whole Ethernet frame out of ifname inside n from a
// packet socket (root: CAP_NET_RAW).
func SendFrame(n ns.NetNS, ifname string, frame []byte) error {
	return n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: l.Attrs().Index, Halen: 6}
		copy(sa.Addr[:], frame[:6])
		if err := unix.Sendto(fd, frame, 0, sa); err != nil {
			return fmt.Errorf("frame out of %s: %w", ifname, err)
		}
		return nil
	})
}

// GatewayMAC is the link-layer address of the pod's IPv4 (or IPv6)
// gateway as the pod's eth0 has resolved it (the bridge, or the routed
// veth's host side); it resolves it first if needed.
func (p *Pod) GatewayMAC(v6 bool) (net.HardwareAddr, error) {
	gw := p.GW4
	if v6 {
		gw = p.GW6
	}
	if !gw.IsValid() {
		return nil, fmt.Errorf("pod %s has no gateway of that family", p.Name)
	}
	var mac net.HardwareAddr
	lookup := func() error {
		return p.NS.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			fam := netlink.FAMILY_V4
			if v6 {
				fam = netlink.FAMILY_V6
			}
			ns, err := netlink.NeighList(l.Attrs().Index, fam)
			if err != nil {
				return err
			}
			for _, n := range ns {
				a, _ := netip.AddrFromSlice(n.IP)
				if a.Unmap() == gw && len(n.HardwareAddr) == 6 && n.State&(netlink.NUD_REACHABLE|netlink.NUD_STALE|netlink.NUD_DELAY|netlink.NUD_PROBE|netlink.NUD_PERMANENT) != 0 {
					mac = n.HardwareAddr
				}
			}
			return nil
		})
	}
	if err := lookup(); err != nil {
		return nil, err
	}
	if mac == nil {
		p.ResolveNeighbours()
		if err := lookup(); err != nil {
			return nil, err
		}
	}
	if mac == nil {
		return nil, fmt.Errorf("pod %s: gateway %s not resolved", p.Name, gw)
	}
	return mac, nil
}

// LinkMAC is the hardware address of ifname inside n.
func LinkMAC(n ns.NetNS, ifname string) (net.HardwareAddr, error) {
	var mac net.HardwareAddr
	err := n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		mac = l.Attrs().HardwareAddr
		return nil
	})
	return mac, err
}
