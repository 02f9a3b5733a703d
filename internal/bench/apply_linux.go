//go:build linux

package bench

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// Backends are the three egress-init backends, in report order.
var Backends = []string{"nftables", "iptables-nft", "iptables-legacy"}

// floorOf names the floor each backend is compared with.
var floorOf = map[string]string{
	"nftables":        "nftfloor (1 netlink batch)",
	"iptables-nft":    "iptables-nft-restore",
	"iptables-legacy": "iptables-legacy-restore",
}

// ApplyRow is one (variant, N) cell of the apply table.
type ApplyRow struct {
	Variant string // backend name, or floorOf[backend]
	Backend string
	Floor   bool
	// Diag marks a diagnostic variant (egress-init with GOGC=off), shown
	// but never judged.
	Diag  bool
	N     int
	Stats Stats
	// InProc is the program's own timer ("applied in"): egress-init
	// from joining the namespace to the kernel's reply (Build and flag
	// parsing excluded), nftfloor from opening the socket to the reply.
	InProc Stats
}

// applyCase is one thing timed at one N.
type applyCase struct {
	backend string
	floor   bool
	diag    bool
	run     func(n ns.NetNS) (proc, error)
}

// measureApply times egress-init and its floors as whole processes, each
// run in a fresh namespace. The variants are interleaved run by run, so
// a noisy moment hits all of them alike.
func (b *Bench) measureApply() ([]ApplyRow, error) {
	var rows []ApplyRow
	for _, n := range b.cfg.ApplyNs {
		runs := b.cfg.ApplyRuns
		if n >= 5000 {
			runs = b.cfg.ApplyRunsLarge
		}
		cidrs := excludedCIDRs(n)
		bare := make([]string, len(cidrs))
		for i, c := range cidrs {
			// A single argv string is limited to 128 KiB (MAX_ARG_STRLEN);
			// 10,000 bare addresses fit, 10,000 "/32" CIDRs do not.
			bare[i] = strings.TrimSuffix(c, "/32")
		}
		x := strings.Join(bare, ",")
		iptFile := iptFloorFile(cidrs)
		var cases []applyCase
		for _, be := range Backends {
			cases = append(cases, applyCase{backend: be, run: func(n ns.NetNS) (proc, error) {
				return runIn(n, nil, nil, b.cfg.EgressInit, initArgs(be, n.Path(), x)...)
			}})
		}
		cases = append(cases,
			applyCase{backend: "nftables", floor: true, run: func(ns ns.NetNS) (proc, error) {
				return runIn(ns, nil, nil, b.cfg.NFTFloor, "-netns", ns.Path(), "-n", fmt.Sprint(n))
			}},
			applyCase{backend: "iptables-nft", floor: true, run: func(n ns.NetNS) (proc, error) {
				return runIn(n, []byte(iptFile), nil, "/usr/sbin/iptables-nft-restore", "--noflush")
			}},
			applyCase{backend: "iptables-legacy", floor: true, run: func(n ns.NetNS) (proc, error) {
				return runIn(n, []byte(iptFile), nil, "/usr/sbin/iptables-legacy-restore", "--noflush", "-w", "5")
			}},
		)
		if n == 10000 {
			// Diagnostic: how much of egress-init's time at N=10000 is
			// the garbage collector of a short-lived process (see
			// docs/DESIGN.md, Test harness).
			env := append(os.Environ(), "GOGC=off")
			for _, be := range Backends {
				cases = append(cases, applyCase{backend: be, diag: true, run: func(n ns.NetNS) (proc, error) {
					return runIn(n, nil, env, b.cfg.EgressInit, initArgs(be, n.Path(), x)...)
				}})
			}
		}
		samples := make([][]time.Duration, len(cases))
		inproc := make([][]time.Duration, len(cases))
		for range runs {
			for i, c := range cases {
				pod, err := newNS()
				if err != nil {
					return nil, err
				}
				p, err := c.run(pod)
				delNS(pod)
				if err != nil {
					return nil, fmt.Errorf("apply %s (floor %v) N=%d: %w", c.backend, c.floor, n, err)
				}
				samples[i] = append(samples[i], p.Took)
				if d := appliedIn(p.Out); d > 0 {
					inproc[i] = append(inproc[i], d)
				}
			}
		}
		for i, c := range cases {
			v := c.backend
			if c.floor {
				v = floorOf[c.backend]
			}
			if c.diag {
				v = c.backend + " with GOGC=off (diagnostic)"
			}
			rows = append(rows, ApplyRow{Variant: v, Backend: c.backend, Floor: c.floor, Diag: c.diag, N: n, Stats: summarize(samples[i]), InProc: summarize(inproc[i])})
		}
		logf("apply N=%d done (%d runs per variant)", n, runs)
	}
	return rows, nil
}

// initArgs are the injector's defaults for istio-iptables, with our
// backend, the namespace and the IPv4 family (the floors are IPv4).
func initArgs(backend, netns, exclude string) []string {
	return []string{
		"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*",
		"-x", exclude, "-b", "*", "-d", "15090,15021,15020",
		"--backend", backend, "--netns", netns, "--families", "ipv4",
	}
}

// iptFloorFile is the least iptables-restore input with the same effect
// on outbound traffic as the nftables floor: a uid-1337 return, one
// RETURN rule per excluded CIDR and a redirect.
func iptFloorFile(cidrs []string) string {
	var s strings.Builder
	s.WriteString("*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n")
	s.WriteString("-A OUTPUT -p tcp -j ISTIO_OUTPUT\n")
	s.WriteString("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n")
	for _, c := range cidrs {
		s.WriteString("-A ISTIO_OUTPUT -d " + c + " -j RETURN\n")
	}
	s.WriteString("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n")
	s.WriteString("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n")
	return s.String()
}
