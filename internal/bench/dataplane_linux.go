//go:build linux

package bench

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DataRow is one data-plane point.
type DataRow struct {
	Backend string // "none": no rules, the client connects to the listener directly
	N       int
	Rate    float64 // connections per second: median over the slices
	Mean    float64 // connections per second over all slices together
	Conns   int
	Window  time.Duration
	Slices  []float64 // each slice's rate
}

// capturedDst is where the pod's client connects: an on-link address of
// the pod's veth that nothing owns, so only the redirect can
// answer. No packet leaves the namespace.
var capturedDst = netip.MustParseAddr("192.0.2.99")

// dataRounds: each point's window is split into this many slices,
// taken in turn across all points, so that a noisy moment of the machine
// hits every backend and N alike; the reported rate is the median slice,
// which a burst of load from elsewhere does not move much.
const dataRounds = 15

// measureDataPlane counts sequential new TCP connections per second from
// a pod namespace through the redirect to a listener on 15001.
func (b *Bench) measureDataPlane() ([]DataRow, error) {
	// Reference: the same loop with no rules, straight to the listener.
	g := []DataRow{{Backend: "none"}}
	for _, be := range append(slices.Clone(Backends), "nftfloor") {
		for _, n := range b.cfg.DataNs {
			g = append(g, DataRow{Backend: be, N: n})
		}
	}
	pods := make([]*dataPod, len(g))
	defer func() {
		for _, p := range pods {
			if p != nil {
				if p.srv != nil {
					p.srv.stop()
				}
				delNS(p.ns)
			}
		}
	}()
	for i, r := range g {
		p, err := b.dataSetup(r.Backend, r.N)
		if p != nil {
			pods[i] = p
		}
		if err != nil {
			return nil, err
		}
	}
	for range dataRounds {
		for i, p := range pods {
			c, d, err := connectLoop(p.ns, p.dst, b.cfg.DataWindow/dataRounds)
			if err != nil {
				return nil, fmt.Errorf("data plane %s N=%d: %w", g[i].Backend, g[i].N, err)
			}
			g[i].Conns += c
			g[i].Window += d
			g[i].Slices = append(g[i].Slices, float64(c)/d.Seconds())
		}
	}
	for i, p := range pods {
		// Every counted connection must have reached the listener
		// through the redirect; nothing else answers at the address.
		if got := p.srv.waitAccepted(int64(g[i].Conns), 2*time.Second); got < int64(g[i].Conns) {
			return nil, fmt.Errorf("data plane %s N=%d: %d connections counted but the listener accepted %d", g[i].Backend, g[i].N, g[i].Conns, got)
		}
		g[i].Mean = float64(g[i].Conns) / g[i].Window.Seconds()
		g[i].Rate = medianF(g[i].Slices)
		logf("data plane %s N=%d: %.0f conn/s", g[i].Backend, g[i].N, g[i].Rate)
	}
	return g, nil
}

// dataPod is one pod namespace with rules and a listener.
type dataPod struct {
	ns  ns.NetNS
	srv *server
	dst netip.AddrPort
}

func (b *Bench) dataSetup(be string, n int) (*dataPod, error) {
	pod, err := newNS()
	if err != nil {
		return nil, err
	}
	p := &dataPod{ns: pod, dst: netip.AddrPortFrom(capturedDst, 80)}
	err = pod.Do(func(ns.NetNS) error {
		if err := addLink("bench0", netip.MustParsePrefix("192.0.2.2/24")); err != nil {
			return err
		}
		// A wide port range; the client's RST close leaves no TIME_WAIT.
		return os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("1024 65000"), 0o644)
	})
	if err != nil {
		return p, fmt.Errorf("could not set up the pod namespace: %w", err)
	}
	switch be {
	case "none":
		p.dst = netip.MustParseAddrPort("127.0.0.1:15001")
	case "nftfloor":
		// The floor's three rules: the kernel's own cost of the set.
		if _, err := runIn(pod, nil, nil, b.cfg.NFTFloor, "-netns", pod.Path(), "-n", fmt.Sprint(n)); err != nil {
			return p, err
		}
	default:
		bare := excludedCIDRs(n)
		for i := range bare {
			bare[i] = strings.TrimSuffix(bare[i], "/32")
		}
		if _, err := runIn(pod, nil, nil, b.cfg.EgressInit, initArgs(be, pod.Path(), strings.Join(bare, ","))...); err != nil {
			return p, err
		}
	}
	p.srv, err = listen(pod, netip.MustParseAddrPort("0.0.0.0:15001"))
	return p, err
}

