// Command egress-cni is the chained CNI plugin. All logic is in pkg/cni;
// see docs/cni.md for the configuration.
package main

import (
	"context"
	"os/signal"
	"syscall"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/egress-cni/egress-cni/internal/gctune"
	"github.com/egress-cni/egress-cni/pkg/cni"
)

func main() {
	gctune.ShortLived()
	// A runtime that gives up on the plugin sends SIGTERM first: stop an
	// iptables binary cleanly (a killed restore commits nothing).
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	p := cni.New()
	p.Context = ctx
	skel.PluginMainFuncs(p.Funcs(), version.All, "CNI plugin egress-cni: programs sidecar capture rules in the pod's network namespace")
}
