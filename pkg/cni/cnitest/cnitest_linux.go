// Package cnitest holds fakes of what the CNI plugin (pkg/cni) talks to on
// the node, for tests that run without root or namespaces: a node
// registration store with pkg/node's semantics, and a host-side lookup.
// The pod layer's fake backend is rules.NewFake.
package cnitest

import (
	"net/netip"
	"slices"
	"sync"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/egress-cni/egress-cni/pkg/node"
)

// Pods is an in-memory node registration store (cni.PodStore) with
// node.RegisterPod's semantics: a registration replaces the entries of
// other containers that had the same host-side port or an address of
// the new pod (stale), a gateway is refused unless Egress, and Err, when
// set, fails every registration (node.ErrNotApplied: no node rules).
type Pods struct {
	mu sync.Mutex
	// Pods are the registrations, in the order they were made.
	Pods []node.Pod
	// Calls counts RegisterPod and UnregisterPods calls (edits of the
	// node sets); ListPods only reads and is not counted.
	Calls int
	// Egress says the node is an egress node.
	Egress bool
	// Err fails RegisterPod.
	Err error
}

// RegisterPod registers p and returns the stale entries it replaced.
func (f *Pods) RegisterPod(p node.Pod) ([]node.Pod, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Calls++
	if f.Err != nil {
		return nil, f.Err
	}
	if p.Gateway && !f.Egress {
		return nil, node.ErrNotEgressNode
	}
	var keep, stale []node.Pod
	for _, o := range f.Pods {
		if o.ContainerID != p.ContainerID && (o.Port == p.Port || slices.ContainsFunc(o.IPs, func(ip netip.Addr) bool { return slices.Contains(p.IPs, ip) })) {
			stale = append(stale, o)
		} else {
			keep = append(keep, o)
		}
	}
	keep = append(keep, p)
	f.Pods = keep
	return stale, nil
}

// UnregisterPods removes the registrations whose container ID matches
// and returns them.
func (f *Pods) UnregisterPods(match func(string) bool) ([]node.Pod, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Calls++
	var keep, removed []node.Pod
	for _, p := range f.Pods {
		if match(p.ContainerID) {
			removed = append(removed, p)
		} else {
			keep = append(keep, p)
		}
	}
	f.Pods = keep
	return removed, nil
}

// ListPods returns a copy of the registrations.
func (f *Pods) ListPods() ([]node.Pod, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.Pods), nil
}

// Has says whether a registration of containerID is there.
func (f *Pods) Has(containerID string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.ContainsFunc(f.Pods, func(p node.Pod) bool { return p.ContainerID == containerID })
}

// HostSide returns a cni.Plugin HostSide func that finds port and l3 for
// every pod, or fails with err; "fake" is how it found them.
func HostSide(port, l3 string, err error) func(nsPath, ifName string, prev types.Result) (string, string, string, error) {
	return func(string, string, types.Result) (string, string, string, error) { return port, l3, "fake", err }
}

// Pod is a registration of one container with one address, behind the
// bridge cni0.
func Pod(containerID, port, ip string, gateway bool) node.Pod {
	return node.Pod{ContainerID: containerID, Port: port, L3: "cni0", IPs: []netip.Addr{netip.MustParseAddr(ip)}, Gateway: gateway}
}
