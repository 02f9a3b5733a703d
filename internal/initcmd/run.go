package initcmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Exit codes.
const (
	ExitOK    = 0
	ExitFail  = 1 // the kernel refused, or --check found drift
	ExitUsage = 2 // bad flags: nothing was applied
	// ExitValidation (126): --run-validation found no capture.
)

// Run is egress-init's main. args excludes the program name. The ruleset
// goes to stdout only for --dry-run; logs go to stderr unless
// --log_target says otherwise. Cancelling ctx (egress-init's main
// cancels it on SIGTERM and SIGINT) stops a backend's binaries and the
// validation probe; a backend never leaves half its rules (see
// rules.Backend).
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	inv, err := Parse(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return ExitOK
		}
		fmt.Fprintf(stderr, "egress-init: %v\n", err)
		return ExitUsage
	}
	log, closers, err := inv.Log.logger(stdout, stderr)
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	if err != nil {
		fmt.Fprintf(stderr, "egress-init: %v\n", err)
		return ExitUsage
	}
	if inv.Config.Mode == rules.ModeNone && inv.Action != ActionCleanup {
		log.Info("interception mode NONE: no rules applied")
		return ExitOK
	}
	if err := run(ctx, inv, stdout, log); err != nil {
		log.Error(err.Error())
		if errors.Is(err, errValidation) {
			return ExitValidation
		}
		return ExitFail
	}
	return ExitOK
}

func run(ctx context.Context, inv *Invocation, stdout io.Writer, log *slog.Logger) error {
	var rs *rules.Ruleset
	if inv.Action != ActionCleanup && !(inv.Action == ActionApply && inv.SkipRuleApply) {
		var err error
		if rs, err = rules.Build(inv.Config); err != nil {
			return err
		}
	}
	if inv.Action == ActionDryRun {
		return dryRun(inv, rs, stdout, log)
	}
	return netns.Do(inv.NetNS, func() error {
		start := time.Now()
		if inv.Action == ActionCleanup {
			// The TPROXY route of the mark and table given (or the
			// defaults, 1337 and 133), whatever the mode.
			err := rules.RemoveTProxyRoute(&rules.TProxyRoute{Mark: inv.Config.TProxyMark, Table: inv.Config.TProxyRouteTable})
			return errors.Join(cleanup(ctx, inv.Backend, log), err)
		}
		if inv.Action == ActionApply && inv.SkipRuleApply {
			log.Info("--skip-rule-apply: no rules applied")
			return validate(ctx, inv, log)
		}
		be, err := rules.NewBackend(inv.Backend, rules.BackendOptions{})
		if err != nil {
			return err
		}
		switch inv.Action {
		case ActionCheck:
			if err := be.Check(ctx, rs); err != nil {
				return err
			}
			if rs.TProxyRoute != nil {
				if err := rules.CheckTProxyRoute(rs.TProxyRoute, rs.Families); err != nil {
					return err
				}
			}
			log.Info(fmt.Sprintf("backend=%s: rules match the desired state", be.Name()))
			return nil
		default:
			if err := be.Apply(ctx, rs); err != nil {
				return fmt.Errorf("backend %s: could not apply rules: %w", be.Name(), err)
			}
			log.Info(fmt.Sprintf("backend=%s applied in %s", be.Name(), time.Since(start).Round(time.Microsecond)))
			if inv.Config.Families.HasV6() {
				if err := rules.AddIPv6Passthrough(); err != nil {
					return err
				}
			}
			if rs.TProxyRoute != nil {
				if err := rules.ApplyTProxyRoute(rs.TProxyRoute, rs.Families); err != nil {
					return err
				}
			}
			return validate(ctx, inv, log)
		}
	})
}

// validate runs Istio's validation probe when --run-validation is set.
func validate(ctx context.Context, inv *Invocation, log *slog.Logger) error {
	if !inv.Validate {
		return nil
	}
	p := &probe{
		v6:        hostIsIPv6(),
		ports:     []uint16{inv.Config.ProxyPort, inv.Config.InboundPort},
		probePort: inv.ProbePort,
		timeout:   inv.ProbeTimeout,
		log:       log,
	}
	return p.run(ctx)
}

// dryRun prints the ruleset. "auto" is resolved in the target namespace
// when that is possible (it needs CAP_NET_ADMIN to list tables); if it is
// not, the dry run shows nftables, which is what auto picks on a clean
// namespace, and says so.
func dryRun(inv *Invocation, rs *rules.Ruleset, stdout io.Writer, log *slog.Logger) error {
	name := inv.Backend
	if name == rules.BackendAuto {
		err := netns.Do(inv.NetNS, func() error {
			d, err := rules.Detect()
			name = d
			return err
		})
		if err != nil {
			name = rules.BackendNFTables
			log.Info(fmt.Sprintf("could not detect the backend (%v); showing %s", err, name))
		}
	}
	be, err := rules.NewBackend(name, rules.BackendOptions{})
	if err != nil {
		return err
	}
	text, err := be.Render(rs)
	if err != nil {
		return err
	}
	log.Info(fmt.Sprintf("dry run, backend=%s; nothing applied", be.Name()))
	_, err = io.WriteString(stdout, text)
	return err
}

// cleanup removes our rules. With an explicit backend only that one is
// cleaned; with auto, every backend that may hold rules of ours
// (rules.RemoveAll), since rules may have been written by another
// flavour before.
func cleanup(ctx context.Context, name rules.BackendName, log *slog.Logger) error {
	if name != rules.BackendAuto {
		be, err := rules.NewBackend(name, rules.BackendOptions{})
		if err == nil {
			err = be.Remove(ctx)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		log.Info(fmt.Sprintf("backend=%s: removed our rules", name))
		return nil
	}
	ran, err := rules.RemoveAll(ctx)
	for _, n := range ran {
		log.Info(fmt.Sprintf("backend=%s: removed our rules", n))
	}
	if len(ran) == 0 && err == nil {
		log.Info("no rules of ours to remove")
	}
	return err
}
