package install

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/audit"
)

// vmRSS is this process's resident set, as /proc reports it.
func vmRSS() string {
	b, _ := os.ReadFile("/proc/self/status")
	for _, ln := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(ln, "VmRSS:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

// scrapeOver GETs /metrics over conn (made in the test's namespace).
func scrapeOver(conn net.Conn, addr string) (int, string, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(context.Context, string, string) (net.Conn, error) { return conn, nil }}}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// Thousands of idle connections to /metrics (an unauthenticated port on
// the node's addresses) hold no more than the caps of goroutines, are
// closed by the server's timeouts, and a scraper from another address is
// answered meanwhile. A fresh namespace of our own, its loopback only.
func TestMetricsIdleConnections(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	reg := prometheus.NewRegistry()
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "egress_cni_test_gauge", Help: "t"})
	g.Set(7)
	reg.MustRegister(g)
	lim := metricsLimits{MaxConns: 32, PerIP: 8, ReadHeader: 500 * time.Millisecond, Read: time.Second, Write: 2 * time.Second,
		Idle: 500 * time.Millisecond, InFlight: 2, Gather: time.Second}
	const idle = 3000
	var l net.Listener
	var conns []net.Conn
	dial := func(src, dst string) (net.Conn, error) {
		d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		return d.Dial("tcp", dst)
	}
	if err := host.Do(func(ns.NetNS) error {
		var err error
		l, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var ms0 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)
	g0 := runtime.NumGoroutine()
	go func() { done <- serveMetrics(ctx, l, reg, lim) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	if err := host.Do(func(ns.NetNS) error {
		for i := range idle {
			c, err := dial("127.0.0.1", addr)
			if err != nil {
				return fmt.Errorf("idle connection %d: %w", i, err)
			}
			if i%2 == 1 {
				// Half of them a slow request: a header never finished.
				_, _ = c.Write([]byte("GET /metrics HTTP/1.1\r\nHost: x\r\n"))
			}
			conns = append(conns, c)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	time.Sleep(200 * time.Millisecond)
	g1 := runtime.NumGoroutine()
	var ms1 runtime.MemStats
	runtime.ReadMemStats(&ms1)
	t.Logf("%d idle connections: goroutines %d -> %d, heap in use %d -> %d KiB, test process RSS %s", idle, g0, g1,
		ms0.HeapInuse>>10, ms1.HeapInuse>>10, vmRSS())
	// Each served connection is a goroutine or two (conn, background
	// read); the server's own are a few.
	if g1-g0 > 2*lim.PerIP+10 {
		t.Errorf("%d idle connections from one address hold %d goroutines; the per-address cap is %d", idle, g1-g0, lim.PerIP)
	}

	// A scraper on another address is answered now.
	var conn net.Conn
	if err := host.Do(func(ns.NetNS) error {
		var err error
		conn, err = dial("127.0.0.2", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	code, body, err := scrapeOver(conn, addr)
	if err != nil || code != http.StatusOK || !strings.Contains(body, "egress_cni_test_gauge 7") {
		t.Fatalf("scrape during the idle connections: %v %d\n%.300s", err, code, body)
	}
	t.Logf("scrape answered in %v", time.Since(start).Round(time.Millisecond))

	// The server closes the idle ones past its timeouts: each read ends
	// (EOF or reset), none times out on our side.
	deadline := time.Now().Add(3 * time.Second)
	open := 0
	for _, c := range conns {
		_ = c.SetReadDeadline(deadline)
		buf := make([]byte, 512)
		for {
			_, err := c.Read(buf)
			if err == nil {
				continue // a 408 or 400 before the close
			}
			if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
				open++
			}
			break
		}
	}
	if open != 0 {
		t.Errorf("%d of %d idle connections still open %v after the timeouts", open, idle, 3*time.Second)
	}
	if g2 := runtime.NumGoroutine(); g2-g0 > 10 {
		t.Errorf("goroutines %d -> %d after the idle connections closed", g0, g2)
	}
}

// Scrapes within nodeReadTTL share one read of the node state (each
// read is a Check and counter dump in the kernel).
func TestNodeCollectorCachesReads(t *testing.T) {
	in := &Installer{opts: Options{NodeConfig: t.TempDir() + "/missing.json"}}
	c := &nodeCollector{in: in}
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	for range 50 {
		_, _ = reg.Gather()
	}
	if c.reads != 1 {
		t.Errorf("50 scrapes read the node state %d times, want 1 within %v", c.reads, nodeReadTTL)
	}
	c.mu.Lock()
	c.at = c.at.Add(-nodeReadTTL)
	c.mu.Unlock()
	_, _ = reg.Gather()
	if c.reads != 2 {
		t.Errorf("a scrape past the TTL did not read again (%d reads)", c.reads)
	}
}

// gauge reads one unlabelled gauge from reg.
func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no %s", name)
	return 0
}

// egress_cni_pods_unenforceable reads 0 when no scan ran as well as when
// one found nothing: egress_cni_attachment_scan_up tells them apart.
// egress_cni_audit_up is 0 while no audit reads the NFLOG group.
func TestScanAndAuditUp(t *testing.T) {
	file := filepath.Join(t.TempDir(), "not-a-dir")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	in := &Installer{log: slog.New(slog.NewTextHandler(io.Discard, nil)), applySeconds: newApplySeconds()}
	reg := in.metricsRegistry()
	for _, tc := range []struct {
		dir  string
		want float64
	}{{"", 0}, {file, 0}, {t.TempDir(), 1}, {file, 0}} {
		in.opts.NetNSDir = tc.dir
		in.scanAttachments()
		if got := gauge(t, reg, "egress_cni_attachment_scan_up"); got != tc.want {
			t.Errorf("scan of %q: egress_cni_attachment_scan_up %v, want %v", tc.dir, got, tc.want)
		}
		if got := gauge(t, reg, "egress_cni_pods_unenforceable"); got != 0 {
			t.Errorf("scan of %q: egress_cni_pods_unenforceable %v", tc.dir, got)
		}
	}
	if got := gauge(t, reg, "egress_cni_audit_up"); got != 0 {
		t.Errorf("no audit: egress_cni_audit_up %v, want 0", got)
	}
	a, err := audit.New(audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	in.auditor.Store(a)
	if got := gauge(t, reg, "egress_cni_audit_up"); got != 0 {
		t.Errorf("an audit not running: egress_cni_audit_up %v, want 0", got)
	}
}
