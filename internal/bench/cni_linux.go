//go:build linux

package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// CNIRow is one backend's plugin figures.
type CNIRow struct {
	Backend    string
	Add        Stats
	AddInProc  Stats // the plugin's own "duration" of each ADD, from its log
	Check, Del Stats
	BurstWall  time.Duration
	Burst      Stats
	Add10k     Stats // ADD with 10,000 excluded CIDRs in the annotation
}

// CNIResult holds the plugin section.
type CNIResult struct {
	Rows        []CNIRow
	Floor       Stats // nftfloor -n 0, started the same way as the plugin
	FloorInProc Stats // nftfloor's own "applied in"
}

// istioStatus is what the sidecar injector leaves on a pod.
const istioStatus = `{"initContainers":null,"containers":["istio-proxy"],"volumes":["istio-envoy"]}`

// CNIStdin is what containerd gives the last plugin of a chain: the
// conflist entry with name and cniVersion, runtimeConfig holding the
// pod's annotations (an injected pod's, excluding the CIDRs exclude),
// and prevResult (a bridge plugin's result). test/netns's Go benchmark
// of the plugin uses it too.
func CNIStdin(backend, logFile, exclude string) ([]byte, error) {
	conf := map[string]any{
		"cniVersion":   "1.0.0",
		"name":         "egress-bench",
		"type":         "egress-cni",
		"capabilities": map[string]bool{"io.kubernetes.cri.pod-annotations": true},
		"backend":      backend,
		"logFile":      logFile,
		"runtimeConfig": map[string]any{
			"io.kubernetes.cri.pod-annotations": map[string]string{
				"sidecar.istio.io/status":                          istioStatus,
				"traffic.sidecar.istio.io/excludeOutboundIPRanges": exclude,
				"kubectl.kubernetes.io/default-container":          "app",
				"prometheus.io/scrape":                             "true",
			},
		},
		"prevResult": map[string]any{
			"cniVersion": "1.0.0",
			"interfaces": []any{
				map[string]any{"name": "cni0", "mac": "02:00:00:00:00:01"},
				map[string]any{"name": "veth1234", "mac": "02:00:00:00:00:02"},
				map[string]any{"name": "eth0", "mac": "02:00:00:00:00:03", "sandbox": "/var/run/netns/bench"},
			},
			"ips":    []any{map[string]any{"address": "198.51.100.7/24", "gateway": "198.51.100.1", "interface": 2}},
			"routes": []any{map[string]any{"dst": "0.0.0.0/0", "gw": "198.51.100.1"}},
			"dns":    map[string]any{},
		},
	}
	return json.Marshal(conf)
}

// CNIEnv is the environment a runtime gives the plugin for pod i
// (bench-<i> in team-a, container bench<i>) in podNS.
func CNIEnv(command, binDir, podNS string, i int) []string {
	return append(os.Environ(),
		"CNI_COMMAND="+command,
		fmt.Sprintf("CNI_CONTAINERID=bench%d", i),
		"CNI_NETNS="+podNS,
		"CNI_IFNAME=eth0",
		"CNI_PATH="+binDir,
		fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=bench-%d;K8S_POD_INFRA_CONTAINER_ID=bench%d;K8S_POD_UID=uid-%d", i, i, i),
	)
}

