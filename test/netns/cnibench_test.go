//go:build linux

package netns_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"

	"github.com/egress-cni/egress-cni/internal/bench"
	"github.com/egress-cni/egress-cni/internal/nstest"
)

// BenchmarkEgressCNIAdd measures the latency of egress-cni's ADD alone,
// per backend: one exec of the plugin binary, as containerd runs the last
// plugin of a chain (stdin with prevResult and the pod's annotations in
// runtimeConfig, CNI_ARGS with the pod's identity), into a fresh pod
// namespace each time. Namespace creation and removal are not timed.
// Each op is one pod; it reports the p50 and p99 of the per-pod
// latencies. For the figures in docs/cni.md:
//
//	go test -run '^$' -bench EgressCNIAdd -benchtime 200x ./test/netns/
func BenchmarkEgressCNIAdd(b *testing.B) {
	nstest.RequirePrivileged(b)
	binDir := b.TempDir()
	buildEgressCNI(b, binDir)
	plugin := filepath.Join(binDir, "egress-cni")
	node := nstest.NewNS(b)
	logDir := b.TempDir()

	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		b.Run(backend, func(b *testing.B) {
			stdin := benchStdin(b, backend, filepath.Join(logDir, backend+".log"))
			samples := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				podNS, err := testutils.NewNS()
				if err != nil {
					b.Fatal(err)
				}
				cmd := exec.Command(plugin)
				cmd.Stdin = bytes.NewReader(stdin)
				var stdout, stderr bytes.Buffer
				cmd.Stdout, cmd.Stderr = &stdout, &stderr
				cmd.Env = bench.CNIEnv("ADD", binDir, podNS.Path(), i)
				var took time.Duration
				b.StartTimer()
				err = node.Do(func(ns.NetNS) error {
					start := time.Now()
					err := cmd.Run()
					took = time.Since(start)
					return err
				})
				b.StopTimer()
				_ = podNS.Close()
				_ = testutils.UnmountNS(podNS)
				if err != nil {
					b.Fatalf("ADD: %v: %s %s", err, stdout.String(), stderr.String())
				}
				samples = append(samples, took)
				b.StartTimer()
			}
			b.StopTimer()
			logFile := filepath.Join(logDir, backend+".log")
			inProc := inPluginDurations(b, logFile)
			p50, p99 := percentile(samples, 50), percentile(samples, 99)
			// What the plugin measured itself (from its log): the
			// difference is process start-up and exit.
			if len(inProc) > 0 {
				b.ReportMetric(float64(percentile(inProc, 50).Microseconds())/1000, "inproc-p50-ms")
			}
			_ = os.Remove(logFile)
			b.ReportMetric(float64(p50.Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(p99.Microseconds())/1000, "p99-ms")
			b.Logf("%s: ADD latency over %d pods: p50 %v, p99 %v (inside the plugin: p50 %v, p99 %v)", backend, len(samples),
				p50.Round(10*time.Microsecond), p99.Round(10*time.Microsecond),
				percentile(inProc, 50).Round(10*time.Microsecond), percentile(inProc, 99).Round(10*time.Microsecond))
		})
	}
}

// inPluginDurations reads the "duration" of every ADD record in the
// plugin's log.
func inPluginDurations(b *testing.B, logFile string) []time.Duration {
	b.Helper()
	d, err := bench.AddDurations(logFile)
	if err != nil {
		b.Logf("no plugin log: %v", err)
	}
	return d
}

// percentile is the nearest-rank percentile.
func percentile(s []time.Duration, p int) time.Duration { return bench.Percentile(s, p) }

// benchStdin is the stdin containerd gives the last plugin of the chain
// (bench.CNIStdin, as `make bench` runs it).
func benchStdin(b *testing.B, backend, logFile string) []byte {
	b.Helper()
	out, err := bench.CNIStdin(backend, logFile, "169.254.169.254/32,10.96.0.1/32")
	if err != nil {
		b.Fatal(err)
	}
	return out
}
