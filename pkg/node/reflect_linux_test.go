package node

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// An IPv4 first fragment whose rest never comes, from an internet source
// to the node: conntrack's defragmenter (prerouting -400) holds it before
// the source chain, and when the queue expires the node answers the
// source with a Time Exceeded quoting it. The output chain keeps that
// answer in the cluster. Control: without the node rules the internet
// host gets the quote; to a cluster source the answer still goes.
func TestFragmentTimeoutReflection(t *testing.T) {
	nstest.RequirePrivileged(t)
	host, inet := nstest.NewNS(t), nstest.NewNS(t)
	nstest.Link(t,
		nstest.LinkEnd{NS: host, Name: "up0", Addrs: []netip.Prefix{netip.MustParsePrefix("192.0.2.1/26")}},
		nstest.LinkEnd{NS: inet, Name: "eth0", Addrs: []netip.Prefix{netip.MustParsePrefix("192.0.2.2/26"), netip.MustParsePrefix("203.0.113.9/32")}})
	nstest.Route(t, host, netip.MustParsePrefix("203.0.113.9/32"), netip.MustParseAddr("192.0.2.2"))
	nstest.Sysctl(t, host, "net.ipv4.ipfrag_time", "1")

	// answered sends the fragment from src and says whether a Time
	// Exceeded quoting it came back to src.
	answered := func(src string) bool {
		t.Helper()
		var fd int
		if err := inet.Do(func(ns.NetNS) error {
			var err error
			fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
			if err != nil {
				return err
			}
			return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 3})
		}); err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		sendFirstFragment(t, inet, netip.MustParseAddr(src), netip.MustParseAddr("192.0.2.1"), []byte("pod data "+src))
		deadline := time.Now().Add(3 * time.Second)
		buf := make([]byte, 2048)
		for time.Now().Before(deadline) {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				return false
			}
			// IP header, then ICMP type 11 code 1 (reassembly time
			// exceeded) whose quote is our fragment, to src.
			if hl := int(buf[0]&0x0f) * 4; n > hl+28 && buf[hl] == 11 && buf[hl+1] == 1 &&
				netip.AddrFrom4([4]byte(buf[16:20])).String() == src {
				return true
			}
		}
		return false
	}

	mustApply(t, host, mustParse(t, `{"role":"app","podCIDRs":["10.244.0.0/16"],"nodeCIDRs":["192.0.2.0/26"]}`))
	if answered("203.0.113.9") {
		t.Error("with the node rules, the node answered an internet source's expired fragment with its data")
	}
	if !answered("192.0.2.2") {
		t.Error("with the node rules, a cluster source's expired fragment got no Time Exceeded")
	}
	c := countersIn(t, host)
	if got := c.ByReason[ReasonReflection][FamilyIPv4]; got != 1 || c.Forged != 1 {
		t.Errorf("reflection/ipv4 %d, forged %d: want 1 and 1", got, c.Forged)
	}
	if err := in(host, Remove); err != nil {
		t.Fatal(err)
	}
	if !answered("203.0.113.9") {
		t.Error("control: without the node rules no Time Exceeded reached the internet host, so the first check cannot fail")
	}
}

// sendFirstFragment sends, from n, an IPv4 UDP first fragment (MF set,
// offset 0) whose rest never comes.
func sendFirstFragment(t *testing.T, n ns.NetNS, src, dst netip.Addr, payload []byte) {
	t.Helper()
	udp := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], 4000)
	binary.BigEndian.PutUint16(udp[2:], 8080)
	binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)+100)) // the whole datagram is longer
	copy(udp[8:], payload)
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(udp)))
	binary.BigEndian.PutUint16(h[4:], uint16(time.Now().UnixNano())) // a new queue each time
	h[6] = 0x20                                                      // more fragments, offset 0
	h[8], h[9] = 64, unix.IPPROTO_UDP
	s, d := src.As4(), dst.As4()
	copy(h[12:], s[:])
	copy(h[16:], d[:])
	pkt := slices.Concat(h, udp)
	if err := n.Do(func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: d})
	}); err != nil {
		t.Fatal(err)
	}
}
