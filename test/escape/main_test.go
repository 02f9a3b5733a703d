//go:build linux

// Package escape_test is the escape matrix of the node layer (issue 10):
// in the simulated cluster (internal/sim), built once per topology
// (bridged, on a bridge named cbr0, and routed, with the ptp plugin),
// with the real installer on each node, pods made through the real CNI
// chain, a kube-proxy stand-in and a flannel-style VXLAN overlay on both
// nodes, every known way out of the cluster other than the egress
// gateway is tried: Services whose endpoint is on the internet (NodePort
// on either node, externalIP, all carrying kube-proxy's 0x4000 mark),
// VXLAN decapsulation, interface names nobody registered, a self-declared
// gateway, forged tuples of the gateway's live flows, ICMP errors quoting
// them, and VLAN-tagged frames. Each attempt is made with the node rules
// in place and again, as its control, with them removed: the control
// must reach the internet host, so that the row can fail. Evidence is
// what the internet host's packet recorder saw and how the nodes'
// counters moved.
//
// The legitimate paths (the gateway, pod to pod, Services, NodePort and
// hostPort ingress, cluster DNS, replies to ingress) must keep working
// with the rules in place.
//
// Root only: every host is a network namespace of the test's own. Set
// EGRESS_CNI_REQUIRE_PRIVILEGED=1 to fail instead of skipping without
// root.
package escape_test

import (
	"os"
	"testing"

	"github.com/egress-cni/egress-cni/internal/sim"
)

func TestMain(m *testing.M) {
	// Clients and probes run as re-executed copies of this binary.
	sim.RunChild()
	sim.RunProbeChild()
	code := m.Run()
	if builtBin != "" {
		_ = os.RemoveAll(builtBin)
	}
	os.Exit(code)
}
