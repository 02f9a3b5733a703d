//go:build linux

package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// gnuTime runs a program and reports its peak RSS. Go starts children
// with vfork semantics (CLONE_VM), so the rusage a Go parent gets from
// wait4 carries the parent's own high-water mark into the child's
// ru_maxrss. GNU time forks a real copy of its small self and reads the
// child's ru_maxrss from wait4, which is the child's own figure.
const gnuTime = "/usr/bin/time"

// MemRow is one peak-RSS figure.
type MemRow struct {
	What    string
	Backend string // for the plugin and egress-init rows
	Plugin  bool
	KiB     int64 // largest over the runs
	Runs    int
}

// measureMemory takes the peak RSS of every program at N=10000, each in
// a fresh namespace, started the same way as in its timing section.
func (b *Bench) measureMemory() ([]MemRow, error) {
	if _, err := os.Stat(gnuTime); err != nil {
		return nil, fmt.Errorf("peak RSS needs GNU time (%s, Debian package time): %w", gnuTime, err)
	}
	tmp, err := os.MkdirTemp("", "egress-bench-rss")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	out := filepath.Join(tmp, "rss")
	node, err := newNS()
	if err != nil {
		return nil, err
	}
	defer delNS(node)

	const n = 10000
	cidrs := excludedCIDRs(n)
	bare := make([]string, n)
	for i, c := range cidrs {
		bare[i] = strings.TrimSuffix(c, "/32")
	}
	x := strings.Join(bare, ",")
	iptFile := []byte(iptFloorFile(cidrs))

	type item struct {
		row   MemRow
		stdin func(podPath string) ([]byte, []string, error) // stdin, env
		argv  func(podPath string) []string
		node  bool // start from the node namespace (the plugin)
	}
	var items []item
	items = append(items, item{row: MemRow{What: "/bin/true (what GNU time itself reads for a trivial program)"},
		argv: func(string) []string { return []string{"/bin/true"} }})
	for _, be := range Backends {
		items = append(items, item{row: MemRow{What: "egress-init " + be, Backend: be},
			argv: func(p string) []string { return append([]string{b.cfg.EgressInit}, initArgs(be, p, x)...) }})
	}
	items = append(items,
		item{row: MemRow{What: "nftfloor"}, argv: func(p string) []string { return []string{b.cfg.NFTFloor, "-netns", p, "-n", strconv.Itoa(n)} }},
		item{row: MemRow{What: "iptables-nft-restore"}, stdin: func(string) ([]byte, []string, error) { return iptFile, nil, nil },
			argv: func(string) []string { return []string{"/usr/sbin/iptables-nft-restore", "--noflush"} }},
		item{row: MemRow{What: "iptables-legacy-restore"}, stdin: func(string) ([]byte, []string, error) { return iptFile, nil, nil },
			argv: func(string) []string { return []string{"/usr/sbin/iptables-legacy-restore", "--noflush", "-w", "5"} }},
	)
	id := 900000
	for _, be := range Backends {
		stdin, err := CNIStdin(be, filepath.Join(tmp, "cni.log"), strings.Join(cidrs, ","))
		if err != nil {
			return nil, err
		}
		items = append(items, item{row: MemRow{What: "egress-cni ADD " + be, Backend: be, Plugin: true}, node: true,
			stdin: func(p string) ([]byte, []string, error) {
				id++
				return stdin, CNIEnv("ADD", filepath.Dir(b.cfg.EgressCNI), p, id), nil
			},
			argv: func(string) []string { return []string{b.cfg.EgressCNI} }})
	}

	var rows []MemRow
	for _, it := range items {
		row := it.row
		for range b.cfg.RSSRuns {
			pod, err := newNS()
			if err != nil {
				return nil, err
			}
			var stdin []byte
			var env []string
			if it.stdin != nil {
				if stdin, env, err = it.stdin(pod.Path()); err != nil {
					delNS(pod)
					return nil, err
				}
			}
			from := pod
			if it.node {
				from = node
			}
			args := append([]string{"-f", "%M", "-o", out}, it.argv(pod.Path())...)
			_, err = runIn(from, stdin, env, gnuTime, args...)
			delNS(pod)
			if err != nil {
				return nil, fmt.Errorf("peak RSS of %s: %w", row.What, err)
			}
			data, err := os.ReadFile(out)
			if err != nil {
				return nil, err
			}
			f := strings.Fields(string(data))
			if len(f) == 0 {
				return nil, fmt.Errorf("peak RSS of %s: GNU time wrote nothing", row.What)
			}
			kib, err := strconv.ParseInt(f[len(f)-1], 10, 64)
			if err != nil {
				return nil, fmt.Errorf("peak RSS of %s: %q: %w", row.What, data, err)
			}
			row.KiB = max(row.KiB, kib)
			row.Runs++
		}
		rows = append(rows, row)
	}
	logf("memory: %d programs at N=%d", len(rows), n)
	return rows, nil
}

func mb(kib int64) string { return fmt.Sprintf("%.1f", float64(kib)*1024/1e6) }
