// Command egress-cni is the chained CNI plugin. All logic is in pkg/cni;
// see docs/cni.md for the configuration.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/egress-cni/egress-cni/internal/gctune"
	"github.com/egress-cni/egress-cni/pkg/cni"
)

func main() {
	gctune.ShortLived()
	skel.PluginMainFuncs(cni.New().Funcs(), version.All, "CNI plugin egress-cni: programs sidecar capture rules in the pod's network namespace")
}
