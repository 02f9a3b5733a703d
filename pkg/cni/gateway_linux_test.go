package cni

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/egress-cni/egress-cni/pkg/cni/cnitest"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// Every pod's ADD registers it (one call) and takes over stale entries of
// its address; DEL drops the container's registration without a
// namespace or prevResult; GC keeps only valid attachments.
func TestRegistrationAddDelGC(t *testing.T) {
	p, _, _ := fakePlugin()
	f := &cnitest.Pods{Egress: true, Pods: []node.Pod{
		cnitest.Pod("c-old", "vethold", "198.51.100.5", true), // departed gateway, same IP as the new pod
		cnitest.Pod("c-gw", "vethgw", "198.51.100.9", true),   // live gateway
		cnitest.Pod("c-gone", "vethgone", "198.51.100.10", false),
	}}
	p.Pods = f
	p.HostSide = cnitest.HostSide("veth1", "cni0", nil)
	state := t.TempDir()
	// Records of the departed gateway and of the pods DEL and GC remove.
	for _, id := range []string{"c-old", "c-gw", "c-gone"} {
		if err := node.WriteIdentity(state, node.Identity{ContainerID: id, Namespace: "x", Name: id}); err != nil {
			t.Fatal(err)
		}
	}
	records := func() []string {
		m, err := node.ReadIdentities(state)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for id := range m {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		return ids
	}
	keys := `"nodeEnforcement": true, "stateDir": "` + state + `"`
	err := p.Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Args: podArgs, StdinData: stdin("1.0.0", keys, map[string]string{}, true)})
	if err != nil {
		t.Fatal(err)
	}
	if f.Calls != 1 || len(f.Pods) != 3 || slices.ContainsFunc(f.Pods, func(p node.Pod) bool { return p.ContainerID == "c-old" }) {
		t.Fatalf("after ordinary ADD: %d calls, %v", f.Calls, f.Pods)
	}
	if got := f.Pods[2]; got.ContainerID != "c1" || got.Port != "veth1" || got.L3 != "cni0" || got.Gateway {
		t.Fatalf("registered %+v", got)
	}
	// ADD recorded the pod's identity from CNI_ARGS, and dropped the
	// record of the stale registration it replaced.
	if m, _ := node.ReadIdentities(state); m["c1"].Namespace != "team-a" || m["c1"].Name != "web-0" || m["c1"].Port != "veth1" || len(m["c1"].IPs) == 0 {
		t.Fatalf("identity record of c1: %+v", m["c1"])
	}
	if got := records(); !slices.Equal(got, []string{"c-gone", "c-gw", "c1"}) {
		t.Fatalf("records after ADD: %v", got)
	}
	for range 2 {
		if err := p.Del(&skel.CmdArgs{ContainerID: "c-gw", IfName: "eth0", StdinData: stdin("1.0.0", keys, nil, false)}); err != nil {
			t.Fatal(err)
		}
	}
	if slices.ContainsFunc(f.Pods, func(p node.Pod) bool { return p.ContainerID == "c-gw" }) {
		t.Fatalf("after DEL: %v", f.Pods)
	}
	if got := records(); !slices.Equal(got, []string{"c-gone", "c1"}) {
		t.Fatalf("records after DEL: %v", got)
	}
	if err := p.GC(&skel.CmdArgs{StdinData: stdin("1.1.0", keys, nil, false)}); err != nil || len(f.Pods) != 2 {
		t.Fatalf("GC without attachments: %v, %v", err, f.Pods)
	}
	gc := keys + `, "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]`
	if err := p.GC(&skel.CmdArgs{StdinData: stdin("1.1.0", gc, nil, false)}); err != nil {
		t.Fatal(err)
	}
	if len(f.Pods) != 1 || f.Pods[0].ContainerID != "c1" {
		t.Fatalf("after GC: %v", f.Pods)
	}
	if got := records(); !slices.Equal(got, []string{"c1"}) {
		t.Fatalf("records after GC: %v", got)
	}
	f.Calls = 0
	_ = p.Del(&skel.CmdArgs{ContainerID: "c1", StdinData: stdin("1.0.0", "", nil, false)})
	if f.Calls != 0 {
		t.Errorf("DEL without nodeEnforcement edited the node sets")
	}
}

