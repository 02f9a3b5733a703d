// Package initcmd is egress-init: a drop-in for istio-iptables in an init
// container. It takes istio-iptables' flags, builds the pod ruleset with
// pkg/rules and applies it with the chosen backend.
package initcmd

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Action is what a run does.
type Action int

const (
	ActionApply Action = iota
	ActionDryRun
	ActionCheck
	ActionCleanup
)

// Invocation is a parsed command line.
type Invocation struct {
	Action  Action
	Config  rules.Config
	Backend rules.BackendName
	NetNS   string
	// Validate runs Check after Apply (istio-iptables --run-validation).
	Validate bool
}

// strFlag records whether a string flag was given, so that "-x ”" (set
// to empty) differs from an absent -x (keep the default).
type strFlag struct {
	v   string
	set bool
}

func (s *strFlag) String() string     { return s.v }
func (s *strFlag) Set(v string) error { s.v, s.set = v, true; return nil }
func (s *strFlag) ptr() *string {
	if !s.set {
		return nil
	}
	return &s.v
}

// Parse parses istio-iptables-compatible arguments (without the program
// name). Every error names the flag and the value. Nothing is touched:
// the caller applies only after Parse succeeded.
func Parse(args []string, stderr io.Writer) (*Invocation, error) {
	fs := flag.NewFlagSet("egress-init", flag.ContinueOnError)
	fs.SetOutput(stderr)

	var (
		proxyPort, inboundPort, tunnelPort, uid, gid, mode   strFlag
		inclCIDR, exclCIDR, inclIn, exclIn, inclOut, exclOut strFlag
		exclIf, kubevirt, backend, families, dnsPort         strFlag
		netnsPath                                            string
		dryRun, cleanup, check, redirectDNS, captureAllDNS   bool
		dualStack, dropInvalid, runValidation                bool
	)
	// Each flag gets its istio-iptables short and long name.
	str := func(v *strFlag, short, long, usage string) {
		if short != "" {
			fs.Var(v, short, usage+" (same as --"+long+")")
		}
		fs.Var(v, long, usage)
	}
	boolean := func(v *bool, short, long, usage string) {
		if short != "" {
			fs.BoolVar(v, short, false, usage+" (same as --"+long+")")
		}
		fs.BoolVar(v, long, false, usage)
	}
	str(&proxyPort, "p", rules.FieldProxyPort, "port to which all outbound TCP is redirected (default 15001)")
	str(&inboundPort, "z", rules.FieldInboundPort, "port to which all inbound TCP is redirected (default 15006)")
	str(&tunnelPort, "e", rules.FieldInboundTunnelPort, "inbound tunnel (HBONE) port, never captured (default 15008)")
	str(&uid, "u", rules.FieldProxyUID, "comma-separated UIDs whose traffic is not captured (default 1337)")
	str(&gid, "g", rules.FieldProxyGID, "comma-separated GIDs whose traffic is not captured (default: the UIDs)")
	str(&mode, "m", rules.FieldMode, "inbound interception mode: REDIRECT (TPROXY is not supported yet)")
	str(&inclCIDR, "i", rules.FieldOutboundIncludeCIDRs, "comma-separated outbound CIDRs to capture, or '*' (default '*')")
	str(&exclCIDR, "x", rules.FieldOutboundExcludeCIDRs, "comma-separated outbound CIDRs never captured")
	str(&inclIn, "b", rules.FieldInboundIncludePorts, "comma-separated inbound ports to capture, or '*' (default '*')")
	str(&exclIn, "d", rules.FieldInboundExcludePorts, "comma-separated inbound ports never captured (default 15090,15021,15020)")
	str(&inclOut, "q", rules.FieldOutboundIncludePorts, "comma-separated outbound ports always captured")
	str(&exclOut, "o", rules.FieldOutboundExcludePorts, "comma-separated outbound ports never captured")
	str(&exclIf, "c", rules.FieldExcludeInterfaces, "comma-separated interfaces whose traffic is never captured")
	str(&kubevirt, "k", "kube-virt-interfaces", "comma-separated rerouted virtual interfaces (not supported yet; must be empty)")
	str(&dnsPort, "", rules.FieldDNSPort, "port DNS is redirected to with --redirect-dns (default 15053)")
	str(&families, "", rules.FieldFamilies, "IP families to program: ipv4, ipv6 or dual (default dual)")
	str(&backend, "", "backend", "auto, nftables, iptables-nft or iptables-legacy (default auto)")
	fs.StringVar(&netnsPath, "netns", "", "network namespace path to program (default: the namespace egress-init runs in)")
	boolean(&dryRun, "n", "dry-run", "print the ruleset in the backend's syntax and change nothing")
	boolean(&cleanup, "", "cleanup-only", "remove our rules and exit")
	boolean(&check, "", "check", "compare the live rules with the desired ones; exit 1 on drift")
	boolean(&redirectDNS, "", "redirect-dns", "capture DNS (udp and tcp port 53) to the DNS port")
	boolean(&captureAllDNS, "", "capture-all-dns", "accepted for compatibility: --redirect-dns always captures all DNS")
	boolean(&dualStack, "", "dual-stack", "accepted for compatibility: both families are programmed by default")
	boolean(&dropInvalid, "", "drop-invalid", "not supported yet; rejected if set")
	boolean(&runValidation, "", "run-validation", "run --check after applying")

	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if kubevirt.set && strings.TrimSpace(kubevirt.v) != "" {
		return nil, &rules.FieldError{Field: "kube-virt-interfaces", Value: kubevirt.v, Reason: "rerouting virtual interfaces is not supported yet"}
	}
	if dropInvalid {
		return nil, &rules.FieldError{Field: "drop-invalid", Value: "true", Reason: "dropping conntrack INVALID packets is not supported yet"}
	}
	n := 0
	for _, b := range []bool{dryRun, cleanup, check} {
		if b {
			n++
		}
	}
	if n > 1 {
		return nil, errors.New("--dry-run, --cleanup-only and --check are mutually exclusive")
	}

	inv := &Invocation{Backend: rules.BackendAuto, NetNS: netnsPath, Validate: runValidation}
	switch {
	case dryRun:
		inv.Action = ActionDryRun
	case cleanup:
		inv.Action = ActionCleanup
	case check:
		inv.Action = ActionCheck
	}
	if backend.set {
		b, err := rules.ParseBackendName("backend", backend.v)
		if err != nil {
			return nil, err
		}
		inv.Backend = b
	}
	cfg := rules.DefaultConfig()
	opts := rules.Options{
		ProxyPort:            proxyPort.ptr(),
		InboundPort:          inboundPort.ptr(),
		InboundTunnelPort:    tunnelPort.ptr(),
		ProxyUID:             uid.ptr(),
		ProxyGID:             gid.ptr(),
		Mode:                 mode.ptr(),
		OutboundIncludeCIDRs: inclCIDR.ptr(),
		OutboundExcludeCIDRs: exclCIDR.ptr(),
		InboundIncludePorts:  inclIn.ptr(),
		InboundExcludePorts:  exclIn.ptr(),
		OutboundIncludePorts: inclOut.ptr(),
		OutboundExcludePorts: exclOut.ptr(),
		ExcludeInterfaces:    exclIf.ptr(),
		DNSPort:              dnsPort.ptr(),
		Families:             families.ptr(),
	}
	if redirectDNS {
		opts.RedirectDNS = &redirectDNS
	}
	// istio-iptables defaults the GID list to the UID list.
	if uid.set && !gid.set {
		opts.ProxyGID = uid.ptr()
	}
	if err := cfg.ApplyOptions(opts); err != nil {
		return nil, err
	}
	// NONE means "no capture": Run reports it and applies nothing, so
	// there is nothing to validate. Cleanup needs no valid config either.
	if inv.Action != ActionCleanup && cfg.Mode != rules.ModeNone {
		if err := cfg.Validate(); err != nil {
			return nil, err
		}
	}
	inv.Config = cfg
	return inv, nil
}