// addLink adds an interface holding addr, so that addr's subnet is
// on-link.
func addLink(name string, addr netip.Prefix) error {
	// A veth pair with both ends here: the dummy driver may be missing.
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
		return fmt.Errorf("could not add %s: %w", name, err)
	}
	if p, err := netlink.LinkByName(name + "p"); err != nil {
		return err
	} else if err := netlink.LinkSetUp(p); err != nil {
		return err
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	a, err := netlink.ParseAddr(addr.String())
	if err != nil {
		return err
	}
	if err := netlink.AddrAdd(l, a); err != nil {
		return err
	}
	return netlink.LinkSetUp(l)
}

// server accepts and resets connections on a blocking socket in its own
// OS thread.
type server struct {
	fd       int
	accepted atomic.Int64
	done     chan struct{}
}

func listen(n ns.NetNS, at netip.AddrPort) (*server, error) {
	s := &server{done: make(chan struct{})}
	err := n.Do(func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(at.Port()), Addr: at.Addr().As4()}); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Listen(fd, 4096); err != nil {
			unix.Close(fd)
			return err
		}
		s.fd = fd
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("could not listen on %s: %w", at, err)
	}
	go func() {
		runtime.LockOSThread()
		defer close(s.done)
		for {
			c, _, err := unix.Accept4(s.fd, unix.SOCK_CLOEXEC)
			if err != nil {
				if errors.Is(err, unix.ECONNABORTED) || errors.Is(err, unix.EINTR) {
					continue
				}
				return // shut down
			}
			s.accepted.Add(1)
			_ = unix.SetsockoptLinger(c, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
			unix.Close(c)
		}
	}()
	return s, nil
}

// waitAccepted waits until the server has accepted at least n
// connections since the last call, or the timeout passes, and returns
// how many it accepted (and resets the count).
func (s *server) waitAccepted(n int64, timeout time.Duration) int64 {
	deadline := time.Now().Add(timeout)
	for s.accepted.Load() < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	return s.accepted.Swap(0)
}

func (s *server) stop() {
	_ = unix.Shutdown(s.fd, unix.SHUT_RDWR)
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
	}
	unix.Close(s.fd)
}

// connectLoop opens and resets (SO_LINGER 0) one TCP connection after
// another to dst from inside n for the window, and counts the
// connections that completed the handshake. Bounded in time and count.
func connectLoop(n ns.NetNS, dst netip.AddrPort, window time.Duration) (int, time.Duration, error) {
	const warmup = 50
	const maxConns = 5_000_000
	sa := &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
	linger := &unix.Linger{Onoff: 1, Linger: 0}
	tv := unix.NsecToTimeval(int64(time.Second))
	var count, fails int
	var took time.Duration
	err := n.Do(func(ns.NetNS) error {
		// Warm up (caches, the listener's thread), untimed.
		for range warmup {
			if fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err == nil {
				_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
				_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, linger)
				_ = unix.Connect(fd, sa)
				unix.Close(fd)
			}
		}
		start := time.Now()
		deadline := start.Add(window)
		for count < maxConns {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
			_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, linger)
			err = unix.Connect(fd, sa)
			unix.Close(fd)
			if err != nil {
				fails++
				if fails > 100 {
					return fmt.Errorf("connect to %s failed %d times, last: %w", dst, fails, err)
				}
			} else {
				count++
			}
			if count%64 == 0 && time.Now().After(deadline) {
				break
			}
		}
		took = time.Since(start)
		return nil
	})
	return count, took, err
}

func medianF(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}
