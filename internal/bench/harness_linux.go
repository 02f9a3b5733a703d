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

	"github.com/egress-cni/egress-cni/internal/nscore"
)

// nsRegistry remembers every namespace the bench creates, so that a
// failure or a signal still removes them all.
type nsRegistry struct {
	mu  sync.Mutex
	all map[string]func() error
}

var registry = &nsRegistry{all: map[string]func() error{}}

// newNS creates a bind-mounted namespace with lo up (nscore.NewNS).
func newNS() (ns.NetNS, error) {
	n, remove, err := nscore.NewNS()
	if err != nil {
		return nil, err
	}
	registry.mu.Lock()
	registry.all[n.Path()] = remove
	registry.mu.Unlock()
	return n, nil
}

// delNS closes and unmounts a namespace; the kernel frees it (and every
// rule, link and socket in it) when the last reference goes.
func delNS(n ns.NetNS) { removeNS(n.Path()) }

func removeNS(path string) {
	registry.mu.Lock()
	remove := registry.all[path]
	delete(registry.all, path)
	registry.mu.Unlock()
	if remove != nil {
		_ = remove()
	}
}

// Cleanup removes every namespace still registered.
func Cleanup() {
	registry.mu.Lock()
	left := make([]string, 0, len(registry.all))
	for p := range registry.all {
		left = append(left, p)
	}
	registry.mu.Unlock()
	for _, p := range left {
		removeNS(p)
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
	out := nscore.LimitedBuffer{Max: 16 << 10}
	cmd.Stdout, cmd.Stderr = &out, &out
	err := n.Do(func(ns.NetNS) error {
		start := time.Now()
		err := cmd.Run()
		p.Took = time.Since(start)
		return err
	})
	if err != nil {
		return p, fmt.Errorf("%s %q: %w: %s", name, shorten(args), err, bytes.TrimSpace(out.Bytes()))
	}
	p.Out = out.Bytes()
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
// Percentile is the nearest-rank percentile p of s (0 for none).
func Percentile(s []time.Duration, p int) time.Duration {
	if len(s) == 0 {
		return 0
	}
	s = slices.Clone(s)
	slices.Sort(s)
	return rank(s, p)
}

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
