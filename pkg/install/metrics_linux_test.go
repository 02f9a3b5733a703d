package install

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/egress-cni/egress-cni/internal/nstest"
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
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
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
