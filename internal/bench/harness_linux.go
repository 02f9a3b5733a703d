//go:build linux

// Package bench is `make bench`: it measures egress-init, the egress-cni
// plugin, the data plane and the node layer against floors taken the
// same way in the same run, and writes bench/results.md and a chart.
//
// Everything happens in network namespaces the bench creates and removes
// (documentation ranges only); the root namespace's firewall, routes and
// links are never touched.
package bench

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
)

// nsRegistry remembers every namespace the bench creates, so that a
// failure or a signal still removes them all.
type nsRegistry struct {
	mu  sync.Mutex
	all map[string]ns.NetNS
}

var registry = &nsRegistry{all: map[string]ns.NetNS{}}

// newNS creates a bind-mounted namespace with lo up.
func newNS() (ns.NetNS, error) {
	n, err := testutils.NewNS()
	if err != nil {
		return nil, fmt.Errorf("could not create network namespace: %w", err)
	}
	registry.mu.Lock()
	registry.all[n.Path()] = n
	registry.mu.Unlock()
	err = n.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	if err != nil {
		delNS(n)
		return nil, fmt.Errorf("could not bring lo up in %s: %w", n.Path(), err)
	}
	return n, nil
}

// delNS closes and unmounts a namespace; the kernel frees it (and every
// rule, link and socket in it) when the last reference goes.
func delNS(n ns.NetNS) {
	registry.mu.Lock()
	delete(registry.all, n.Path())
	registry.mu.Unlock()
	_ = n.Close()
	_ = testutils.UnmountNS(n)
}

// Cleanup removes every namespace still registered.
func Cleanup() {
	registry.mu.Lock()
	left := make([]ns.NetNS, 0, len(registry.all))
	for _, n := range registry.all {
		left = append(left, n)
	}
	registry.mu.Unlock()
	for _, n := range left {
		delNS(n)
	}
}

// proc is one timed process run.
type proc struct {
	Took time.Duration
	Out  []byte // stdout and stderr, the first 16 KiB
}

// runIn forks and execs a process from an OS thread that has joined n, so
// the child starts in n without an extra exec (as `ip netns exec` would
// add). The timer covers fork, exec, the run and wait4.
func runIn(n ns.NetNS, stdin []byte, env []string, name string, args ...string) (proc, error) {
	var p proc
	cmd := exec.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	if env != nil {
		cmd.Env = env
	}
	var out limited
	cmd.Stdout, cmd.Stderr = &out, &out
	err := n.Do(func(ns.NetNS) error {
		start := time.Now()
		err := cmd.Run()
		p.Took = time.Since(start)
		return err
	})
	if err != nil {
		return p, fmt.Errorf("%s %q: %w: %s", name, shorten(args), err, bytes.TrimSpace(out.b))
	}
	p.Out = out.b
	return p, nil
}

// appliedIn is the program's own "applied in DURATION" figure (egress-init
// and nftfloor print it on stderr), or 0.
func appliedIn(out []byte) time.Duration {
	_, rest, ok := bytes.Cut(out, []byte("applied in "))
	if !ok {
		return 0
	}
	f := bytes.Fields(rest)
	if len(f) == 0 {
		return 0
	}
	d, _ := time.ParseDuration(string(f[0]))
	return d
}

func shorten(args []string) []string {
	out := slices.Clone(args)
	for i, a := range out {
		if len(a) > 80 {
			out[i] = a[:80] + "..."
		}
	}
	return out
}

// limited keeps the first 16 KiB written to it.
type limited struct{ b []byte }

func (l *limited) Write(p []byte) (int, error) {
	if room := 16<<10 - len(l.b); room > 0 {
		l.b = append(l.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

// Stats summarises samples.
type Stats struct {
	N                     int
	Median, Min, Max, P50 time.Duration
	P99                   time.Duration
}

func summarize(s []time.Duration) Stats {
	if len(s) == 0 {
		return Stats{}
	}
	s = slices.Clone(s)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return Stats{N: len(s), Median: med, Min: s[0], Max: s[len(s)-1], P50: rank(s, 50), P99: rank(s, 99)}
}

// rank is the nearest-rank percentile of sorted s.
func rank(s []time.Duration, p int) time.Duration {
	r := (p*len(s) + 99) / 100
	return s[max(r, 1)-1]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d.Microseconds())/1000) }

// excludedCIDRs are n /32s at every other address of 10.0.0.0/8, so
// nothing merges and the nftables set really holds n intervals. They are
// rule content only: no traffic is ever sent to them.
func excludedCIDRs(n int) []string {
	out := make([]string, 0, n)
	for i := range n {
		v := uint32(10)<<24 | uint32(2*i)
		out = append(out, fmt.Sprintf("%d.%d.%d.%d/32", byte(v>>24), byte(v>>16), byte(v>>8), byte(v)))
	}
	return out
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}
