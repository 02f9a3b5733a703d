package install

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/egress-cni/egress-cni/pkg/audit"
	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// DefaultMetricsPort is the agent's Prometheus port (the DaemonSets'
// container port "metrics").
const DefaultMetricsPort = 9964

// DefaultStateDir is the plugin's default stateDir (node.DefaultStateDir)
// as the DaemonSet mounts it.
const DefaultStateDir = "/host" + node.DefaultStateDir

// Metric descriptions. The node totals are read from the kernel's
// counters at every scrape: exact, whatever the NFLOG rate limit drops.
var (
	descNodeDropped = prometheus.NewDesc("egress_cni_node_dropped_packets_total",
		"Packets the node rules dropped, by reason and family (kernel counters: exact).", []string{"reason", "family"}, nil)
	descGateways = prometheus.NewDesc("egress_cni_gateways",
		"Registered egress-gateway pods on this node.", []string{"node_role"}, nil)
	descInSync = prometheus.NewDesc("egress_cni_node_rules_in_sync",
		"1 when the node rules in the kernel match the node config (Check), 0 otherwise.", nil, nil)
	descRepairs = prometheus.NewDesc("egress_cni_node_rules_repairs_total",
		"Times the agent found the node rules changed and applied them again.", nil, nil)
	descUnenforceable = prometheus.NewDesc("egress_cni_pods_unenforceable",
		"Pods with an attachment that bypasses the host's IP stack (macvlan, ipvlan, SR-IOV), found by the last full scan (see egress_cni_attachment_scan_up).", nil, nil)
	descScanUp = prometheus.NewDesc("egress_cni_attachment_scan_up",
		"1 when the last scan for host-bypassing attachments ran fully, 0 when it failed or is disabled (-netns-dir \"\"): egress_cni_pods_unenforceable then says nothing.", nil, nil)
	descAuditUp = prometheus.NewDesc("egress_cni_audit_up",
		"1 while the drop audit reads its NFLOG group, 0 otherwise (not started, or the group cannot be bound): drops are still counted by the kernel, but neither logged nor counted per pod.", nil, nil)
)

func newApplySeconds() prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "egress_cni_node_rules_apply_seconds",
		Help:    "Time to apply the node rules (one netlink batch).",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
	})
}

// nodeReadTTL is how long the node collector reuses its costly kernel
// reads (Check, a dump of the whole ruleset, and the gateways): scrapes
// closer together, however many, cost one. The drop counters are read
// at every scrape (one dump of the named counters): a counter is never
// staler than the scrape.
const nodeReadTTL = 2 * time.Second

// nodeCollector reads the node state at a scrape, Check and the
// gateways at most every nodeReadTTL.
type nodeCollector struct {
	in *Installer

	mu    sync.Mutex
	at    time.Time
	reads int // reads of Check and the gateways so far (tests)
	snap  nodeSnapshot
}

// nodeSnapshot is one read of the node state.
type nodeSnapshot struct {
	cfgErr error
	role   node.Role
	gws    []node.Gateway
	drift  error
	nerr   error
}

func (c *nodeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descNodeDropped, descGateways, descInSync, descRepairs, descUnenforceable, descScanUp, descAuditUp} {
		ch <- d
	}
}

// read returns the node state, read again if older than nodeReadTTL.
func (c *nodeCollector) read() nodeSnapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.at.IsZero() && time.Since(c.at) < nodeReadTTL {
		return c.snap
	}
	in := c.in
	var sn nodeSnapshot
	cfg, err := node.Load(in.opts.NodeConfig)
	if err != nil {
		sn.cfgErr = err
	} else {
		sn.role = cfg.Role
		sn.nerr = netns.Do(in.opts.NetNS, func() error {
			sn.drift = node.Check(cfg)
			if cfg.Role == node.RoleEgress {
				var err error
				sn.gws, err = node.ListGateways()
				return err
			}
			return nil
		})
	}
	c.snap, c.at = sn, time.Now()
	c.reads++
	return sn
}

func (c *nodeCollector) Collect(ch chan<- prometheus.Metric) {
	in := c.in
	ch <- prometheus.MustNewConstMetric(descRepairs, prometheus.CounterValue, float64(in.repairs.Load()))
	ch <- prometheus.MustNewConstMetric(descUnenforceable, prometheus.GaugeValue, float64(in.unenforceable.Load()))
	ch <- prometheus.MustNewConstMetric(descScanUp, prometheus.GaugeValue, b2f(in.scanUp.Load()))
	a := in.auditor.Load()
	ch <- prometheus.MustNewConstMetric(descAuditUp, prometheus.GaugeValue, b2f(a != nil && a.Bound()))
	if in.opts.NodeConfig == "" {
		return
	}
	sn := c.read()
	if sn.cfgErr != nil {
		ch <- prometheus.NewInvalidMetric(descInSync, sn.cfgErr)
		return
	}
	inSync := 1.0
	if sn.drift != nil {
		inSync = 0
	}
	ch <- prometheus.MustNewConstMetric(descInSync, prometheus.GaugeValue, inSync)
	var k node.Counters
	kerr := netns.Do(in.opts.NetNS, func() error {
		var err error
		k, err = node.ReadCounters()
		return err
	})
	if kerr == nil {
		for _, r := range node.Reasons() {
			for fam, n := range k.ByReason[r] {
				ch <- prometheus.MustNewConstMetric(descNodeDropped, prometheus.CounterValue, float64(n), string(r), fam)
			}
		}
	}
	if sn.nerr == nil {
		ids := map[string]bool{}
		for _, g := range sn.gws {
			ids[g.ContainerID] = true
		}
		ch <- prometheus.MustNewConstMetric(descGateways, prometheus.GaugeValue, float64(len(ids)), string(sn.role))
	}
}

