// Command egress-cni is the chained CNI plugin. All logic is in pkg/cni;
// see docs/cni.md for the configuration.
//
// `egress-cni boot-apply PATH` is the one command outside CNI, for the
// boot unit (install/systemd/egress-cni-node.service): it applies the
// node rules from the host's copy of the node config (the plugin's
// "nodeConfig") and drops the registrations from before the boot
// (cni.BootApply). It exits 0 when the rules are applied; otherwise it
// leaves the fail-closed table (the node forwards nothing) and exits 3
// when there is no copy (a node the agent has not run on yet) or 1.
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
	err := cni.BootApply(args[0])
	switch {
	case errors.Is(err, cni.ErrNoNodeConfig):
		fmt.Fprintf(os.Stderr, "egress-cni boot-apply: %v\n", err)
		return 3
	case err != nil:
		fmt.Fprintf(os.Stderr, "egress-cni boot-apply: could not apply the node rules from %s: %v\n", args[0], err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "egress-cni boot-apply: node rules applied from %s; registrations from before the boot dropped\n", args[0])
	return 0
}
