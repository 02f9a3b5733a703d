package nstest

import (
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nscore"
)

// Addresses of the pod topology (nscore's). They are all from
// documentation ranges (RFC 5737, RFC 3849), so a leak could never reach
// a real host.
var (
	// PodIPv4 and PodIPv6 are on the pod's end of the veth.
	PodIPv4 = nscore.PodIPv4
	PodIPv6 = nscore.PodIPv6
	// WorldIPv4 and WorldIPv6 are on the world's end; they are the pod's
	// default gateways.
	WorldIPv4 = nscore.WorldIPv4
	WorldIPv6 = nscore.WorldIPv6
	// InternetIPv4 and InternetIPv6 stand for a destination outside the
	// cluster. They live on the world's loopback, so the pod reaches them
	// through its default route.
	InternetIPv4 = nscore.InternetIPv4
	InternetIPv6 = nscore.InternetIPv6
)

// PodOptions tunes NewPod. The zero value gives the layout described on
// Pod.
type PodOptions struct {
	// IfName is the pod's interface name. Default "eth0".
	IfName string
	// WorldIfName is the world's interface name. Default "veth0".
	WorldIfName string
}

// Pod is a pod network namespace joined to a "world" namespace by a veth
// pair:
//
//	pod (NS)                                world (World)
//	eth0 192.0.2.2/24  <-- veth -->  veth0 192.0.2.1/24
//	     2001:db8:1::2/64                  2001:db8:1::1/64
//	default via 192.0.2.1            lo    203.0.113.10/32
//	default via 2001:db8:1::1              2001:db8:2::10/128
//
// IPv6 duplicate address detection is off on both ends, so addresses are
// usable at once. The world has no default route; the pod's default
// routes point only at the world.
type Pod struct {
	// NS is the pod's network namespace; apply capture rules here.
	NS ns.NetNS
	// World is the peer namespace standing for the node and everything
	// beyond it.
	World ns.NetNS
	// IfName and WorldIfName are the two ends of the veth pair.
	IfName      string
	WorldIfName string
}

// NewPod builds the topology described on Pod. Both namespaces and the
// veth pair go away in t.Cleanup.
func NewPod(t testing.TB, opts PodOptions) *Pod {
	t.Helper()
	p := &Pod{IfName: opts.IfName, WorldIfName: opts.WorldIfName}
	if p.IfName == "" {
		p.IfName = "eth0"
	}
	if p.WorldIfName == "" {
		p.WorldIfName = "veth0"
	}
	p.World = NewNS(t)
	p.NS = NewNS(t)

	// nscore.WirePod: the veth never exists in the root namespace.
	if err := nscore.WirePod(p.NS, p.World, nscore.PodLink{IfName: p.IfName, WorldIfName: p.WorldIfName}); err != nil {
		t.Fatal(err)
	}
	return p
}
