package cni

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/google/nftables"

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
	// NewBackend resolves and constructs a backend; it is called inside
	// the pod's namespace so that "auto" looks at the pod's state.
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
		backend, err = p.apply(inv.pod, args.Netns, s.Backend, dec.Ruleset)
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

// apply resolves the backend inside the namespace and applies rs there.
func (p *Plugin) apply(pod Pod, path string, name rules.BackendName, rs *rules.Ruleset) (string, error) {
	var used string
	err := netns.Do(path, func() error {
		b, err := p.NewBackend(name, rules.BackendOptions{})
		if err != nil {
			return err
		}
		used = string(b.Name())
		return b.Apply(rs)
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
	var removed []string
	err = netns.Do(args.Netns, func() error {
		var e error
		removed, e = p.removeAll(probeState())
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

// removeAll runs every backend's Remove in the current namespace and
// joins their errors. iptables flavours run only where their tables
// exist, so DEL never creates state (running iptables-legacy would
// register legacy tables in the namespace), and are skipped when their
// binaries are not installed. st is what probeState found.
func (p *Plugin) removeAll(st nsState) ([]string, error) {
	var errs []error
	var ran []string
	for _, name := range []rules.BackendName{rules.BackendNFTables, rules.BackendIPTablesNFT, rules.BackendIPTablesLegacy} {
		switch name {
		case rules.BackendIPTablesNFT:
			if !st.iptNFTNat {
				continue
			}
		case rules.BackendIPTablesLegacy:
			if !st.legacyTables {
				continue
			}
		}
		b, err := p.NewBackend(name, rules.BackendOptions{})
		if err == nil {
			err = b.Remove()
		}
		if rules.IsBinaryMissing(err) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
			continue
		}
		ran = append(ran, string(name))
	}
	return ran, errors.Join(errs...)
}

// nsState is what the namespace holds, read without running any binary.
type nsState struct {
	nftTable     bool // our egress_cni table, in any family
	iptNFTNat    bool // an ip or ip6 "nat" table (iptables-nft)
	legacyTables bool // legacy xtables registered
	err          error
}

func probeState() nsState {
	var st nsState
	st.legacyTables = legacyTablesInUse()
	conn, err := nftables.New()
	if err != nil {
		// Without nftables there is nothing of ours in it either; let
		// the backends report their own errors.
		st.err = err
		st.nftTable, st.iptNFTNat = true, true
		return st
	}
	defer conn.CloseLasting()
	tables, err := conn.ListTables()
	if err != nil {
		st.err = err
		st.nftTable, st.iptNFTNat = true, true
		return st
	}
	for _, t := range tables {
		switch {
		case t.Name == rules.NFTTable:
			st.nftTable = true
		case t.Name == "nat" && (t.Family == nftables.TableFamilyIPv4 || t.Family == nftables.TableFamilyIPv6):
			st.iptNFTNat = true
		}
	}
	return st
}

// legacyTablesInUse reads /proc/thread-self (not /proc/self: only the
// locked thread is in the pod's namespace).
func legacyTablesInUse() bool {
	for _, f := range []string{"ip_tables_names", "ip6_tables_names"} {
		fh, err := os.Open("/proc/thread-self/net/" + f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		found := false
		for sc.Scan() {
			if strings.TrimSpace(sc.Text()) != "" {
				found = true
			}
		}
		fh.Close()
		if found {
			return true
		}
	}
	return false
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
			return checkNothingOurs()
		}
		b, err := p.NewBackend(s.Backend, rules.BackendOptions{})
		if err != nil {
			return err
		}
		backend = string(b.Name())
		return b.Check(dec.Ruleset)
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

// checkNothingOurs returns a *rules.DriftError listing what of ours is in
// the current namespace.
func checkNothingOurs() error {
	st := probeState()
	if st.err != nil {
		return fmt.Errorf("could not list nftables tables: %w", st.err)
	}
	d := &rules.DriftError{Backend: "any"}
	if st.nftTable {
		d.Extra = append(d.Extra, "table "+rules.NFTTable)
	}
	type flavour struct {
		in   bool
		bins []string
	}
	for _, f := range []flavour{
		{st.iptNFTNat, []string{"iptables-nft-save", "ip6tables-nft-save"}},
		{st.legacyTables, []string{"iptables-legacy-save", "ip6tables-legacy-save"}},
	} {
		if !f.in {
			continue
		}
		for _, bin := range f.bins {
			path, err := findBinary(bin)
			if err != nil {
				continue
			}
			out, err := exec.Command(path, "-t", "nat").Output()
			if err != nil {
				// No nat table for this family: nothing of ours.
				continue
			}
			for _, l := range strings.Split(string(out), "\n") {
				if strings.Contains(l, "--comment "+rules.Comment) || strings.Contains(l, `--comment "`+rules.Comment) {
					d.Extra = append(d.Extra, bin+": "+l)
				}
			}
		}
	}
	if len(d.Extra) > 0 {
		return d
	}
	return nil
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
	var bins []string
	switch name {
	case rules.BackendIPTablesNFT:
		bins = []string{"iptables-nft-restore", "ip6tables-nft-restore"}
	case rules.BackendIPTablesLegacy:
		bins = []string{"iptables-legacy-restore", "ip6tables-legacy-restore"}
	default:
		conn, err := nftables.New()
		if err != nil {
			return withCode(types.ErrPluginNotAvailable, fmt.Errorf("nftables netlink is not usable: %w", err), "")
		}
		defer conn.CloseLasting()
		if _, err := conn.ListTables(); err != nil {
			return withCode(types.ErrPluginNotAvailable, fmt.Errorf("nftables netlink is not usable: %w", err), "")
		}
		return nil
	}
	for _, b := range bins {
		if _, err := findBinary(b); err != nil {
			return withCode(types.ErrPluginNotAvailable, fmt.Errorf("backend %s needs %s: %w", name, b, err), "")
		}
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

// findBinary looks in PATH, then in the sbin directories, as the
// iptables backend does: a plugin runs with the runtime's environment,
// whose PATH may lack them.
func findBinary(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH or sbin directories", name)
}
