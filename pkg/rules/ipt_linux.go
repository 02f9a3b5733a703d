package rules

// The iptables backend, in its two flavours (iptables-nft and
// iptables-legacy). It drives the *-save and *-restore binaries rather
// than go-iptables: one restore per family replaces everything we own in
// the nat table atomically (the kernel gets a single table replacement,
// or a single nftables batch), where go-iptables would run one process
// per rule and leave partial state behind on failure.
//
// What we own in the nat table of each family:
//   - the chains ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_OUTPUT and
//     ISTIO_REDIRECT (Istio's names, so tools and runbooks that know
//     Istio keep working);
//   - "entry rules" in PREROUTING and OUTPUT: rules that carry
//     "-m comment --comment egress-cni", or that jump to one of our
//     chains. The second clause takes over the rules istio-iptables
//     wrote, so switching to egress-cni never leaves duplicates.
//
// Apply: save, then one "restore --noflush" that declares our chains
// (which flushes them), deletes the old entry rules, and appends the new
// ones and every chain rule; nothing when the family already holds
// exactly the desired rules. Remove: the same with -X and no new rules.
// Nothing else in the table is touched.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// DefaultLockWait is how long the legacy flavour waits for the xtables
// lock when BackendOptions.LockWait is zero.
const DefaultLockWait = 5 * time.Second

// iptRunner runs the save and restore binaries of one flavour in the
// calling thread's network namespace. Tests fake it.
type iptRunner interface {
	// Save returns "*-save -t nat" for the family. A namespace without
	// a nat table may return "". Cancelling ctx kills the binary.
	Save(ctx context.Context, f Family) (string, error)
	// Restore feeds input to "*-restore --noflush". Cancelling ctx
	// kills the binary; a restore commits a table only at its COMMIT
	// line, so a killed restore changes nothing.
	Restore(ctx context.Context, f Family, input string) error
}

type iptBackend struct {
	name BackendName
	run  iptRunner
}

func newIPTBackend(name BackendName, opts BackendOptions) Backend {
	return &iptBackend{name: name, run: newExecRunner(name, opts)}
}

func (ipt *iptBackend) Name() BackendName { return ipt.name }

func (ipt *iptBackend) Render(rs *Ruleset) (string, error) {
	if err := rs.Validate(); err != nil {
		return "", err
	}
	return renderIPTables(rs)
}

var iptFamilies = []Family{FamilyIPv4, FamilyIPv6}

// Apply programs rs in each enabled family and removes our rules from
// the other. Each family is one atomic restore. The two families cannot
// be one kernel transaction, so when the second restore fails the first
// family is restored to what it held before: the namespace ends with the
// old rules in both families, never the new rules in one of them. The
// rollback runs even when ctx was cancelled (under
// context.WithoutCancel, bounded by the runner's own timeout), since
// stopping there would leave exactly that half.
func (ipt *iptBackend) Apply(ctx context.Context, rs *Ruleset) error {
	if err := rs.Validate(); err != nil {
		return err
	}
	// Render both families before touching anything, so a model error
	// changes nothing.
	want := map[Family][]*iptTable{}
	for _, f := range iptFamilies {
		if !familyEnabled(rs.Families, f) {
			continue
		}
		ts, err := renderIPTAll(rs, f)
		if err != nil {
			return err
		}
		want[f] = ts
	}
	var done [][]*iptTable // families already written, as they were before
	for _, f := range iptFamilies {
		have, err := ipt.owned(ctx, f)
		if err != nil {
			return errors.Join(err, ipt.rollback(ctx, done))
		}
		// One restore per family, one section per table that changes.
		var input strings.Builder
		for i, h := range have {
			if ts := want[f]; ts != nil {
				// Already exactly as wanted: rewriting would change
				// nothing but cost a commit (with the nft flavour,
				// deleting rules makes the kernel wait for an RCU grace
				// period).
				if slicesEqual(ts[i].lines(), h.lines()) {
					continue
				}
				input.WriteString(iptApplyInput(ts[i], h))
			} else {
				input.WriteString(iptRemoveInput(h))
			}
		}
		if input.Len() == 0 {
			continue
		}
		if err := ipt.run.Restore(ctx, f, input.String()); err != nil {
			err = fmt.Errorf("could not apply %s rules with %s: %w", iptCommand(f), ipt.name, err)
			return errors.Join(err, ipt.rollback(ctx, done))
		}
		done = append(done, have)
	}
	return nil
}