// metricsRegistry is the agent's registry: the node collector, the apply
// histogram, the Go runtime and the process (CPU, RSS).
func (in *Installer) metricsRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(&nodeCollector{in: in}, in.applySeconds,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// metricsLimits bound what /metrics clients can hold: the endpoint is
// unauthenticated and, with hostNetwork, on the node's addresses.
type metricsLimits struct {
	// MaxConns caps the connections served at once, PerIP those of one
	// remote address: a connection past either is closed as soon as it
	// is accepted (no goroutine, no buffer kept), so that one client's
	// idle connections neither grow the agent nor queue a scraper
	// from another address behind them.
	MaxConns, PerIP int
	// ReadHeader, Read, Write and Idle are the http.Server timeouts.
	ReadHeader, Read, Write, Idle time.Duration
	// InFlight caps the scrapes gathered at once (more get 503);
	// Gather bounds one (promhttp's Timeout, 503 past it).
	InFlight int
	Gather   time.Duration
}

var defaultMetricsLimits = metricsLimits{MaxConns: 64, PerIP: 8, ReadHeader: 5 * time.Second, Read: 10 * time.Second,
	Write: 30 * time.Second, Idle: 15 * time.Second, InFlight: 4, Gather: 20 * time.Second}

// serveMetrics serves reg at /metrics on l until ctx ends.
func serveMetrics(ctx context.Context, l net.Listener, reg *prometheus.Registry, lim metricsLimits) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError,
		MaxRequestsInFlight: lim.InFlight, Timeout: lim.Gather}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: lim.ReadHeader, ReadTimeout: lim.Read,
		WriteTimeout: lim.Write, IdleTimeout: lim.Idle, MaxHeaderBytes: 8 << 10}
	if lim.MaxConns > 0 {
		l = &capListener{Listener: l, total: lim.MaxConns, perIP: max(1, lim.PerIP), byIP: map[netip.Addr]int{}}
	}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// capListener accepts at most total connections at once, perIP of one
// remote address; it closes the others at once.
type capListener struct {
	net.Listener
	total, perIP int
	refused      atomic.Uint64

	mu   sync.Mutex
	n    int
	byIP map[netip.Addr]int
}

func (l *capListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		var ip netip.Addr
		if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
			ip = ap.Addr().Unmap()
		}
		l.mu.Lock()
		if l.n >= l.total || l.byIP[ip] >= l.perIP {
			l.mu.Unlock()
			l.refused.Add(1)
			c.Close()
			continue
		}
		l.n++
		l.byIP[ip]++
		l.mu.Unlock()
		return &capConn{Conn: c, l: l, ip: ip}, nil
	}
}

type capConn struct {
	net.Conn
	l    *capListener
	ip   netip.Addr
	once sync.Once
}

func (c *capConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		c.l.n--
		if c.l.byIP[c.ip]--; c.l.byIP[c.ip] <= 0 {
			delete(c.l.byIP, c.ip)
		}
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// startObservability starts, for Run, the metrics endpoint and the drop
// audit. Neither stops enforcement when it fails: each failure is
// logged.
func (in *Installer) startObservability(ctx context.Context) {
	reg := in.metricsRegistry()
	if in.opts.NodeConfig != "" && (in.opts.AuditOut != nil || in.opts.PodRetention > 0) {
		cfg, err := node.Load(in.opts.NodeConfig)
		if err != nil {
			in.log.Error("audit: not started", "error", err)
		} else {
			a, err := audit.New(audit.Options{NetNS: in.opts.NetNS, Group: cfg.AuditGroup, Node: in.opts.NodeName, StateDir: in.opts.StateDir,
				Out: in.opts.AuditOut, Dedup: in.opts.AuditDedup, PodRetention: in.opts.PodRetention, Registerer: reg, Logger: in.log})
			if err != nil {
				in.log.Error("audit: not started", "error", err)
			} else {
				in.auditor.Store(a)
				go func() {
					// Binding fails while another socket holds the group
					// (one reader per group and namespace): try again.
					for ctx.Err() == nil {
						err := a.Run(ctx)
						if err == nil {
							return
						}
						in.log.Error("audit stopped: drops are still counted by the kernel, but not logged; retrying in 5s", "error", err)
						select {
						case <-ctx.Done():
						case <-time.After(5 * time.Second):
						}
					}
				}()
			}
		}
	}
	if in.opts.MetricsAddr == "" {
		return
	}
	l, err := net.Listen("tcp", in.opts.MetricsAddr)
	if err != nil {
		in.log.Error("metrics: could not listen", "addr", in.opts.MetricsAddr, "error", err)
		return
	}
	in.log.Info("serving metrics", "addr", l.Addr().String(), "path", "/metrics")
	go func() {
		if err := serveMetrics(ctx, l, reg, defaultMetricsLimits); err != nil {
			in.log.Error("metrics endpoint stopped", "error", err)
		}
	}()
}

// AuditStats are the running audit's event counts (zero before Run
// starts it).
func (in *Installer) AuditStats() audit.Stats {
	if a := in.auditor.Load(); a != nil {
		return a.Stats()
	}
	return audit.Stats{}
}
