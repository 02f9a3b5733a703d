// Command egress-init is a drop-in for istio-iptables in an init
// container: it takes the same flags and programs the pod capture rules
// with egress-cni's engine. See `egress-init -h`.
package main

import (
	"os"

	"github.com/egress-cni/egress-cni/internal/gctune"
	"github.com/egress-cni/egress-cni/internal/initcmd"
)

func main() {
	gctune.ShortLived()
	os.Exit(initcmd.Run(os.Args[1:], os.Stdout, os.Stderr))
}