// ADD fails closed, with the spec's codes: no host side (a macvlan pod),
// no node rules, a gateway on an app node.
func TestRegistrationRefusals(t *testing.T) {
	const keys = `"nodeEnforcement": true, "stateDir": ""`
	gwArgs := "K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=istio-egressgateway-1;K8S_POD_INFRA_CONTAINER_ID=c2"
	for _, tc := range []struct {
		name     string
		args     string
		hostErr  error
		storeErr error
		egress   bool
		code     uint
		says     string
	}{
		{"macvlan pod", podArgs, errors.New("its interface eth0 is a macvlan, not a veth"), nil, true, types.ErrInvalidNetworkConfig, "cannot enforce"},
		{"node rules missing", podArgs, nil, node.ErrNotApplied, true, types.ErrTryAgainLater, "not in place"},
		{"gateway on an app node", gwArgs, nil, nil, false, types.ErrInvalidNetworkConfig, "egress nodes"},
	} {
		p, _, _ := fakePlugin()
		f := &cnitest.Pods{Egress: tc.egress, Err: tc.storeErr}
		p.Pods = f
		p.HostSide = cnitest.HostSide("veth1", "cni0", tc.hostErr)
		err := p.Add(&skel.CmdArgs{ContainerID: "c2", IfName: "eth0", Args: tc.args, StdinData: stdin("1.0.0", keys, map[string]string{}, true)})
		if err == nil || Code(err) != tc.code || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: err %v (code %d), want code %d saying %q", tc.name, err, Code(err), tc.code, tc.says)
		}
		if len(f.Pods) != 0 {
			t.Errorf("%s: registered %v", tc.name, f.Pods)
		}
	}
}

// With nodeConfig, an ADD on a node without its rules applies them and
// registers the pod; if they cannot be applied it fails with code 11 and
// registers nothing. Without nodeConfig nothing is applied.
func TestRegistrationAppliesMissingNodeRules(t *testing.T) {
	const keys = `"nodeEnforcement": true, "stateDir": "", "nodeConfig": "/var/lib/egress-cni/node.json"`
	for _, tc := range []struct {
		name     string
		keys     string
		applyErr error
		applies  int
		code     uint
	}{
		{"applied, then registered", keys, nil, 1, 0},
		{"cannot apply", keys, errors.New("node config /var/lib/egress-cni/node.json: invalid JSON"), 1, types.ErrTryAgainLater},
		{"no nodeConfig", `"nodeEnforcement": true`, nil, 0, types.ErrTryAgainLater},
	} {
		p, _, _ := fakePlugin()
		f := &cnitest.Pods{Egress: true, Err: node.ErrNotApplied}
		p.Pods = f
		p.HostSide = cnitest.HostSide("veth1", "cni0", nil)
		applies := 0
		p.NodeRules = func(path string) (bool, error) {
			applies++
			if path != "/var/lib/egress-cni/node.json" {
				t.Errorf("%s: applied from %q", tc.name, path)
			}
			if tc.applyErr == nil {
				f.Err = nil
			}
			return tc.applyErr == nil, tc.applyErr
		}
		err := p.Add(&skel.CmdArgs{ContainerID: "c3", IfName: "eth0", Args: podArgs, StdinData: stdin("1.0.0", tc.keys, map[string]string{}, true)})
		if applies != tc.applies {
			t.Errorf("%s: %d applies, want %d", tc.name, applies, tc.applies)
		}
		if tc.code == 0 {
			if err != nil || len(f.Pods) != 1 {
				t.Errorf("%s: err %v, registered %v", tc.name, err, f.Pods)
			}
			continue
		}
		if err == nil || Code(err) != tc.code || len(f.Pods) != 0 {
			t.Errorf("%s: err %v (code %d), registered %v; want code %d and nothing registered", tc.name, err, Code(err), f.Pods, tc.code)
		}
	}
	p, _, _ := fakePlugin()
	if err := p.Add(&skel.CmdArgs{ContainerID: "c4", IfName: "eth0", Args: podArgs,
		StdinData: stdin("1.0.0", `"nodeEnforcement": true, "nodeConfig": "etc/node.json"`, map[string]string{}, true)}); err == nil || Code(err) != types.ErrInvalidNetworkConfig || !strings.Contains(err.Error(), "nodeConfig") {
		t.Errorf("relative nodeConfig: %v", err)
	}
}
