//go:build linux

package netns_test

// Fault tests: what a killed apply, a missing binary and an old layout
// leave behind.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/rules"
)

// manyCIDRs returns n distinct /30s carved from 10.0.0.0/8: rule content
// only, never a traffic target.
func manyCIDRs(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("10.%d.%d.%d/30", i>>14&0xff, i>>6&0xff, (i&0x3f)<<2)
	}
	return out
}

func faultRuleset(t *testing.T, exclude []string) *rules.Ruleset {
	t.Helper()
	cfg := rules.DefaultConfig()
	x := strings.Join(exclude, ",")
	if err := cfg.ApplyOptions(rules.OptionText{rules.FieldOutboundExcludeCIDRs: x}); err != nil {
		t.Fatal(err)
	}
	rs, err := rules.Build(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// pluginStdin is the egress-cni config containerd would pass, with every
// pod captured (no annotations needed) and exclude as a JSON list.
func pluginStdin(backend string, exclude []string) []byte {
	q := make([]string, len(exclude))
	for i, c := range exclude {
		q[i] = `"` + c + `"`
	}
	return []byte(fmt.Sprintf(`{"cniVersion":"1.0.0","name":"k8s","type":"egress-cni","capture":"all","logFile":"",
"backend":%q,"excludeOutboundIPRanges":[%s],
"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"x"}],"ips":[{"address":"192.0.2.2/24","interface":0}]}}`,
		backend, strings.Join(q, ",")))
}

// startPlugin starts egress-cni ADD in its own process group, from the
// calling goroutine's namespace.
func startPlugin(t *testing.T, bin, netnsPath string, stdin []byte) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "CNI_COMMAND=ADD", "CNI_CONTAINERID=kill-test", "CNI_NETNS="+netnsPath,
		"CNI_IFNAME=eth0", "CNI_PATH=/nonexistent", "CNI_ARGS=K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=big")
	cmd.Stdin = strings.NewReader(string(stdin))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd
}

// TestKilledApplyIsAllOrNothing SIGKILLs the plugin's whole process group
// (as the kubelet killing a sandbox does) at increasing points of an
// apply of 10,000 excluded CIDRs over an existing small ruleset. After
// each kill the namespace holds the old complete ruleset or the new
// complete one: Check passes for exactly one of them.
func TestKilledApplyIsAllOrNothing(t *testing.T) {
	nstest.RequirePrivileged(t)
	binDir := t.TempDir()
	buildEgressCNI(t, binDir)
	bin := binDir + "/egress-cni"
	small := []string{"198.51.100.0/24"}
	big := manyCIDRs(10000)
	oldRS, newRS := faultRuleset(t, small), faultRuleset(t, big)

	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		t.Run(backend, func(t *testing.T) {
			// How long a whole apply takes here, to spread the kills over it.
			p := nstest.NewPod(t, nstest.PodOptions{})
			start := time.Now()
			full := startPlugin(t, bin, p.NS.Path(), pluginStdin(backend, big))
			if err := full.Wait(); err != nil {
				t.Fatalf("uninterrupted apply failed: %v", err)
			}
			whole := time.Since(start)
			outcomes := map[string]int{}
			for i := 0; i < 8; i++ {
				delay := whole * time.Duration(i) / 7
				n := nstest.NewNS(t)
				if err := plugin(t, bin, n.Path(), pluginStdin(backend, small)); err != nil {
					t.Fatalf("small apply: %v", err)
				}
				cmd := startPlugin(t, bin, n.Path(), pluginStdin(backend, big))
				time.Sleep(delay)
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				_ = cmd.Wait()
				waitGroupGone(t, cmd.Process.Pid)
				be, err := rules.NewBackend(rules.BackendName(backend), rules.BackendOptions{})
				if err != nil {
					t.Fatal(err)
				}
				var oldErr, newErr error
				_ = n.Do(func(ns.NetNS) error {
					oldErr, newErr = be.Check(context.Background(), oldRS), be.Check(context.Background(), newRS)
					return nil
				})
				switch {
				case oldErr == nil && newErr != nil:
					outcomes["old"]++
				case newErr == nil && oldErr != nil:
					outcomes["new"]++
				default:
					t.Fatalf("kill after %v: neither the old nor the new ruleset is complete:\nold: %v\nnew: %v", delay, oldErr, newErr)
				}
			}
			t.Logf("%s: whole apply %v; after 8 kills spread over it: %v", backend, whole.Round(time.Millisecond), outcomes)
		})
	}
}

func plugin(t *testing.T, bin, netnsPath string, stdin []byte) error {
	t.Helper()
	cmd := startPlugin(t, bin, netnsPath, stdin)
	return cmd.Wait()
}

