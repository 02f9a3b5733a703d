//go:build linux

package escape_test

// egress-node explain on the world's live nodes, for legitimate and
// blocked paths of the matrix: its verdict and reason, and for the drops
// that a plain socket makes, the kernel's reason counter that rose when
// the same packet was really sent.

import (
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/sim"
	"github.com/egress-cni/egress-cni/pkg/node"
)

func (w *world) explainPaths(t *testing.T) {
	type tc struct {
		name    string
		from    *sim.Pod
		args    []string // before SOURCE DEST
		src     string   // SOURCE (default: the pod's address of dst's family)
		network string
		dst     netip.AddrPort
		// want: "accept", or the reason of the drop.
		want string
		// send: also send it from the pod and check the reason counter.
		send bool
	}
	cases := []tc{
		{"gateway to internet tcp4", w.gw, nil, "", "tcp4", ap(inet4, echoPort), "accept", false},
		{"gateway to internet udp6", w.gw, nil, "", "udp6", ap(inet6, echoPort), "accept", false},
		{"pod to pod across nodes tcp4", w.app, nil, "", "tcp4", ap(w.worker.IP4, echoPort), "accept", false},
		{"pod to pod same node tcp6", w.app, nil, "", "tcp6", ap(w.web.IP6, echoPort), "accept", false},
		{"pod to the internet tcp4", w.app, nil, "", "tcp4", ap(inet4, echoPort), string(node.ReasonNotAGateway), true},
		{"pod to the internet udp6", w.app, nil, "", "udp6", ap(inet6, echoPort), string(node.ReasonNotAGateway), true},
		{"pod on the egress node to the internet udp4", w.worker, nil, "", "udp4", ap(inet4, echoPort), string(node.ReasonNotAGateway), true},
		{"self-declared gateway tcp4", w.selfgw, nil, w.selfgw.Namespace + "/" + w.selfgw.Name, "tcp4", ap(inet4, echoPort), string(node.ReasonNotAGateway), true},
		{"worker forging the gateway's address udp4", w.worker, []string{"-src-addr", w.gw.IP4.String()}, "", "udp4", ap(inet4, echoPort), string(node.ReasonForgedSource), false},
		{"unregistered pod on " + lxcName + " udp4", w.lxc, []string{"-iif", lxcName}, "", "udp4", ap(inet4, echoPort), string(node.ReasonNoIdentity), true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := c.from.Node
			v6 := strings.HasSuffix(c.network, "6")
			src := c.src
			if src == "" {
				src = c.from.IP4.String()
				if v6 {
					src = c.from.IP6.String()
				}
			}
			proto := strings.TrimRight(c.network, "46")
			args := append([]string{"explain", "-live", "-config", n.NodeConfig, "-netns", n.NS.Path(), "-state-dir", n.StateDir}, c.args...)
			args = append(args, src, c.dst.String()+"/"+proto)
			out, err := exec.Command(filepath.Join(w.bin, "egress-node"), args...).CombinedOutput()
			if err != nil {
				t.Fatalf("egress-node %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			want := "verdict: accept"
			if c.want != "accept" {
				want = "verdict: drop (" + c.want + ")"
			}
			if !strings.Contains(string(out), want+"\n") {
				t.Fatalf("explain says otherwise, want %q:\n%s", want, out)
			}
			if !c.send {
				return
			}
			fam := node.FamilyIPv4
			if v6 {
				fam = node.FamilyIPv6
			}
			counter := func() uint64 {
				var k node.Counters
				if err := n.NS.Do(func(ns.NetNS) error {
					var err error
					k, err = node.ReadCounters()
					return err
				}); err != nil {
					t.Fatal(err)
				}
				return k.ByReason[node.Reason(c.want)][fam]
			}
			before := counter()
			_, _ = sim.RunProbe(w.ctx(), w.exe, c.from.NS, appUID, sim.Probe{Network: c.network, Addr: c.dst, Payload: []byte("explain\n"),
				Timeout: 300 * time.Millisecond, NoReply: strings.HasPrefix(c.network, "udp")})
			if after := counter(); after <= before {
				t.Errorf("sent for real, the kernel's %s counter did not rise (%d -> %d)", node.ReasonCounter(node.Reason(c.want), fam), before, after)
			}
		})
	}
}
