package install

import (
	"context"
	"errors"
	"net"
	"net/http"
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
		"Pods with an attachment that bypasses the host's IP stack (macvlan, ipvlan, SR-IOV), found by the last scan.", nil, nil)
)

func newApplySeconds() prometheus.Histogram {
	return prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "egress_cni_node_rules_apply_seconds",
		Help:    "Time to apply the node rules (one netlink batch).",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
	})
}

// nodeCollector reads the node state at every scrape.
type nodeCollector struct{ in *Installer }

func (c nodeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descNodeDropped, descGateways, descInSync, descRepairs, descUnenforceable} {
		ch <- d
	}
}

func (c nodeCollector) Collect(ch chan<- prometheus.Metric) {
	in := c.in
	ch <- prometheus.MustNewConstMetric(descRepairs, prometheus.CounterValue, float64(in.repairs.Load()))
	ch <- prometheus.MustNewConstMetric(descUnenforceable, prometheus.GaugeValue, float64(in.unenforceable.Load()))
	if in.opts.NodeConfig == "" {
		return
	}
	cfg, err := node.Load(in.opts.NodeConfig)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descInSync, err)
		return
	}
	var (
		k     node.Counters
		gws   []node.Gateway
		drift error
		kerr  error
	)
	nerr := netns.Do(in.opts.NetNS, func() error {
		drift = node.Check(cfg)
		k, kerr = node.ReadCounters()
		if cfg.Role == node.RoleEgress {
			gws, err = node.ListGateways()
			return err
		}
		return nil
	})
	inSync := 1.0
	if drift != nil {
		inSync = 0
	}
	ch <- prometheus.MustNewConstMetric(descInSync, prometheus.GaugeValue, inSync)
	if kerr == nil {
		for _, r := range node.Reasons() {
			for fam, n := range k.ByReason[r] {
				ch <- prometheus.MustNewConstMetric(descNodeDropped, prometheus.CounterValue, float64(n), string(r), fam)
			}
		}
	}
	if nerr == nil {
		ids := map[string]bool{}
		for _, g := range gws {
			ids[g.ContainerID] = true
		}
		ch <- prometheus.MustNewConstMetric(descGateways, prometheus.GaugeValue, float64(len(ids)), string(cfg.Role))
	}
}

// metricsRegistry is the agent's registry: the node collector, the apply
// histogram, the Go runtime and the process (CPU, RSS).
func (in *Installer) metricsRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(nodeCollector{in}, in.applySeconds,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// serveMetrics serves reg at /metrics on l until ctx ends.
func serveMetrics(ctx context.Context, l net.Listener, reg *prometheus.Registry) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
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
		if err := serveMetrics(ctx, l, reg); err != nil {
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
