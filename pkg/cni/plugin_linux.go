package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Plugin implements the CNI commands. The zero value is not usable; use
// New. Fields are there so tests can inject a fake backend and capture
// stdout.
//
// There is no lock anywhere: every command works on one pod's namespace,
// and the kernel serialises nftables transactions per namespace. The only
// shared resource is the xtables lock of iptables-legacy, which
// iptables-restore --wait takes for the length of one apply.
type Plugin struct {
	// NewBackend resolves and constructs the backend of ADD and CHECK;
	// it is called inside the pod's namespace so that "auto" looks at
	// the pod's state. DEL and the CHECK of a pod we do not capture look
	// at every backend (RemoveAll, CheckNoneOurs below).
	NewBackend func(rules.BackendName, rules.BackendOptions) (rules.Backend, error)
	// Stdout receives the CNI result, and nothing else.
	Stdout io.Writer
	// Pods edits the node's per-pod sets (nodeEnforcement); nil means
	// pkg/node in the current namespace.
	Pods PodStore
	// HostSide finds a pod's host-side port and L3 interface; nil means
	// hostSide (netlink). Tests without namespaces inject one.
	HostSide func(nsPath, ifName string, prev types.Result) (port, l3, how string, err error)
	// NodeRules applies the node rules from a host config when they are
	// missing (nil: applyNodeRules); tests inject one.
	NodeRules func(path string) (applied bool, err error)
	// RemoveAll and CheckNoneOurs look at every backend, for DEL and
	// for the CHECK of a pod we do not capture (nil: rules.RemoveAll and
	// rules.CheckNoneOurs); tests give rules.Fake's.
	RemoveAll     func(context.Context) ([]rules.BackendName, error)
	CheckNoneOurs func(context.Context) error
	// Context bounds the backends' work (nil: context.Background()).
	// skel's callbacks take none, so the plugin holds it; cmd/egress-cni
	// cancels it on SIGTERM, which stops an iptables binary rather than
	// leave the runtime to kill the plugin in the middle of it.
	Context context.Context
}

// ctx is the context the commands run under.
func (p *Plugin) ctx() context.Context {
	if p.Context == nil {
		return context.Background()
	}
	return p.Context
}

// New returns the plugin wired to the real backends and os.Stdout.
func New() *Plugin {
	return &Plugin{NewBackend: rules.NewBackend, Stdout: os.Stdout}
}

// Funcs returns the commands for skel.PluginMainFuncs.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check, Status: p.Status, GC: p.GC}
}

// invocation bundles what every command starts with.
type invocation struct {
	s     *Settings
	pod   Pod
	log   *slog.Logger
	close func()
	start time.Time
}

func (p *Plugin) begin(cmd string, args *skel.CmdArgs) (*invocation, error) {
	inv := &invocation{start: time.Now(), pod: ParseArgs(args.Args)}
	s, err := ParseConfig(args.StdinData)
	inv.s = s
	inv.log, inv.close = openLog(s, args.StdinData)
	inv.log = inv.log.With("cmd", cmd, "pod", inv.pod.String(), "containerID", args.ContainerID,
		"netns", args.Netns, "ifname", args.IfName)
	return inv, err
}

// end logs a failure and converts err for skel.
func (inv *invocation) end(err error) error {
	if err != nil {
		inv.log.Error("failed", "err", err.Error(), "code", Code(err), "duration", time.Since(inv.start))
	}
	inv.close()
	return toCNIError(err)
}

// Add programs the pod's capture rules and passes prevResult through.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	inv, err := p.begin("ADD", args)
	if err != nil {
		return inv.end(err)
	}
	return inv.end(p.add(inv, args))
}

func (p *Plugin) add(inv *invocation, args *skel.CmdArgs) error {
	s := inv.s
	if s.Conf.PrevResult == nil {
		return withCode(types.ErrInvalidNetworkConfig, errors.New(
			"missing prevResult: egress-cni is a chained plugin and must follow a primary plugin (bridge, Calico, …) in a conflist"), "")
	}
	// Decide and build before touching anything: a bad annotation
	// leaves the namespace as the primary plugin made it.
	dec, err := Decide(s, inv.pod, s.Annotations)
	if err != nil {
		return err
	}
	backend := ""
	if dec.Capture {
		backend, err = p.apply(inv.pod, args.Netns, s.Backend, dec.Ruleset, hasIPv6(s.Conf.PrevResult))
		if err != nil {
			// Fail closed: the runtime tears the sandbox down.
			return err
		}
	}
	if s.NodeEnforcement {
		// After the pod rules: a gateway is exempted only once its
		// own capture (if any) is in place.
		if err := p.registerPod(inv, args); err != nil {
			return err
		}
	}
	if err := p.print(s.Conf.PrevResult, s.Conf.CNIVersion); err != nil {
		return withCode(types.ErrIOFailure, fmt.Errorf("could not print result: %w", err), "")
	}
	inv.log.Info("ADD done", "decision", decisionWord(dec), "reason", dec.Reason, "backend", backend,
		"overrides", dec.Overrides, "annotationsDelivered", s.Annotations != nil,
		"duration", time.Since(inv.start), "durationMs", float64(time.Since(inv.start).Microseconds())/1000)
	return nil
}