// rollback puts the families in prev (their state before this Apply)
// back as they were.
func (ipt *iptBackend) rollback(ctx context.Context, prev [][]*iptTable) error {
	ctx = context.WithoutCancel(ctx)
	var errs []error
	for i := len(prev) - 1; i >= 0; i-- {
		f := prev[i][0].Family
		now, err := ipt.owned(ctx, f)
		if err == nil {
			var input strings.Builder
			for j, t := range prev[i] {
				if !slicesEqual(t.lines(), now[j].lines()) {
					input.WriteString(iptApplyInput(t, now[j]))
				}
			}
			if input.Len() > 0 {
				err = ipt.run.Restore(ctx, f, input.String())
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("could not roll back %s rules: %w", iptCommand(f), err))
		}
	}
	return errors.Join(errs...)
}

// Check compares what we own in both families with rs. Lines of a table
// other than nat are prefixed with the table's name.
func (ipt *iptBackend) Check(ctx context.Context, rs *Ruleset) error {
	if err := rs.Validate(); err != nil {
		return err
	}
	drift := &DriftError{Backend: string(ipt.name)}
	for _, f := range iptFamilies {
		var want []string
		if familyEnabled(rs.Families, f) {
			ts, err := renderIPTAll(rs, f)
			if err != nil {
				return err
			}
			want = tablesLines(ts)
		}
		have, err := ipt.owned(ctx, f)
		if err != nil {
			return err
		}
		err = diffLines(string(ipt.name), want, tablesLines(have))
		var d *DriftError
		if errors.As(err, &d) {
			prefix := iptCommand(f) + ": "
			for _, l := range d.Missing {
				drift.Missing = append(drift.Missing, prefix+l)
			}
			for _, l := range d.Extra {
				drift.Extra = append(drift.Extra, prefix+l)
			}
		} else if err != nil {
			return err
		}
	}
	if len(drift.Missing) > 0 || len(drift.Extra) > 0 {
		return drift
	}
	return nil
}