// waitGroupGone waits until no process of the group is left (an
// iptables-restore child dies with the group, but not instantly).
func waitGroupGone(t *testing.T, pgid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(-pgid, 0); err != nil {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("process group %d still alive after SIGKILL", pgid)
}

// TestNFTablesNeedsNoBinary runs egress-init with an empty PATH and no
// sbin fallback reachable for nft: the nftables backend needs no program.
func TestNFTablesNeedsNoBinary(t *testing.T) {
	nstest.RequirePrivileged(t)
	bin := buildEgressInit(t)
	p := nstest.NewPod(t, nstest.PodOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append(append([]string{}, injectorArgs...), "--backend", "nftables", "--netns", p.NS.Path())...)
	cmd.Env = []string{"PATH=/nonexistent"}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nftables with an empty PATH: %v\n%s", err, out)
	}
	nstest.ServeProxy(t, p.NS, 15001)
	nstest.ServeEcho(t, p.World, ":80")
	r := parseReply(t, nstest.MustDial(t, p.NS, 1000, 1000, "tcp", nstest.InternetIPv4.String()+":80"))
	if r.Kind != "proxy" {
		t.Fatalf("not captured: %+v", r)
	}
}

// TestUpgradeFromOldLayout: a table of ours written in an older layout
// (other chain names, an extra chain, no format version) is replaced
// cleanly, never duplicated; for iptables, rules of an older egress-cni
// without our comment (or istio-iptables') are taken over.
func TestUpgradeFromOldLayout(t *testing.T) {
	nstest.RequirePrivileged(t)
	rs := faultRuleset(t, []string{"198.51.100.0/24"})
	t.Run("nftables", func(t *testing.T) {
		p := nstest.NewPod(t, nstest.PodOptions{})
		old := `table inet egress_cni {
	chain output { type nat hook output priority -100; policy accept; jump OLD_CAPTURE; }
	chain OLD_CAPTURE { meta skuid 1337 return; meta l4proto tcp redirect to :15001; }
}
table ip egress_cni {
	chain output { type nat hook output priority -100; policy accept; meta l4proto tcp redirect to :15001; }
}`
		if out, err := nstest.Exec(p.NS, "sh", "-c", "nft -f - <<'EOF'\n"+old+"\nEOF\n"); err != nil {
			t.Fatalf("writing the old layout: %v %s", err, out)
		}
		applyIn(t, p.NS, "nftables", rs)
		d := nstest.NFTDump(t, p.NS)
		if strings.Contains(d, "OLD_CAPTURE") || strings.Contains(d, "table ip egress_cni") || strings.Count(d, "table inet egress_cni") != 1 {
			t.Fatalf("old layout not replaced:\n%s", d)
		}
		if !strings.Contains(d, fmt.Sprintf("egress-cni format %d", rules.FormatVersion)) {
			t.Errorf("format version not recorded:\n%s", d)
		}
	})
	for _, flavour := range []string{"iptables-nft", "iptables-legacy"} {
		t.Run(flavour, func(t *testing.T) {
			p := nstest.NewPod(t, nstest.PodOptions{})
			// Written by istio-iptables (or an egress-cni before the
			// comment): jumps without our comment.
			old := "*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n" +
				"-A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n" +
				"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"
			restore := flavour + "-restore"
			if out, err := nstest.Exec(p.NS, "sh", "-c", restore+" --noflush <<'EOF'\n"+old+"EOF\n"); err != nil {
				t.Fatalf("writing the old layout: %v %s", err, out)
			}
			applyIn(t, p.NS, flavour, rs)
			applyIn(t, p.NS, flavour, rs)
			d := nstest.IPTSave(t, p.NS, flavour)
			// One jump per family (the dump holds IPv4 and IPv6).
			if n := strings.Count(d, "-A OUTPUT -m comment --comment egress-cni -j ISTIO_OUTPUT"); n != 2 || strings.Count(d, "-j ISTIO_OUTPUT") != 2 {
				t.Fatalf("want exactly one commented jump to ISTIO_OUTPUT per family:\n%s", d)
			}
		})
	}
}

func applyIn(t *testing.T, n ns.NetNS, backend string, rs *rules.Ruleset) {
	t.Helper()
	err := n.Do(func(ns.NetNS) error {
		be, err := rules.NewBackend(rules.BackendName(backend), rules.BackendOptions{})
		if err != nil {
			return err
		}
		if err := be.Apply(context.Background(), rs); err != nil {
			return err
		}
		return be.Check(context.Background(), rs)
	})
	if err != nil {
		t.Fatalf("%s apply+check: %v", backend, err)
	}
}