func decisionWord(d Decision) string {
	if d.Capture {
		return "captured"
	}
	return "skipped"
}

// apply resolves the backend inside the namespace and applies rs there;
// for a pod with an IPv6 address whose IPv6 is captured it also puts
// Envoy's IPv6 passthrough source (::6) on lo, and in TPROXY mode it
// writes the policy route, as istio-cni does.
func (p *Plugin) apply(pod Pod, path string, name rules.BackendName, rs *rules.Ruleset, v6Pod bool) (string, error) {
	var used string
	err := netns.Do(path, func() error {
		b, err := p.NewBackend(name, rules.BackendOptions{})
		if err != nil {
			return err
		}
		used = string(b.Name())
		if err := b.Apply(p.ctx(), rs); err != nil {
			return err
		}
		if v6Pod && rs.Families.HasV6() {
			if err := rules.AddIPv6Passthrough(); err != nil {
				return err
			}
		}
		if rs.TProxyRoute != nil {
			// TPROXY: the policy route that delivers marked packets to
			// the proxy's transparent socket, as istio-cni writes it.
			return rules.ApplyTProxyRoute(rs.TProxyRoute, rs.Families)
		}
		return nil
	})
	if err == nil {
		return used, nil
	}
	who := podOrNetns(pod, path)
	switch {
	case netns.IsNotExist(err):
		return used, withCode(types.ErrUnknownContainer,
			fmt.Errorf("%s: cannot program capture rules: %w", who, err), "")
	case rules.IsBinaryMissing(err):
		return used, withCode(types.ErrPluginNotAvailable,
			fmt.Errorf("%s: cannot program capture rules with backend %s: %w", who, name, err), "")
	}
	return used, fmt.Errorf("%s: could not apply capture rules (backend %s): %w", who, orName(used, name), err)
}

func orName(used string, name rules.BackendName) string {
	if used != "" {
		return used
	}
	return string(name)
}

func podOrNetns(pod Pod, path string) string {
	if s := pod.String(); s != "" {
		return "pod " + s
	}
	return "netns " + path
}

func (p *Plugin) print(res types.Result, cniVersion string) error {
	r, err := res.GetAsVersion(cniVersion)
	if err != nil {
		return err
	}
	return r.PrintTo(p.Stdout)
}

// Del removes everything we own from the pod's namespace, whatever the
// backend that wrote it. It succeeds when there is nothing to do: no
// namespace path (containerd sends CNI_NETNS="" on rmp), a namespace
// that is gone, or no rules. A config that does not parse does not stop
// it: removal needs no config.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	inv, err := p.begin("DEL", args)
	if err != nil {
		inv.log.Warn("config did not parse; removing rules anyway", "err", err.Error())
	}
	// Gateway entries live in the host namespace and are found by
	// container ID: no prevResult or pod namespace needed. A config that
	// does not parse cannot say nodeEnforcement; GC collects those.
	var gwErr error
	if err == nil && inv.s.NodeEnforcement {
		gwErr = p.unregisterPod(inv, args.ContainerID)
	}
	if args.Netns == "" {
		inv.log.Info("DEL done", "result", "no network namespace given, nothing to remove", "duration", time.Since(inv.start))
		return inv.end(gwErr)
	}
	// A TPROXY pod's policy route, for the mark and table its ADD used
	// (as far as the config and annotations still say; the namespace
	// usually goes right after DEL, and the route with it).
	// Only a TPROXY config or annotation builds the decision: DEL of any
	// other pod does no model work.
	var tproxy *rules.TProxyRoute
	if err == nil && (inv.s.Base.Mode == rules.ModeTPROXY || strings.EqualFold(strings.TrimSpace(inv.s.Annotations[AnnotationInterceptionMode]), string(rules.ModeTPROXY))) {
		if dec, derr := Decide(inv.s, inv.pod, inv.s.Annotations); derr == nil && dec.Ruleset != nil {
			tproxy = dec.Ruleset.TProxyRoute
		}
	}
	var removed []rules.BackendName
	err = netns.Do(args.Netns, func() error {
		var e error
		removeAll := p.RemoveAll
		if removeAll == nil {
			removeAll = rules.RemoveAll
		}
		removed, e = removeAll(p.ctx())
		e = errors.Join(e, rules.RemoveIPv6Passthrough())
		if tproxy != nil {
			e = errors.Join(e, rules.RemoveTProxyRoute(tproxy))
		}
		return e
	})
	if netns.IsNotExist(err) {
		inv.log.Info("DEL done", "result", "network namespace is gone, nothing to remove", "duration", time.Since(inv.start))
		return inv.end(gwErr)
	}
	if err != nil {
		return inv.end(errors.Join(fmt.Errorf("%s: could not remove capture rules: %w", podOrNetns(inv.pod, args.Netns), err), gwErr))
	}
	inv.log.Info("DEL done", "backends", removed, "duration", time.Since(inv.start))
	return inv.end(gwErr)
}

