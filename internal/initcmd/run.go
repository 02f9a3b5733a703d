package initcmd

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Exit codes.
const (
	ExitOK    = 0
	ExitFail  = 1 // the kernel refused, or --check found drift
	ExitUsage = 2 // bad flags: nothing was applied
)

// Run is egress-init's main. args excludes the program name. The ruleset
// goes to stdout only for --dry-run; everything else is on stderr.
func Run(args []string, stdout, stderr io.Writer) int {
	inv, err := Parse(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return ExitOK
		}
		fmt.Fprintf(stderr, "egress-init: %v\n", err)
		return ExitUsage
	}
	if inv.Config.Mode == rules.ModeNone && inv.Action != ActionCleanup {
		fmt.Fprintln(stderr, "egress-init: interception mode NONE: no rules applied")
		return ExitOK
	}
	if err := run(inv, stdout, stderr); err != nil {
		fmt.Fprintf(stderr, "egress-init: %v\n", err)
		return ExitFail
	}
	return ExitOK
}

func run(inv *Invocation, stdout, stderr io.Writer) error {
	var rs *rules.Ruleset
	if inv.Action != ActionCleanup {
		var err error
		if rs, err = rules.Build(inv.Config); err != nil {
			return err
		}
	}
	if inv.Action == ActionDryRun {
		return dryRun(inv, rs, stdout, stderr)
	}
	return netns.Do(inv.NetNS, func() error {
		start := time.Now()
		if inv.Action == ActionCleanup {
			return cleanup(inv.Backend, stderr)
		}
		be, err := rules.NewBackend(inv.Backend, rules.BackendOptions{})
		if err != nil {
			return err
		}
		switch inv.Action {
		case ActionCheck:
			if err := be.Check(rs); err != nil {
				return err
			}
			fmt.Fprintf(stderr, "egress-init: backend=%s: rules match the desired state\n", be.Name())
			return nil
		default:
			if err := be.Apply(rs); err != nil {
				return fmt.Errorf("backend %s: could not apply rules: %w", be.Name(), err)
			}
			fmt.Fprintf(stderr, "egress-init: backend=%s applied in %s\n", be.Name(), time.Since(start).Round(time.Microsecond))
			if inv.Validate {
				if err := be.Check(rs); err != nil {
					return fmt.Errorf("validation after apply: %w", err)
				}
			}
			return nil
		}
	})
}

// dryRun prints the ruleset. "auto" is resolved in the target namespace
// when that is possible (it needs CAP_NET_ADMIN to list tables); if it is
// not, the dry run shows nftables, which is what auto picks on a clean
// namespace, and says so.
func dryRun(inv *Invocation, rs *rules.Ruleset, stdout, stderr io.Writer) error {
	name := inv.Backend
	if name == rules.BackendAuto {
		err := netns.Do(inv.NetNS, func() error {
			d, err := rules.Detect()
			name = d
			return err
		})
		if err != nil {
			name = rules.BackendNFTables
			fmt.Fprintf(stderr, "egress-init: could not detect the backend (%v); showing %s\n", err, name)
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
	fmt.Fprintf(stderr, "egress-init: dry run, backend=%s; nothing applied\n", be.Name())
	_, err = io.WriteString(stdout, text)
	return err
}

// cleanup removes our rules. With an explicit backend only that one is
// cleaned; with auto, every backend whose tools are present, since rules
// may have been written by another flavour before.
func cleanup(name rules.BackendName, stderr io.Writer) error {
	names := []rules.BackendName{name}
	if name == rules.BackendAuto {
		names = []rules.BackendName{rules.BackendNFTables, rules.BackendIPTablesNFT, rules.BackendIPTablesLegacy}
	}
	var errs []error
	for _, n := range names {
		be, err := rules.NewBackend(n, rules.BackendOptions{})
		if err == nil {
			err = be.Remove()
		}
		if err != nil {
			if name == rules.BackendAuto && rules.IsBinaryMissing(err) {
				fmt.Fprintf(stderr, "egress-init: skipping %s cleanup: %v\n", n, err)
				continue
			}
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
			continue
		}
		fmt.Fprintf(stderr, "egress-init: backend=%s: removed our rules\n", n)
	}
	return errors.Join(errs...)
}
