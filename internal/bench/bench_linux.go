//go:build linux

package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Config says what to run and where the binaries are.
type Config struct {
	EgressInit, EgressCNI, NFTFloor string // binaries
	OutDir                          string // results.md and apply.svg go here
	GoBench                         string // optional `go test -bench` output to include

	ApplyNs        []int
	ApplyRuns      int // runs per variant for N < 5000
	ApplyRunsLarge int // runs per variant for N >= 5000
	Pods           int // sequential ADD/CHECK/DEL per backend
	Burst          int // parallel ADDs per backend
	RSSRuns        int // runs per program at N=10000: ADD timing and peak RSS
	DataNs         []int
	DataWindow     time.Duration
	NodeRuns       int
	ForwardRounds  int
	// Skip names sections not to run ("apply", "cni", "data", "memory",
	// "node"), for working on the bench itself; `make bench` runs all.
	Skip map[string]bool
}

// DefaultConfig fits `make bench` in a few minutes on 2 cores.
func DefaultConfig() Config {
	return Config{
		OutDir: "bench", ApplyNs: []int{0, 100, 1000, 5000, 10000},
		ApplyRuns: 31, ApplyRunsLarge: 15, Pods: 200, Burst: 50, RSSRuns: 3,
		DataNs: []int{0, 1000, 10000}, DataWindow: 3 * time.Second,
		NodeRuns: 20, ForwardRounds: 2,
	}
}

// Bench is one run.
type Bench struct {
	cfg Config
}

// Results is everything one run measured.
type Results struct {
	Machine  Machine
	Apply    []ApplyRow
	CNI      *CNIResult
	Data     []DataRow
	Node     *NodeResult
	Enforced *EnforcedResult
	Memory   []MemRow
	Targets  []Target
	Elapsed  time.Duration
	GoBench  string
	Settings Config
}

// Machine describes where the run happened.
type Machine struct {
	CPU, Kernel, Go, IPTNFT, IPTLegacy, NFT, NFTablesLib string
	Cores                                                int
	Date                                                 time.Time
	LoadBefore, LoadAfter                                string
}

// Run measures everything and writes the report. Namespaces are removed
// even when a step fails.
func Run(cfg Config) (*Results, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("the bench needs root: it creates network namespaces and firewall rules in them")
	}
	for _, p := range []string{cfg.EgressInit, cfg.EgressCNI, cfg.NFTFloor} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("binary missing (run make bench): %w", err)
		}
	}
	defer Cleanup()
	b := &Bench{cfg: cfg}
	start := time.Now()
	res := &Results{Machine: machine(), Settings: cfg}
	var err error
	if !cfg.Skip["apply"] {
		logf("apply: egress-init and floors, N=%v", cfg.ApplyNs)
		if res.Apply, err = b.measureApply(); err != nil {
			return nil, err
		}
	}
	if !cfg.Skip["cni"] {
		logf("cni: %d pods, burst %d, per backend", cfg.Pods, cfg.Burst)
		if res.CNI, err = b.measureCNI(); err != nil {
			return nil, err
		}
	}
	if !cfg.Skip["data"] {
		logf("data plane: N=%v, %v per point", cfg.DataNs, cfg.DataWindow)
		if res.Data, err = b.measureDataPlane(); err != nil {
			return nil, err
		}
	}
	if !cfg.Skip["memory"] {
		logf("memory: peak RSS at N=10000")
		if res.Memory, err = b.measureMemory(); err != nil {
			return nil, err
		}
	}
	if !cfg.Skip["node"] {
		logf("node layer")
		if res.Node, err = b.measureNode(); err != nil {
			return nil, err
		}
		logf("plugin with nodeEnforcement, agent repair")
		if res.Enforced, err = b.measureEnforced(); err != nil {
			return nil, err
		}
	}
	res.Machine.LoadAfter = loadavg()
	res.Elapsed = time.Since(start)
	res.Targets = evaluate(res)
	if cfg.GoBench != "" {
		if data, err := os.ReadFile(cfg.GoBench); err == nil {
			res.GoBench = string(data)
		}
	}
	if err := os.MkdirAll(cfg.OutDir, 0o755); err != nil {
		return nil, err
	}
	if len(res.Apply) > 0 {
		if err := writeChart(res, filepath.Join(cfg.OutDir, "apply.svg")); err != nil {
			return nil, fmt.Errorf("could not draw the chart: %w", err)
		}
	}
	raw, err := json.MarshalIndent(res, "", " ")
	if err != nil {
		return nil, err
	}
	// The raw numbers (durations in ns), for anyone who wants to redo the
	// tables or the chart.
	if err := os.WriteFile(filepath.Join(cfg.OutDir, "results.json"), raw, 0o644); err != nil {
		return nil, err
	}
	md := Markdown(res)
	if err := os.WriteFile(filepath.Join(cfg.OutDir, "results.md"), []byte(md), 0o644); err != nil {
		return nil, err
	}
	fmt.Print(md)
	return res, nil
}

func machine() Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version(), Date: time.Now().UTC(), LoadBefore: loadavg()}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	m.IPTNFT = version("/usr/sbin/iptables-nft", "--version")
	m.IPTLegacy = version("/usr/sbin/iptables-legacy", "--version")
	m.NFT = version("nft", "--version")
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/google/nftables" {
				m.NFTablesLib = d.Path + " " + d.Version
			}
		}
	}
	return m
}

func version(name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return "not available"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

func loadavg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