// Check verifies that the namespace holds exactly what ADD would program
// now. For a pod we do not capture, it verifies that nothing of ours is
// there.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	inv, err := p.begin("CHECK", args)
	if err != nil {
		return inv.end(err)
	}
	return inv.end(p.check(inv, args))
}

func (p *Plugin) check(inv *invocation, args *skel.CmdArgs) error {
	s := inv.s
	if s.Conf.PrevResult == nil {
		return withCode(types.ErrInvalidNetworkConfig, errors.New("missing prevResult: CHECK needs the chain's result"), "")
	}
	dec, err := Decide(s, inv.pod, s.Annotations)
	if err != nil {
		return err
	}
	who := podOrNetns(inv.pod, args.Netns)
	var backend string
	err = netns.Do(args.Netns, func() error {
		if !dec.Capture {
			if p.CheckNoneOurs != nil {
				return p.CheckNoneOurs(p.ctx())
			}
			return rules.CheckNoneOurs(p.ctx())
		}
		b, err := p.NewBackend(s.Backend, rules.BackendOptions{})
		if err != nil {
			return err
		}
		backend = string(b.Name())
		if err := b.Check(p.ctx(), dec.Ruleset); err != nil {
			return err
		}
		if dec.Ruleset.TProxyRoute != nil {
			return rules.CheckTProxyRoute(dec.Ruleset.TProxyRoute, dec.Ruleset.Families)
		}
		return nil
	})
	if err == nil && s.NodeEnforcement {
		if err := p.checkRegistration(inv, args); err != nil {
			return err
		}
	}
	switch {
	case err == nil:
		inv.log.Info("CHECK done", "decision", decisionWord(dec), "reason", dec.Reason, "backend", backend, "duration", time.Since(inv.start))
		return nil
	case netns.IsNotExist(err):
		return withCode(types.ErrUnknownContainer, fmt.Errorf("%s: %w", who, err), "")
	case rules.IsDrift(err) && dec.Capture:
		return fmt.Errorf("%s: capture rules differ from what ADD programs (backend %s): %w", who, backend, err)
	case rules.IsDrift(err):
		return fmt.Errorf("%s is not captured (%s) but holds egress-cni rules: %w", who, dec.Reason, err)
	}
	return fmt.Errorf("%s: could not check capture rules (backend %s): %w", who, orName(backend, s.Backend), err)
}

// Status reports whether the plugin can work on this node: the configured
// backend's kernel interface or binaries are there. It only reads.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	inv, err := p.begin("STATUS", args)
	if err != nil {
		return inv.end(err)
	}
	return inv.end(status(inv.s.Backend))
}

func status(name rules.BackendName) error {
	if err := rules.Available(name); err != nil {
		return withCode(types.ErrPluginNotAvailable, err, "")
	}
	return nil
}

// GC collects what is node-wide: with nodeEnforcement, the gateway
// entries of containers that are not among cni.dev/valid-attachments.
// Per-pod rules live in the pod's network namespace and die with it.
func (p *Plugin) GC(args *skel.CmdArgs) error {
	inv, err := p.begin("GC", args)
	if err != nil {
		return inv.end(err)
	}
	if !inv.s.NodeEnforcement {
		inv.log.Debug("GC: nothing to collect; per-pod rules die with their namespace")
		return inv.end(nil)
	}
	// Only a GC that lists the valid attachments may collect: an absent
	// key is not "no pods".
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(args.StdinData, &keys); err != nil {
		return inv.end(withCode(types.ErrDecodingFailure, fmt.Errorf("could not parse GC config: %w", err), ""))
	}
	if _, ok := keys["cni.dev/valid-attachments"]; !ok {
		inv.log.Warn("GC without cni.dev/valid-attachments: node registrations left alone")
		return inv.end(nil)
	}
	return inv.end(p.gcRegistrations(inv, inv.s.Conf.ValidAttachments))
}
