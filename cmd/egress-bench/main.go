//go:build linux

// Command egress-bench is `make bench`: it measures egress-init, the
// egress-cni plugin, the data plane and the node layer against floors
// taken in the same run, all in network namespaces of its own, and
// writes bench/results.md and bench/apply.svg. Needs root.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/egress-cni/egress-cni/internal/bench"
)

func main() {
	cfg := bench.DefaultConfig()
	bin := flag.String("bin", "bin", "directory holding egress-init, egress-cni and nftfloor")
	flag.StringVar(&cfg.OutDir, "out", cfg.OutDir, "directory for results.md and apply.svg")
	flag.StringVar(&cfg.GoBench, "gobench", "", "go test -bench output to include in results.md")
	quick := flag.Bool("quick", false, "few runs of everything, to check the bench itself")
	skip := flag.String("skip", "", "comma-separated sections not to run: apply,cni,data,memory,node (for working on the bench)")
	flag.Parse()
	cfg.Skip = map[string]bool{}
	for _, s := range strings.Split(*skip, ",") {
		if s != "" {
			cfg.Skip[s] = true
		}
	}
	cfg.EgressInit = filepath.Join(*bin, "egress-init")
	cfg.EgressCNI = filepath.Join(*bin, "egress-cni")
	cfg.NFTFloor = filepath.Join(*bin, "nftfloor")
	if *quick {
		cfg.ApplyRuns, cfg.ApplyRunsLarge, cfg.Pods, cfg.Burst, cfg.RSSRuns = 3, 2, 10, 5, 1
		cfg.DataWindow, cfg.NodeRuns, cfg.ForwardRounds = cfg.DataWindow/4, 3, 1
	}

	// A signal still removes every namespace the bench made.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		fmt.Fprintln(os.Stderr, "egress-bench: interrupted; removing namespaces")
		bench.Cleanup()
		os.Exit(130)
	}()

	if _, err := bench.Run(cfg); err != nil {
		fmt.Fprintf(os.Stderr, "egress-bench: %v\n", err)
		os.Exit(1)
	}
}
