// Command egress-init is a drop-in for istio-iptables in an init
// container: it takes the same flags and programs the pod capture rules
// with egress-cni's engine. See `egress-init -h`.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/egress-cni/egress-cni/internal/gctune"
	"github.com/egress-cni/egress-cni/internal/initcmd"
)

func main() {
	gctune.ShortLived()
	// A kubelet stopping the init container sends SIGTERM: stop the
	// backend's binaries rather than be killed in the middle of them.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := initcmd.Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
