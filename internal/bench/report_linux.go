//go:build linux

package bench

import (
	"fmt"
	"strings"
	"time"
)

// Target is one issue-6 target, judged from this run's numbers.
type Target struct {
	Name     string
	Measured string // the ratio or value, with what it compares
	Limit    string
	Pass     bool
}

func (t Target) Verdict() string {
	if t.Pass {
		return "PASS"
	}
	return "MISS"
}

func applyRow(rows []ApplyRow, backend string, floor bool, n int) (ApplyRow, bool) {
	for _, r := range rows {
		if r.Backend == backend && r.Floor == floor && r.N == n {
			return r, true
		}
	}
	return ApplyRow{}, false
}

func ratio(a, b time.Duration) float64 {
	if b <= 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// evaluate judges the targets of issue 6 from the measured numbers.
func evaluate(res *Results) []Target {
	var ts []Target
	limits := map[string]float64{"nftables": 1.2, "iptables-nft": 1.3, "iptables-legacy": 1.3}
	for _, be := range Backends {
		for _, n := range res.Settings.ApplyNs {
			ours, ok1 := applyRow(res.Apply, be, false, n)
			fl, ok2 := applyRow(res.Apply, be, true, n)
			if !ok1 || !ok2 {
				continue
			}
			r := ratio(ours.Stats.Median, fl.Stats.Median)
			ts = append(ts, Target{
				Name:     fmt.Sprintf("egress-init apply, %s, N=%d: median / %s median", be, n, floorOf[be]),
				Measured: fmt.Sprintf("%.2fx (%s / %s ms)", r, ms(ours.Stats.Median), ms(fl.Stats.Median)),
				Limit:    fmt.Sprintf("<= %.1fx", limits[be]),
				Pass:     r <= limits[be],
			})
		}
	}
	if c := res.CNI; c != nil {
		for _, row := range c.Rows {
			if row.Backend != "nftables" {
				continue
			}
			r50, r99 := ratio(row.Add.P50, c.Floor.Median), ratio(row.Add.P99, c.Floor.Median)
			ts = append(ts,
				Target{Name: "CNI ADD p50 (nftables) / nftfloor N=0 median", Measured: fmt.Sprintf("%.2fx (%s / %s ms)", r50, ms(row.Add.P50), ms(c.Floor.Median)), Limit: "<= 1.5x", Pass: r50 <= 1.5},
				Target{Name: "CNI ADD p99 (nftables) / nftfloor N=0 median", Measured: fmt.Sprintf("%.2fx (%s / %s ms)", r99, ms(row.Add.P99), ms(c.Floor.Median)), Limit: "<= 3x", Pass: r99 <= 3},
			)
		}
	}
	for _, m := range res.Memory {
		if m.Plugin && m.Backend == "nftables" {
			const limitKiB = 30_000_000 / 1024 // 30 MB (decimal)
			ts = append(ts, Target{Name: "egress-cni ADD peak RSS (nftables), N=10000", Measured: mb(m.KiB) + " MB", Limit: "<= 30 MB", Pass: m.KiB > 0 && m.KiB <= limitKiB})
		}
	}
	var r0, r10k float64
	for _, d := range res.Data {
		if d.Backend == "nftables" && d.N == 0 {
			r0 = d.Rate
		}
		if d.Backend == "nftables" && d.N == 10000 {
			r10k = d.Rate
		}
	}
	if r0 > 0 {
		f := r10k / r0
		ts = append(ts, Target{Name: "data plane (nftables): conn/s at N=10000 / at N=0", Measured: fmt.Sprintf("%.1f%% (%.0f / %.0f per s)", 100*f, r10k, r0), Limit: ">= 90%", Pass: f >= 0.9})
	}
	return ts
}

// Markdown is the whole report.
func Markdown(res *Results) string {
	var s strings.Builder
	m := res.Machine
	w := func(format string, args ...any) { fmt.Fprintf(&s, format, args...) }
	w("# egress-cni benchmarks\n\n")
	w("Written by `make bench` (`cmd/egress-bench`); every number below comes from the run described here. Chart: [apply.svg](apply.svg).\n\n")
	w("## Machine\n\n| | |\n|---|---|\n")
	w("| date (UTC) | %s |\n| CPU | %s |\n| cores | %d |\n| kernel | %s |\n| Go | %s |\n", m.Date.Format(time.RFC3339), m.CPU, m.Cores, m.Kernel, m.Go)
	w("| iptables (nft) | %s |\n| iptables (legacy) | %s |\n| nft | %s |\n| netlink library | %s |\n", m.IPTNFT, m.IPTLegacy, m.NFT, m.NFTablesLib)
	w("| load average before / after | %s / %s |\n| bench run time | %s |\n\n", m.LoadBefore, m.LoadAfter, res.Elapsed.Round(time.Second))

	w("## Targets (issue 6)\n\n| target | measured | limit | result |\n|---|---|---|---|\n")
	for _, t := range res.Targets {
		w("| %s | %s | %s | **%s** |\n", t.Name, t.Measured, t.Limit, t.Verdict())
	}
	w("\n")

	w("## 1. egress-init apply time (whole process, fresh namespace per run)\n\n")
	w("Each run forks and execs the program from an OS thread that has joined a fresh network namespace (what `ip netns exec` does, without its extra exec of `ip`); the timer covers fork, exec, the work and wait4. egress-init and nftfloor are also given the namespace path (`--netns`, `-netns`) and join it themselves, as in production. egress-init runs with the injector's istio-iptables defaults plus `--backend B --families ipv4` (the floors are IPv4-only). The N excluded CIDRs are /32s at every other address of 10.0.0.0/8 (rule content only, never a traffic target), passed to egress-init as one `-x` list of bare addresses (a single argument is limited to 128 KiB). Variants are interleaved run by run. Floors: `nftfloor` (bench/floor/nftfloor) sends one google/nftables batch holding a uid-1337 return, an interval set of the N addresses and a redirect; `iptables-*-restore --noflush` loads the equivalent linear file (uid return, N RETURN rules, redirect). Times in ms.\n\n")
	w("| variant | N | median | min | max | runs | ours / floor (median) |\n|---|---:|---:|---:|---:|---:|---:|\n")
	for _, be := range Backends {
		for _, n := range res.Settings.ApplyNs {
			for _, floor := range []bool{false, true} {
				r, ok := applyRow(res.Apply, be, floor, n)
				if !ok {
					continue
				}
				rat := ""
				if !floor {
					if f, ok := applyRow(res.Apply, be, true, n); ok {
						rat = fmt.Sprintf("%.2fx", ratio(r.Stats.Median, f.Stats.Median))
					}
				}
				w("| %s | %d | %s | %s | %s | %d | %s |\n", r.Variant, n, ms(r.Stats.Median), ms(r.Stats.Min), ms(r.Stats.Max), r.Stats.N, rat)
			}
		}
	}
	w("\n")

	if c := res.CNI; c != nil {
		w("## 2. CNI ADD, CHECK, DEL (egress-cni alone)\n\n")
		w("The plugin binary is exec'd from a namespace standing in for the node, with CNI_NETNS naming a fresh pod namespace, stdin as containerd builds it for the last plugin of a chain (cniVersion 1.0.0, prevResult of a bridge plugin, runtimeConfig with the pod's annotations: sidecar status and two excluded CIDRs), default families (dual) and logging to a file. Each of %d pods gets ADD, CHECK, DEL in turn. Burst: %d ADDs started at once into %d fresh namespaces. Floor: `nftfloor -n 0` exec'd the same way (from the node namespace, into a fresh pod namespace), %d runs interleaved with the nftables ADDs: median %s ms, p99 %s ms. Times in ms.\n\n",
			res.Settings.Pods, res.Settings.Burst, res.Settings.Burst, c.Floor.N, ms(c.Floor.Median), ms(c.Floor.P99))
		w("| backend | ADD p50 | ADD p99 | ADD max | ADD p50 / floor | CHECK p50 | CHECK p99 | DEL p50 | DEL p99 | burst %d: wall | burst p99 | ADD N=10000 median |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n", res.Settings.Burst)
		for _, r := range c.Rows {
			w("| %s | %s | %s | %s | %.2fx | %s | %s | %s | %s | %s | %s | %s |\n", r.Backend, ms(r.Add.P50), ms(r.Add.P99), ms(r.Add.Max), ratio(r.Add.P50, c.Floor.Median),
				ms(r.Check.P50), ms(r.Check.P99), ms(r.Del.P50), ms(r.Del.P99), ms(r.BurstWall), ms(r.Burst.P99), ms(r.Add10k.Median))
		}
		w("\n")
	}

	w("## 3. Data plane: new TCP connections per second through the redirect\n\n")
	w("A pod namespace with a veth pair (192.0.2.2/24 on one end, the other end up in the same namespace) and egress-init's rules; a client in it connects over and over to 192.0.2.99:80 (an on-link address nobody owns, not excluded), which the rules redirect to a listener on 15001 in the same namespace. Each connection is closed with SO_LINGER 0 (RST, no TIME_WAIT) on both sides; 200 untimed warm-up connections, then a %v window. `none` is the same loop with no rules, straight to 127.0.0.1:15001.\n\n", res.Settings.DataWindow)
	w("| backend | N excluded | conn/s | connections | rate / N=0 |\n|---|---:|---:|---:|---:|\n")
	base := map[string]float64{}
	for _, d := range res.Data {
		if d.N == 0 {
			base[d.Backend] = d.Rate
		}
	}
	for _, d := range res.Data {
		rel := ""
		if b := base[d.Backend]; b > 0 {
			rel = fmt.Sprintf("%.1f%%", 100*d.Rate/b)
		}
		w("| %s | %d | %.0f | %d | %s |\n", d.Backend, d.N, d.Rate, d.Conns, rel)
	}
	w("\n")

	w("## 4. Memory: peak RSS at N=10000\n\n")
	w("ru_maxrss from wait4, read by GNU time (`/usr/bin/time -f %%M`) around each program, largest of %d runs, each in a fresh namespace and started as in its timing section (the plugin with 10,000 CIDRs in the excludeOutboundIPRanges annotation). Not read by the bench's own wait4: Go starts children with CLONE_VM (vfork), so the child's ru_maxrss would include the Go parent's own high-water mark. MB = 10^6 bytes.\n\n", res.Settings.RSSRuns)
	w("| program | peak RSS MB | runs |\n|---|---:|---:|\n")
	for _, m := range res.Memory {
		w("| %s | %s | %d |\n", m.What, mb(m.KiB), m.Runs)
	}
	w("\n")

	if n := res.Node; n != nil {
		w("## 5. Node layer (pkg/node)\n\n")
		w("Timed in-process (the library calls egress-node and the plugin make), in fresh namespaces, %d runs. Forward path: pod namespace → node namespace (forwarding, veth on both sides) → server namespace; the pod connects to 203.0.113.2:8080, an allowed destination, so every SYN goes through the node's forward chain and its allow-set lookup. Windows of %v alternate without and with the node rules (%d each).\n\n", n.Apply.N, res.Settings.DataWindow, n.ForwardWindows)
		w("| what | median ms | min | max | runs |\n|---|---:|---:|---:|---:|\n")
		for _, r := range []struct {
			name string
			s    Stats
		}{{"node ruleset apply, fresh namespace", n.Apply}, {"node ruleset re-apply over existing rules", n.Reapply}, {"one gateway update (AddGateways + RemoveGateways)", n.Gateway}} {
			w("| %s | %s | %s | %s | %d |\n", r.name, ms(r.s.Median), ms(r.s.Min), ms(r.s.Max), r.s.N)
		}
		rel := 0.0
		if n.RateWithout > 0 {
			rel = 100 * n.RateWith / n.RateWithout
		}
		w("\n| forward path | conn/s | connections |\n|---|---:|---:|\n| without node rules | %.0f | %d |\n| with node rules | %.0f (%.1f%%) | %d |\n\n", n.RateWithout, n.ConnsWithout, n.RateWith, rel, n.ConnsWith)
	}

	if res.GoBench != "" {
		w("## Pure Go benchmarks (`go test -bench`, pkg/rules, N=10000)\n\n```\n%s```\n\n", res.GoBench)
	}
	return s.String()
}
