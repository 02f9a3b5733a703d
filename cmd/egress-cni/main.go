// Command egress-cni is the chained CNI plugin. All logic is in pkg/cni;
// see docs/cni.md for the configuration.
//
// `egress-cni boot-apply PATH` is the one command outside CNI: it applies
// the node rules from the host's copy of the node config (the plugin's
// "nodeConfig") unless they are in place, for the boot unit
// (install/systemd/egress-cni-node.service). It exits 0 when the rules
// are in place afterwards, 3 when there is no copy (nothing applied: a
// node the agent has not run on yet) and 1 on failure.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/egress-cni/egress-cni/internal/gctune"
	"github.com/egress-cni/egress-cni/pkg/cni"
)

func main() {
	gctune.ShortLived()
	if len(os.Args) > 1 && os.Args[1] == "boot-apply" {
		os.Exit(bootApply(os.Args[2:]))
	}
	// A runtime that gives up on the plugin sends SIGTERM first: stop an
	// iptables binary cleanly (a killed restore commits nothing).
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	p := cni.New()
	p.Context = ctx
	skel.PluginMainFuncs(p.Funcs(), version.All, "CNI plugin egress-cni: programs sidecar capture rules in the pod's network namespace")
}

func bootApply(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: egress-cni boot-apply PATH (the host's copy of the node config)")
		return 2
	}
	applied, err := cni.BootApply(args[0])
	switch {
	case errors.Is(err, cni.ErrNoNodeConfig):
		fmt.Fprintf(os.Stderr, "egress-cni boot-apply: %v: nothing applied; this node forwards unjudged until the egress-cni agent applies its rules\n", err)
		return 3
	case err != nil:
		fmt.Fprintf(os.Stderr, "egress-cni boot-apply: could not apply the node rules from %s: %v\n", args[0], err)
		return 1
	case applied:
		fmt.Fprintf(os.Stderr, "egress-cni boot-apply: node rules applied from %s\n", args[0])
	default:
		fmt.Fprintln(os.Stderr, "egress-cni boot-apply: node rules already in place")
	}
	return 0
}
