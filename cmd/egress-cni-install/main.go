// Command egress-cni-install is what the egress-cni DaemonSet runs on
// every node: it installs the plugin binary and our entry in the node's
// CNI config, keeps the entry in place while the primary CNI rewrites its
// config, applies the node rules, and uninstalls on request.
//
//	egress-cni-install [run] [flags]   install, then watch (default)
//	egress-cni-install install [flags] install once and exit
//	egress-cni-install uninstall [flags]
//	egress-cni-install ready [-ready-file F]   exit 0 while our entry is in place (readiness probe)
//
// All logic is in pkg/install.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/egress-cni/egress-cni/pkg/audit"
	"github.com/egress-cni/egress-cni/pkg/install"
)

func main() {
	cmd, args := "run", os.Args[1:]
	if len(args) > 0 && args[0] != "" && args[0][0] != '-' {
		cmd, args = args[0], args[1:]
	}
	os.Exit(run(cmd, args))
}

func run(cmd string, args []string) int {
	fs := flag.NewFlagSet("egress-cni-install "+cmd, flag.ContinueOnError)
	var o install.Options
	fs.StringVar(&o.ConfDir, "cni-conf-dir", install.DefaultConfDir, "host CNI config directory")
	fs.StringVar(&o.ConfFile, "cni-conf-file", "", "config file to edit (a name in -cni-conf-dir); default: the lexically first valid one, as the runtime picks")
	fs.StringVar(&o.BinDir, "cni-bin-dir", install.DefaultBinDir, "host CNI bin directory")
	fs.StringVar(&o.BinarySource, "binary", install.DefaultBinary, `plugin binary to copy into -cni-bin-dir ("" copies none)`)
	pluginCfg := fs.String("plugin-config", "", `our conflist entry, JSON (default {"type":"egress-cni"}); the pod-annotations capability is added`)
	fs.StringVar(&o.NodeConfig, "node-config", "", "node rules config (JSON, see docs/install.md); empty applies none")
	fs.StringVar(&o.NodeConfigCopy, "node-config-copy", "", `keep a copy of -node-config here (a host path as mounted), for the plugin's "nodeConfig" key: the first ADD after a reboot applies the node rules from it`)
	fs.StringVar(&o.NetNS, "netns", "", "network namespace for the node rules (default: the current one)")
	fs.StringVar(&o.NetNSDir, "netns-dir", install.DefaultNetNSDir, `where the runtime pins pod network namespaces; scanned for macvlan, ipvlan and SR-IOV attachments, which bypass the node rules ("" scans none)`)
	fs.StringVar(&o.LockFile, "lock-file", install.DefaultLockFile, "lock file shared by the installers of this node")
	fs.StringVar(&o.ReadyFile, "ready-file", install.DefaultReadyFile, "file that exists only while our entry is in place")
	fs.DurationVar(&o.Resync, "resync", install.DefaultResync, "period of a full check besides the file watcher")
	health := fs.String("health-addr", "", "serve /readyz and /healthz here (e.g. 127.0.0.1:9881); empty: none")
	metricsPort := fs.Int("metrics-port", install.DefaultMetricsPort, "run: serve Prometheus metrics on this port, at /metrics (0: none)")
	metricsBind := fs.String("metrics-bind", "", "run: the address to serve metrics on (e.g. the node's IP from the downward API's status.hostIP); empty: all addresses")
	auditLog := fs.String("audit-log", "-", `run: write the drop audit (one JSON line per connection attempt) here: "-" is stdout, "" none`)
	fs.StringVar(&o.StateDir, "state-dir", install.DefaultStateDir, `run: the plugin's "stateDir" as mounted here (pod identity records, which name the pod of a drop)`)
	fs.StringVar(&o.NodeName, "node-name", os.Getenv("NODE_NAME"), "run: the node's name in the audit (default $NODE_NAME, else the host name)")
	fs.DurationVar(&o.AuditDedup, "audit-dedup", audit.DefaultDedup, "run: repeats of a connection attempt within this window are not logged again (0: log every event)")
	fs.DurationVar(&o.PodRetention, "pod-metrics-retention", audit.DefaultPodRetention, "run: keep a gone pod's egress_cni_pod_dropped_packets_total series this long (0: no per-pod series)")
	uninstallOnExit := fs.Bool("uninstall-on-exit", false, "uninstall on SIGTERM/SIGINT (also during DaemonSet updates: pods started meanwhile are not captured)")
	keepNodeRules := fs.Bool("keep-node-rules", false, "uninstall: leave the node rules in place")
	verbose := fs.Bool("v", false, "debug logging")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	addr, err := metricsAddr(*metricsBind, *metricsPort)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	o.MetricsAddr = addr
	if o.NodeName == "" {
		o.NodeName, _ = os.Hostname()
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	o.Logger = log
	o.RemoveNodeRules = !*keepNodeRules

	if cmd == "ready" {
		if _, err := os.Stat(o.ReadyFile); err != nil {
			fmt.Fprintf(os.Stderr, "not ready: %v\n", err)
			return 1
		}
		return 0
	}
	if *pluginCfg != "" {
		b, err := os.ReadFile(*pluginCfg)
		if err != nil {
			log.Error("could not read plugin config", "error", err)
			return 2
		}
		o.Entry = b
	}
	if cmd == "run" && *auditLog != "" {
		if *auditLog == "-" {
			o.AuditOut = os.Stdout
		} else {
			f, err := os.OpenFile(*auditLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
			if err != nil {
				log.Error("could not open the audit log", "file", *auditLog, "error", err)
				return 2
			}
			defer f.Close()
			o.AuditOut = f
		}
	}
	in, err := install.New(o)
	if err != nil {
		log.Error("invalid configuration", "error", err)
		return 2
	}
	switch cmd {
	case "install":
		// Node rules first, as Run does: with nodeEnforcement a gateway's
		// ADD fails until they exist.
		if err := in.ApplyNodeRules(); err != nil {
			log.Error("node rules", "error", err)
			return 1
		}
		res, err := in.Install()
		if err != nil {
			log.Error("install failed", "error", err)
			return 1
		}
		log.Info("installed", "file", res.File, "action", res.Action, "binary", res.Binary)
		return 0
	case "uninstall":
		if err := in.Uninstall(); err != nil {
			log.Error("uninstall incomplete", "error", err)
			return 1
		}
		log.Info("uninstalled")
		return 0
	case "run":
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q: want run, install, uninstall or ready\n", cmd)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if *health != "" {
		go func() {
			if err := in.ServeHealth(ctx, *health); err != nil {
				log.Error("health endpoint", "error", err)
			}
		}()
	}
	log.Info("starting", "confDir", o.ConfDir, "binDir", o.BinDir, "entry", string(in.Entry()), "nodeConfig", o.NodeConfig)
	err = in.Run(ctx)
	if err != nil {
		log.Error("stopped", "error", err)
	}
	if *uninstallOnExit && ctx.Err() != nil {
		start := time.Now()
		if err := in.Uninstall(); err != nil {
			log.Error("uninstall on exit incomplete", "error", err)
			return 1
		}
		log.Info("uninstalled on exit", "took", time.Since(start))
	}
	if err != nil {
		return 1
	}
	return 0
}

// metricsAddr is the metrics listen address of -metrics-bind and
// -metrics-port ("" for port 0: none).
func metricsAddr(bind string, port int) (string, error) {
	if port < 0 || port > 65535 {
		return "", fmt.Errorf("-metrics-port %d: want a TCP port, 0-65535 (0: none)", port)
	}
	if bind != "" {
		if _, err := netip.ParseAddr(bind); err != nil {
			return "", fmt.Errorf("-metrics-bind %q: want an IP address (empty: all)", bind)
		}
	}
	if port == 0 {
		return "", nil
	}
	return net.JoinHostPort(bind, strconv.Itoa(port)), nil
}