// measureCNI execs the plugin as a runtime does: from the node's
// namespace (a namespace of ours standing in for the host), with
// CNI_NETNS naming a fresh pod namespace. Namespace creation is not timed.
func (b *Bench) measureCNI() (*CNIResult, error) {
	node, err := newNS()
	if err != nil {
		return nil, err
	}
	defer delNS(node)
	logDir, err := os.MkdirTemp("", "egress-bench-log")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(logDir)
	plugin := b.cfg.EgressCNI
	binDir := filepath.Dir(plugin)
	res := &CNIResult{}
	var floor, floorIn []time.Duration
	id := 0
	for _, be := range Backends {
		row := CNIRow{Backend: be}
		stdin, err := CNIStdin(be, filepath.Join(logDir, be+".log"), "169.254.169.254/32,10.96.0.1/32")
		if err != nil {
			return nil, err
		}
		var add, check, del []time.Duration
		for range b.cfg.Pods {
			id++
			pod, err := newNS()
			if err != nil {
				return nil, err
			}
			var p proc
			steps := []struct {
				cmd string
				out *[]time.Duration
			}{{"ADD", &add}, {"CHECK", &check}, {"DEL", &del}}
			for _, s := range steps {
				if p, err = runIn(node, stdin, CNIEnv(s.cmd, binDir, pod.Path(), id), plugin); err != nil {
					delNS(pod)
					return nil, fmt.Errorf("CNI %s (%s): %w", s.cmd, be, err)
				}
				*s.out = append(*s.out, p.Took)
			}
			delNS(pod)
			if be == "nftables" {
				// The floor, started the same way, interleaved with ADDs.
				fl, err := newNS()
				if err != nil {
					return nil, err
				}
				p, err = runIn(node, nil, nil, b.cfg.NFTFloor, "-netns", fl.Path(), "-n", "0")
				delNS(fl)
				if err != nil {
					return nil, err
				}
				floor = append(floor, p.Took)
				if d := appliedIn(p.Out); d > 0 {
					floorIn = append(floorIn, d)
				}
			}
		}
		row.Add, row.Check, row.Del = summarize(add), summarize(check), summarize(del)
		logFile := filepath.Join(logDir, be+".log")
		row.AddInProc = summarize(addDurations(logFile))
		_ = os.Remove(logFile)

		wall, burst, err := b.cniBurst(node, be, stdin, &id)
		if err != nil {
			return nil, err
		}
		row.BurstWall, row.Burst = wall, summarize(burst)

		big, err := CNIStdin(be, filepath.Join(logDir, be+".log"), strings.Join(excludedCIDRs(10000), ","))
		if err != nil {
			return nil, err
		}
		var add10k []time.Duration
		for range b.cfg.RSSRuns {
			id++
			pod, err := newNS()
			if err != nil {
				return nil, err
			}
			p, err := runIn(node, big, CNIEnv("ADD", binDir, pod.Path(), id), plugin)
			delNS(pod)
			if err != nil {
				return nil, fmt.Errorf("CNI ADD N=10000 (%s): %w", be, err)
			}
			add10k = append(add10k, p.Took)
		}
		row.Add10k = summarize(add10k)
		res.Rows = append(res.Rows, row)
		logf("cni %s: ADD p50 %s ms p99 %s ms; burst wall %s ms", be, ms(row.Add.P50), ms(row.Add.P99), ms(row.BurstWall))
	}
	res.Floor, res.FloorInProc = summarize(floor), summarize(floorIn)
	return res, nil
}

// cniBurst starts b.cfg.Burst ADDs at once, each into its own pod
// namespace, and returns the wall time of the burst and each ADD's time.
func (b *Bench) cniBurst(node ns.NetNS, be string, stdin []byte, id *int) (time.Duration, []time.Duration, error) {
	pods := make([]ns.NetNS, b.cfg.Burst)
	ids := make([]int, b.cfg.Burst)
	defer func() {
		for _, p := range pods {
			if p != nil {
				delNS(p)
			}
		}
	}()
	for i := range pods {
		p, err := newNS()
		if err != nil {
			return 0, nil, err
		}
		pods[i] = p
		*id++
		ids[i] = *id
	}
	took := make([]time.Duration, len(pods))
	errs := make([]error, len(pods))
	var wg sync.WaitGroup
	start := time.Now()
	for i := range pods {
		wg.Go(func() {
			p, err := runIn(node, stdin, CNIEnv("ADD", filepath.Dir(b.cfg.EgressCNI), pods[i].Path(), ids[i]), b.cfg.EgressCNI)
			took[i], errs[i] = p.Took, err
		})
	}
	wg.Wait()
	wall := time.Since(start)
	for i, err := range errs {
		if err != nil {
			return 0, nil, fmt.Errorf("burst ADD %d (%s): %w", i, be, err)
		}
	}
	return wall, took, nil
}

// addDurations is AddDurations without the error (none when the log is
// missing).
func addDurations(logFile string) []time.Duration {
	d, _ := AddDurations(logFile)
	return d
}

// AddDurations reads the "duration" of every ADD record in the plugin's
// JSON log: the plugin's own time, from its first line of Go to the
// result.
func AddDurations(logFile string) ([]time.Duration, error) {
	data, err := os.ReadFile(logFile)
	if err != nil {
		return nil, err
	}
	var out []time.Duration
	for _, l := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		var rec struct {
			Cmd      string `json:"cmd"`
			Duration int64  `json:"duration"`
		}
		if json.Unmarshal([]byte(l), &rec) == nil && rec.Cmd == "ADD" && rec.Duration > 0 {
			out = append(out, time.Duration(rec.Duration))
		}
	}
	return out, nil
}
