package cni

import (
	"net/netip"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/egress-cni/egress-cni/pkg/node"
)

// fakeGateways is an in-memory gateway set.
type fakeGateways struct {
	gws   []node.Gateway
	calls int
}

func (f *fakeGateways) AddGateways(gws ...node.Gateway) error {
	f.calls++
	f.gws = append(f.gws, gws...)
	return nil
}

func (f *fakeGateways) RemoveGateways(match func(node.Gateway) bool) ([]node.Gateway, error) {
	f.calls++
	var keep, removed []node.Gateway
	for _, g := range f.gws {
		if match(g) {
			removed = append(removed, g)
		} else {
			keep = append(keep, g)
		}
	}
	f.gws = keep
	return removed, nil
}

func (f *fakeGateways) ListGateways() ([]node.Gateway, error) { return f.gws, nil }

func gw(iface, ip, id string) node.Gateway {
	return node.Gateway{Iface: iface, IP: netip.MustParseAddr(ip), ContainerID: id}
}

// An ordinary pod's ADD drops entries of other containers holding its
// address in one call; DEL drops the container's entries without a
// namespace or prevResult; GC keeps only valid attachments.
func TestGatewayMembershipAddDelGC(t *testing.T) {
	p, _, _ := fakePlugin()
	f := &fakeGateways{gws: []node.Gateway{
		gw("vethold", "198.51.100.5", "c-old"),    // departed gateway, same IP as the new pod
		gw("vethgw", "198.51.100.9", "c-gw"),      // live gateway
		gw("vethgone", "198.51.100.10", "c-gone"), // DEL missed, not valid any more
	}}
	p.Gateways = f
	const keys = `"nodeEnforcement": true`
	err := p.Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Args: podArgs, StdinData: stdin("1.0.0", keys, map[string]string{}, true)})
	if err != nil {
		t.Fatal(err)
	}
	if f.calls != 1 || len(f.gws) != 2 || f.gws[0].ContainerID != "c-gw" {
		t.Fatalf("after ordinary ADD: %d calls, %v", f.calls, f.gws)
	}
	// DEL of the live gateway, with no netns: twice, idempotent.
	for range 2 {
		if err := p.Del(&skel.CmdArgs{ContainerID: "c-gw", IfName: "eth0", StdinData: stdin("1.0.0", keys, nil, false)}); err != nil {
			t.Fatal(err)
		}
	}
	if len(f.gws) != 1 || f.gws[0].ContainerID != "c-gone" {
		t.Fatalf("after DEL: %v", f.gws)
	}
	f.gws = append(f.gws, gw("vethlive", "198.51.100.11", "c-live"))
	// GC without the valid-attachments key collects nothing.
	if err := p.GC(&skel.CmdArgs{StdinData: stdin("1.1.0", keys, nil, false)}); err != nil || len(f.gws) != 2 {
		t.Fatalf("GC without attachments: %v, %v", err, f.gws)
	}
	gc := keys + `, "cni.dev/valid-attachments": [{"containerID": "c-live", "ifname": "eth0"}]`
	if err := p.GC(&skel.CmdArgs{StdinData: stdin("1.1.0", gc, nil, false)}); err != nil {
		t.Fatal(err)
	}
	if len(f.gws) != 1 || f.gws[0].ContainerID != "c-live" {
		t.Fatalf("after GC: %v", f.gws)
	}
	// Without nodeEnforcement nothing touches the sets.
	f.calls = 0
	_ = p.Del(&skel.CmdArgs{ContainerID: "c-live", StdinData: stdin("1.0.0", "", nil, false)})
	if f.calls != 0 {
		t.Errorf("DEL without nodeEnforcement edited the gateway sets")
	}
}
