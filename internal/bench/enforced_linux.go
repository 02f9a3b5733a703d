//go:build linux

package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/egress-cni/egress-cni/pkg/install"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// EnforcedResult is the plugin's ADD and DEL with nodeEnforcement: each
// pod is a real veth pair, so ADD finds the host side and registers it
// with the node rules (applied once), and the repair delay of the agent.
type EnforcedResult struct {
	Add, Del Stats
	// Repair: from `nft delete table` (or flush) of our tables to Check
	// passing again, with the installer's Run watching.
	Repair Stats
}

func enforcedStdin(logFile, nodeConfig string, podIP netip.Prefix, gw netip.Addr, hostVeth string) ([]byte, error) {
	b, err := CNIStdin("nftables", logFile, "169.254.169.254/32")
	if err != nil {
		return nil, err
	}
	var conf map[string]any
	if err := json.Unmarshal(b, &conf); err != nil {
		return nil, err
	}
	conf["nodeEnforcement"] = true
	conf["nodeConfig"] = nodeConfig
	conf["prevResult"] = map[string]any{
		"cniVersion": "1.0.0",
		"interfaces": []any{map[string]any{"name": hostVeth}, map[string]any{"name": "eth0", "sandbox": "/var/run/netns/bench"}},
		"ips":        []any{map[string]any{"address": podIP.String(), "gateway": gw.String(), "interface": 1}},
	}
	return json.Marshal(conf)
}

func (b *Bench) measureEnforced() (*EnforcedResult, error) {
	nodeNS, err := newNS()
	if err != nil {
		return nil, err
	}
	defer delNS(nodeNS)
	dir, err := os.MkdirTemp("", "egress-bench-enforced")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	nodeCfg := filepath.Join(dir, "node.json")
	if err := os.WriteFile(nodeCfg, []byte(`{"role":"egress","uplink":"up0","podCIDRs":["198.51.100.0/24"],"allow":["203.0.113.0/24"]}`), 0o644); err != nil {
		return nil, err
	}
	cfg, err := node.Load(nodeCfg)
	if err != nil {
		return nil, err
	}
	if err := nodeNS.Do(func(ns.NetNS) error { return node.Apply(cfg) }); err != nil {
		return nil, err
	}
	res := &EnforcedResult{}
	var add, del []time.Duration
	plugin := b.cfg.EgressCNI
	for i := range b.cfg.Pods {
		pod, err := newNS()
		if err != nil {
			return nil, err
		}
		host := fmt.Sprintf("vethe%04d", i)
		ip := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i%200)}), 24)
		if err := wire(nodeNS, pod, host, ip, netip.MustParsePrefix(fmt.Sprintf("198.51.100.1/%d", 32))); err != nil {
			delNS(pod)
			return nil, err
		}
		stdin, err := enforcedStdin(filepath.Join(dir, "plugin.log"), nodeCfg, ip, netip.MustParseAddr("198.51.100.1"), host)
		if err != nil {
			delNS(pod)
			return nil, err
		}
		for _, s := range []struct {
			cmd string
			out *[]time.Duration
		}{{"ADD", &add}, {"DEL", &del}} {
			p, err := runIn(nodeNS, stdin, CNIEnv(s.cmd, filepath.Dir(plugin), pod.Path(), 100000+i), plugin)
			if err != nil {
				delNS(pod)
				return nil, fmt.Errorf("CNI %s with nodeEnforcement: %w\n%s", s.cmd, err, p.Out)
			}
			*s.out = append(*s.out, p.Took)
		}
		_ = nodeNS.Do(func(ns.NetNS) error {
			if l, err := netlink.LinkByName(host); err == nil {
				return netlink.LinkDel(l)
			}
			return nil
		})
		delNS(pod)
	}
	res.Add, res.Del = summarize(add), summarize(del)
	if res.Repair, err = b.repairDelay(nodeNS, nodeCfg); err != nil {
		return nil, err
	}
	logf("cni nodeEnforcement: ADD p50 %s p99 %s ms, DEL p50 %s p99 %s ms; repair p50 %s max %s ms",
		ms(res.Add.P50), ms(res.Add.P99), ms(res.Del.P50), ms(res.Del.P99), ms(res.Repair.P50), ms(res.Repair.Max))
	return res, nil
}

// repairDelay runs the installer's Run (as the DaemonSet does, resync an
// hour away) and times how long it takes to repair each tampering.
func (b *Bench) repairDelay(nodeNS ns.NetNS, nodeCfg string) (Stats, error) {
	root, err := os.MkdirTemp("", "egress-bench-agent")
	if err != nil {
		return Stats{}, err
	}
	defer os.RemoveAll(root)
	in, err := install.New(install.Options{ConfDir: filepath.Join(root, "net.d"), BinDir: filepath.Join(root, "bin"),
		LockFile: filepath.Join(root, "lock"), ReadyFile: filepath.Join(root, "ready"), NodeConfig: nodeCfg, NetNS: nodeNS.Path(), Resync: time.Hour})
	if err != nil {
		return Stats{}, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			fmt.Fprintf(os.Stderr, "egress-bench: the installer ended with: %v\n", err)
		}
	}()
	cfg, err := node.Load(nodeCfg)
	if err != nil {
		return Stats{}, err
	}
	check := func() error { return nodeNS.Do(func(ns.NetNS) error { return node.Check(cfg) }) }
	wait := func() (time.Duration, error) {
		start := time.Now()
		for check() != nil || !in.Watching() {
			if time.Since(start) > 10*time.Second {
				return 0, fmt.Errorf("node rules not repaired within 10s")
			}
			time.Sleep(200 * time.Microsecond)
		}
		return time.Since(start), nil
	}
	if _, err := wait(); err != nil {
		return Stats{}, err
	}
	var delays []time.Duration
	for i := range 3 * b.cfg.NodeRuns {
		cmd := []string{"delete table inet egress_cni_node", "flush table inet egress_cni_node", "flush ruleset"}[i%3]
		before := in.Repairs()
		start := time.Now()
		if err := nodeNS.Do(func(ns.NetNS) error { return exec.Command("nft", cmd).Run() }); err != nil {
			return Stats{}, fmt.Errorf("nft %s: %w", cmd, err)
		}
		for in.Repairs() == before || check() != nil {
			if time.Since(start) > 10*time.Second {
				return Stats{}, fmt.Errorf("no repair within 10s of %q", cmd)
			}
			time.Sleep(200 * time.Microsecond)
		}
		delays = append(delays, time.Since(start))
	}
	return summarize(delays), nil
}