// Remove deletes our entry rules and chains in both families.
func (ipt *iptBackend) Remove(ctx context.Context) error {
	var errs []error
	for _, f := range iptFamilies {
		have, err := ipt.owned(ctx, f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var input strings.Builder
		for _, h := range have {
			input.WriteString(iptRemoveInput(h))
		}
		if input.Len() > 0 {
			if err := ipt.run.Restore(ctx, f, input.String()); err != nil {
				errs = append(errs, fmt.Errorf("could not remove %s rules with %s: %w", iptCommand(f), ipt.name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// owned reads the tables of family f and returns what we own in each
// (iptTables order).
func (ipt *iptBackend) owned(ctx context.Context, f Family) ([]*iptTable, error) {
	out, err := ipt.run.Save(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("could not read the %s tables with %s: %w", iptCommand(f), ipt.name, err)
	}
	return parseIPTSaveAll(out, f), nil
}

// execRunner runs the real binaries.
type execRunner struct {
	legacy bool
	// lockWait is the --wait of the legacy restore, in whole seconds.
	lockWait int
	// dirs are searched for the binaries, in order.
	dirs []string
}

// sbinDirs are searched after PATH: a CNI plugin's environment is the
// runtime's, and may lack the sbin directories where Debian installs
// iptables.
var sbinDirs = []string{"/usr/sbin", "/sbin", "/usr/local/sbin"}

func newExecRunner(name BackendName, opts BackendOptions) *execRunner {
	wait := opts.LockWait
	if wait <= 0 {
		wait = DefaultLockWait
	}
	dirs := filepath.SplitList(os.Getenv("PATH"))
	for _, d := range sbinDirs {
		if !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	return &execRunner{
		legacy:   name == BackendIPTablesLegacy,
		lockWait: int(math.Ceil(wait.Seconds())),
		dirs:     dirs,
	}
}

// binary is the name of the save or restore binary ("save"/"restore").
func (r *execRunner) binary(f Family, op string) string {
	flavour := "nft"
	if r.legacy {
		flavour = "legacy"
	}
	return fmt.Sprintf("%s-%s-%s", iptCommand(f), flavour, op)
}

func (r *execRunner) lookPath(name string) (string, error) {
	for _, d := range r.dirs {
		if d == "" {
			continue
		}
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", &MissingBinaryError{Binary: name, Package: "iptables"}
}

// timeout bounds one save or restore; the legacy restore may wait for
// the lock first.
func (r *execRunner) timeout() time.Duration {
	return time.Duration(r.lockWait)*time.Second + time.Minute
}

func (r *execRunner) Save(ctx context.Context, f Family) (string, error) {
	// Running the legacy save registers the nat table in the namespace,
	// which would make the namespace look "legacy in use" to Detect.
	// An unregistered table holds nothing of ours.
	if r.legacy && !legacyTablesRegistered(f) {
		return "", nil
	}
	// Without -t, *-save prints every table that exists and creates
	// none (the legacy flavour lists only the registered ones).
	out, err := r.exec(ctx, f, "save", nil, "")
	return out, err
}

func (r *execRunner) Restore(ctx context.Context, f Family, input string) error {
	args := []string{"--noflush"}
	if r.legacy {
		// Debian's 1.8.9 takes -w seconds; -W is ignored as deprecated.
		args = append(args, "-w", strconv.Itoa(r.lockWait))
	}
	_, err := r.exec(ctx, f, "restore", args, input)
	return err
}

func (r *execRunner) exec(ctx context.Context, f Family, op string, args []string, stdin string) (string, error) {
	name := r.binary(f, op)
	path, err := r.lookPath(name)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout())
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if cerr := ctx.Err(); cerr != nil {
			// Cancelled or timed out: the binary was killed.
			return "", fmt.Errorf("%s %s: %w (%w)", name, strings.Join(args, " "), cerr, err)
		}
		msg := iptStderr(stderr.String())
		if op == "restore" {
			msg += iptInputContext(msg, stdin)
		}
		if r.legacy && strings.Contains(msg, "xtables lock") {
			return "", fmt.Errorf("%s %s: %w (waited %ds): %w: %s", name, strings.Join(args, " "), ErrXtablesLocked, r.lockWait, err, msg)
		}
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
	}
	return stdout.String(), nil
}

// ErrXtablesLocked is wrapped by errors of the legacy flavour when
// another program held the xtables lock for longer than
// BackendOptions.LockWait. Retrying later may succeed.
var ErrXtablesLocked = errors.New("another program holds the xtables lock")

// iptStderr makes the binaries' stderr one line, without the usage hint.
func iptStderr(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "Try `") {
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, "; ")
}

var iptErrLine = regexp.MustCompile(`line:? (\d+)`)

// iptInputContext quotes the input line that iptables-restore blames
// ("Error occurred at line: 7"), so the error names the rule. The nft
// flavour blames the COMMIT line for errors it finds while committing
// (a missing chain, say).
func iptInputContext(msg, input string) string {
	m := iptErrLine.FindAllStringSubmatch(msg, -1)
	if len(m) == 0 {
		return ""
	}
	n, err := strconv.Atoi(m[len(m)-1][1])
	lines := strings.Split(input, "\n")
	if err != nil || n < 1 || n > len(lines) {
		return ""
	}
	return fmt.Sprintf(" (input line %d: %q)", n, lines[n-1])
}
