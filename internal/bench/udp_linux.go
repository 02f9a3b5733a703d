//go:build linux

package bench

import (
	"fmt"
	"net/netip"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// udpSink counts the datagrams a UDP socket in n receives.
type udpSink struct {
	fd   int
	got  atomic.Int64
	done chan struct{}
}

func listenUDP(n ns.NetNS, at netip.AddrPort) (*udpSink, error) {
	s := &udpSink{done: make(chan struct{})}
	err := n.Do(func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
		// A receive timeout lets stop() end the loop.
		tv := unix.NsecToTimeval(int64(200 * time.Millisecond))
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(at.Port()), Addr: at.Addr().As4()}); err != nil {
			unix.Close(fd)
			return err
		}
		s.fd = fd
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("could not listen on udp %s: %w", at, err)
	}
	go func() {
		runtime.LockOSThread()
		pin(1)
		defer close(s.done)
		buf := make([]byte, 2048)
		for {
			_, _, err := unix.Recvfrom(s.fd, buf, 0)
			if err == nil {
				s.got.Add(1)
				continue
			}
			if err == unix.EAGAIN || err == unix.EINTR {
				if s.got.Load() < 0 {
					return
				}
				continue
			}
			return
		}
	}()
	return s, nil
}

func (s *udpSink) stop() {
	s.got.Store(-1 << 62)
	<-s.done
	unix.Close(s.fd)
}

// udpLoop sends small datagrams (64 bytes of payload, one flow) from n to
// dst for window and returns how many the sink received and the time.
// Received, not sent: a datagram the node drops or the sink overruns is
// not counted.
func udpLoop(n ns.NetNS, sink *udpSink, dst netip.AddrPort, window time.Duration) (int, time.Duration, error) {
	sa := &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
	payload := make([]byte, 64)
	var took time.Duration
	var got int64
	err := n.Do(func(ns.NetNS) error {
		// Sender and receiver on CPUs of their own (the receiver on 1):
		// unpinned, their scheduling moves the rate run to run (see
		// docs/DESIGN.md, Test harness).
		pin(0)
		defer unpin()
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Connect(fd, sa); err != nil {
			return err
		}
		// Warm up: the flow's conntrack entry, caches.
		for range 1000 {
			_ = unix.Send(fd, payload, 0)
		}
		time.Sleep(20 * time.Millisecond)
		before := sink.got.Load()
		start := time.Now()
		deadline := start.Add(window)
		for i := 0; ; i++ {
			_ = unix.Send(fd, payload, unix.MSG_DONTWAIT)
			if i%256 == 0 && time.Now().After(deadline) {
				break
			}
		}
		took = time.Since(start)
		time.Sleep(20 * time.Millisecond) // let the last ones arrive
		got = sink.got.Load() - before
		return nil
	})
	return int(got), took, err
}

// pin binds the calling (locked) thread to cpu, modulo the CPUs there
// are.
func pin(cpu int) {
	var set unix.CPUSet
	set.Set(cpu % runtime.NumCPU())
	_ = unix.SchedSetaffinity(0, &set)
}

// unpin lets the calling thread run anywhere again.
func unpin() {
	var set unix.CPUSet
	for i := range runtime.NumCPU() {
		set.Set(i)
	}
	_ = unix.SchedSetaffinity(0, &set)
}
