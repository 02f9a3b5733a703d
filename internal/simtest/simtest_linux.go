// Package simtest is the testing.TB face of internal/sim's cluster
// network, for tests that drive their own CNI chains on it (test/netns):
// the internet host, the router and the nodes' uplinks, in namespaces of
// the test (internal/nstest), removed in t.Cleanup.
//
// It lives apart from internal/nstest because internal/sim imports
// pkg/node and pkg/rules, whose own tests use internal/nstest.
package simtest

import (
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/internal/sim"
)

// Cleanups is a sim.Cleanups stack run in t.Cleanup.
func Cleanups(t testing.TB) *sim.Cleanups {
	cl := &sim.Cleanups{}
	t.Cleanup(cl.Run)
	return cl
}

// Net is sim.NewNet with the test's own namespaces (nstest.NewNS), so that
// tests of one binary can build it side by side. o.NewNS is ignored.
func Net(t testing.TB, o sim.NetOptions) *sim.Net {
	t.Helper()
	o.NewNS = func(string) (ns.NetNS, error) { return nstest.NewNS(t), nil }
	w, err := sim.NewNet(Cleanups(t), o)
	if err != nil {
		t.Fatalf("cluster network: %v", err)
	}
	return w
}

// WireNode is w.WireNode that fails the test on error.
func WireNode(t testing.TB, w *sim.Net, name, routerIf string, off byte, sub4, sub6 string) sim.NodeNet {
	t.Helper()
	n, err := w.WireNode(name, routerIf, off, sub4, sub6)
	if err != nil {
		t.Fatalf("node %s: %v", name, err)
	}
	return n
}
