package audit

import (
	"net/netip"
	"testing"
	"time"

	"github.com/egress-cni/egress-cni/pkg/node"
)

// The resolver names a pod by its registered port only when the event
// has one (a bridged frame: PhysInDev the port, InDev the bridge), never
// by the bridge and an address a rogue port can send; and a pod gone
// from the registrations is not named from a stale cache.
func TestResolverAttribution(t *testing.T) {
	victimIP := netip.MustParseAddr("198.51.100.10")
	victim := node.Pod{ContainerID: "c-victim", Port: "veth-victim", L3: "cni0", IPs: []netip.Addr{victimIP}}
	routed := node.Pod{ContainerID: "c-routed", Port: "veth-routed", L3: "veth-routed", IPs: []netip.Addr{netip.MustParseAddr("198.51.100.20")}}
	dir := t.TempDir()
	if err := node.WriteIdentity(dir, node.Identity{ContainerID: "c-victim", Namespace: "team-b", Name: "victim", Port: "veth-victim", L3: "cni0"}); err != nil {
		t.Fatal(err)
	}
	pods := []node.Pod{victim, routed}
	r := newResolver("", dir)
	r.list = func() ([]node.Pod, error) { return pods, nil }
	now := time.Now()

	for _, tc := range []struct {
		name             string
		physIn, in       string
		src              netip.Addr
		reason           node.Reason
		wantPod, wantIfc string
	}{
		{"own port, bridge table", "veth-victim", "cni0", victimIP, node.ReasonForgedSource, "victim", "veth-victim"},
		{"own port, inet with br_netfilter", "veth-victim", "cni0", victimIP, node.ReasonNotAGateway, "victim", "veth-victim"},
		{"rogue port with the victim's address", "rogue-port0", "cni0", victimIP, node.ReasonStolenAddress, "", "rogue-port0"},
		{"rogue port, not-a-gateway", "rogue-port0", "cni0", victimIP, node.ReasonNotAGateway, "", "rogue-port0"},
		{"bridge only, stolen address", "", "cni0", victimIP, node.ReasonStolenAddress, "", "cni0"},
		{"bridge only, no identity", "", "cni0", victimIP, node.ReasonNoIdentity, "", "cni0"},
		{"bridge only, not-a-gateway (address passed the bridge checks)", "", "cni0", victimIP, node.ReasonNotAGateway, "victim", "cni0"},
		{"routed pod", "", "veth-routed", netip.MustParseAddr("192.0.2.1"), node.ReasonForgedSource, "", "veth-routed"},
	} {
		id, ifc := r.pod(tc.physIn, tc.in, tc.src, tc.reason, now)
		if id.Name != tc.wantPod || ifc != tc.wantIfc {
			t.Errorf("%s: got pod %q on %q, want %q on %q", tc.name, id.Name, ifc, tc.wantPod, tc.wantIfc)
		}
		if tc.name == "routed pod" && id.ContainerID != "c-routed" {
			t.Errorf("routed pod: container %q, want c-routed (no record: the ID only)", id.ContainerID)
		}
	}

	// DEL: the registration and the record go. The next event, even
	// within refreshEvery, re-reads (the identity directory changed) and
	// names nobody.
	pods = []node.Pod{routed}
	time.Sleep(20 * time.Millisecond) // past the coarse file-time tick
	if _, err := node.RemoveIdentities(dir, func(id string) bool { return id == "c-victim" }); err != nil {
		t.Fatal(err)
	}
	if id, _ := r.pod("", "cni0", victimIP, node.ReasonNotAGateway, now.Add(time.Millisecond)); id.ContainerID != "" {
		t.Errorf("a deleted pod's address is named as %+v", id)
	}
	// The address is given to a new pod on another port: its drops
	// name it, not the deleted one.
	time.Sleep(20 * time.Millisecond)
	pods = []node.Pod{routed, {ContainerID: "c-new", Port: "veth-new", L3: "cni0", IPs: []netip.Addr{victimIP}}}
	if err := node.WriteIdentity(dir, node.Identity{ContainerID: "c-new", Namespace: "team-a", Name: "new", Port: "veth-new", L3: "cni0"}); err != nil {
		t.Fatal(err)
	}
	for _, phys := range []string{"veth-new", ""} {
		if id, _ := r.pod(phys, "cni0", victimIP, node.ReasonNotAGateway, now.Add(2*time.Millisecond)); id.Name != "new" {
			t.Errorf("the reused address (port %q) is named as %+v, want team-a/new", phys, id)
		}
	}
	// A registration gone with no record change: re-read after
	// refreshEvery at the latest.
	pods = nil
	if id, _ := r.pod("", "veth-routed", netip.Addr{}, node.ReasonNotAGateway, now.Add(2*time.Millisecond+refreshEvery+time.Millisecond)); id.ContainerID != "" {
		t.Errorf("a deregistered pod is named as %+v after refreshEvery", id)
	}
}
