package sim

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nscore"
)

// Captured is one packet a Recorder saw arrive.
type Captured struct {
	// Seq numbers captures in arrival order, from 1.
	Seq int
	At  time.Time
	Packet
}

// Recorder keeps every IPv4 and IPv6 packet that arrives on one
// interface of a namespace (a packet socket, so it sees what arrived
// whatever the host's stack then does with it): the evidence of what the
// internet host saw.
type Recorder struct {
	mu   sync.Mutex
	pkts []Captured
	stop atomic.Bool
	done chan struct{}
}

// Record starts a Recorder on ifname inside n; cl stops it.
func Record(cl *Cleanups, n ns.NetNS, ifname string) (*Recorder, error) {
	var fd int
	err := n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto); err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.Attrs().Index}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind to %s: %w", ifname, err)
		}
		tv := unix.NsecToTimeval(int64(50 * time.Millisecond))
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return err
		}
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	})
	if err != nil {
		return nil, fmt.Errorf("recorder on %s: %w", ifname, err)
	}
	r := &Recorder{done: make(chan struct{})}
	go r.loop(fd)
	cl.Push(func() {
		r.stop.Store(true)
		<-r.done
	})
	return r, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (r *Recorder) loop(fd int) {
	defer close(r.done)
	defer unix.Close(fd)
	buf := make([]byte, 65536)
	for !r.stop.Load() {
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		f := buf[:n]
		if len(f) < 14 {
			continue
		}
		et, off := binary.BigEndian.Uint16(f[12:]), 14
		for (et == unix.ETH_P_8021Q || et == unix.ETH_P_8021AD) && len(f) >= off+4 {
			et, off = binary.BigEndian.Uint16(f[off+2:]), off+4
		}
		if et != unix.ETH_P_IP && et != unix.ETH_P_IPV6 {
			continue
		}
		p, err := ParsePacket(append([]byte(nil), f[off:]...))
		if err != nil {
			continue
		}
		r.mu.Lock()
		r.pkts = append(r.pkts, Captured{Seq: len(r.pkts) + 1, At: time.Now(), Packet: p})
		r.mu.Unlock()
	}
}

// Mark is the number of packets captured so far: Since(Mark()) later
// returns what came after.
func (r *Recorder) Mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.pkts)
}

// Since returns the packets captured after mark that match (every packet
// if match is nil).
func (r *Recorder) Since(mark int, match func(Packet) bool) []Captured {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Captured
	for _, c := range r.pkts[min(mark, len(r.pkts)):] {
		if match == nil || match(c.Packet) {
			out = append(out, c)
		}
	}
	return out
}

// Wait waits up to timeout for a packet after mark that matches, and
// returns every match so far.
func (r *Recorder) Wait(mark int, match func(Packet) bool, timeout time.Duration) []Captured {
	deadline := time.Now().Add(timeout)
	for {
		if got := r.Since(mark, match); len(got) > 0 || time.Now().After(deadline) {
			return got
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// IsNoise says whether a captured packet is link-local chatter
// (neighbour discovery, MLD, router solicitations, multicast) rather
// than traffic addressed to the host.
func IsNoise(p Packet) bool {
	d := p.Dst.Addr()
	return d.IsMulticast() || d.IsLinkLocalUnicast() || p.Src.Addr().IsLinkLocalUnicast() || !p.Src.Addr().IsValid() || p.Src.Addr().IsUnspecified()
}

// SinkConn is what a Sink connection received.
type SinkConn struct {
	Remote netip.AddrPort
	Data   []byte
}

// Sink is a TCP server that keeps every connection open (until its
// client closes, 30 s pass or the sink stops) and keeps what each sent:
// the far end of a long-lived flow whose tuple an attacker may try to
// ride.
type Sink struct {
	mu     sync.Mutex
	conns  []*sinkConn
	open   []io.Closer
	closed bool
	wg     sync.WaitGroup
}

type sinkConn struct {
	remote netip.AddrPort
	data   []byte
}

// ServeSink starts a Sink on each address inside n; cl stops it.
func ServeSink(cl *Cleanups, n ns.NetNS, addrs ...netip.AddrPort) (*Sink, error) {
	k := &Sink{}
	cl.Push(k.close)
	for _, a := range addrs {
		fam := "tcp4"
		if a.Addr().Is6() {
			fam = "tcp6"
		}
		l, err := nscore.Listen(n, fam, a.String(), nil)
		if err != nil {
			return nil, fmt.Errorf("sink on %s: %w", a, err)
		}
		if !k.track(l) {
			return nil, errors.New("sink stopped")
		}
		k.wg.Add(1)
		go k.accept(l)
	}
	return k, nil
}

// track registers c to be closed at stop; false if the sink stopped.
func (k *Sink) track(c io.Closer) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		c.Close()
		return false
	}
	k.open = append(k.open, c)
	return true
}

func (k *Sink) accept(l net.Listener) {
	defer k.wg.Done()
	nscore.AcceptLoop(l, func(c net.Conn) bool {
		if !k.track(c) {
			return false
		}
		ap, _ := netip.ParseAddrPort(c.RemoteAddr().String())
		sc := &sinkConn{remote: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
		k.mu.Lock()
		k.conns = append(k.conns, sc)
		k.mu.Unlock()
		k.wg.Add(1)
		go func() {
			defer k.wg.Done()
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			buf := make([]byte, 4096)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					k.mu.Lock()
					sc.data = append(sc.data, buf[:n]...)
					k.mu.Unlock()
				}
				if err != nil {
					return
				}
			}
		}()
		return true
	})
}

func (k *Sink) close() {
	k.mu.Lock()
	k.closed = true
	open := k.open
	k.open = nil
	k.mu.Unlock()
	for _, c := range open {
		_ = c.Close()
	}
	k.wg.Wait()
}

// Conns returns what every connection so far received.
func (k *Sink) Conns() []SinkConn {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []SinkConn
	for _, c := range k.conns {
		out = append(out, SinkConn{Remote: c.remote, Data: append([]byte(nil), c.data...)})
	}
	return out
}
