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

// tablesLines is the lines of every table, those of tables other than
// nat prefixed with "<table>: ".
func tablesLines(ts []*iptTable) []string {
	var out []string
	for _, t := range ts {
		for _, l := range t.lines() {
			if t.table() != "nat" {
				l = t.table() + ": " + l
			}
			out = append(out, l)
		}
	}
	return out
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

// iptApplyInput is the restore input that replaces have with want.
func iptApplyInput(want, have *iptTable) string {
	var b strings.Builder
	b.WriteString("*" + want.table() + "\n")
	// Under --noflush, declaring a chain creates it or flushes it.
	chains := slices.Clone(want.Chains)
	var stale []string
	for _, c := range have.Chains {
		if !slices.Contains(chains, c) {
			stale = append(stale, c)
		}
	}
	for _, c := range append(chains, stale...) {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, l := range have.Entry {
		b.WriteString(deleteLine(l))
	}
	for _, c := range stale {
		fmt.Fprintf(&b, "-X %s\n", c)
	}
	for _, l := range want.Entry {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	for _, l := range want.Rules {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// iptRemoveInput is the restore input that deletes everything in have,
// or "" when have is empty.
func iptRemoveInput(have *iptTable) string {
	if have.empty() {
		return ""
	}
	var b strings.Builder
	b.WriteString("*" + have.table() + "\n")
	for _, c := range have.Chains {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, l := range have.Entry {
		b.WriteString(deleteLine(l))
	}
	for _, c := range have.Chains {
		fmt.Fprintf(&b, "-X %s\n", c)
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// deleteLine turns a saved "-A CHAIN spec" into "-D CHAIN spec\n". The
// spec that iptables-save prints is one restore accepts back.
func deleteLine(l string) string {
	return "-D" + strings.TrimPrefix(l, "-A") + "\n"
}

// parseIPTSave extracts what we own in the nat table from iptables-save
// output: our chain declarations, our chains' rules, and our entry rules
// in PREROUTING and OUTPUT. The result is in iptTable's canonical order,
// whatever order the flavour prints chains in.
func parseIPTSave(out string, f Family) *iptTable { return parseIPTSaveTable(out, f, "nat") }

// parseIPTSaveAll is parseIPTSave for every table we write (iptTables
// order).
func parseIPTSaveAll(out string, f Family) []*iptTable {
	ts := make([]*iptTable, 0, len(iptTables))
	for _, tb := range iptTables {
		ts = append(ts, parseIPTSaveTable(out, f, tb))
	}
	return ts
}

func parseIPTSaveTable(out string, f Family, table string) *iptTable {
	t := &iptTable{Family: f}
	if table != "nat" {
		t.Table = table
	}
	rules := map[string][]string{}
	entry := map[string][]string{}
	in := false
	for _, l := range strings.Split(out, "\n") {
		l = strings.TrimRight(l, " \r")
		switch {
		case strings.HasPrefix(l, "*"):
			in = l == "*"+table
		case !in:
		case strings.HasPrefix(l, ":"):
			name, _, _ := strings.Cut(l[1:], " ")
			if isIPTChainIn(table, name) && !slices.Contains(t.Chains, name) {
				t.Chains = append(t.Chains, name)
			}
		case strings.HasPrefix(l, "-A "):
			chain, _, _ := strings.Cut(l[3:], " ")
			switch {
			case isIPTChainIn(table, chain):
				rules[chain] = append(rules[chain], l)
			case slices.Contains(iptBuiltins, chain) && isOurEntryIn(table, l):
				entry[chain] = append(entry[chain], l)
			}
		}
	}
	slices.Sort(t.Chains)
	for _, c := range iptBuiltins {
		t.Entry = append(t.Entry, entry[c]...)
	}
	for _, c := range t.Chains {
		t.Rules = append(t.Rules, rules[c]...)
	}
	return t
}

// isOurEntry reports whether a saved rule in a built-in chain is ours:
// it carries our comment, or it jumps (or goes) to one of our chains.
func isOurEntry(l string) bool { return isOurEntryIn("nat", l) }

func isOurEntryIn(table, l string) bool {
	fields := iptFields(l)
	for i := 0; i+1 < len(fields); i++ {
		switch fields[i] {
		case "--comment":
			if fields[i+1] == Comment {
				return true
			}
		case "-j", "-g":
			if isIPTChainIn(table, fields[i+1]) {
				return true
			}
		}
	}
	return false
}

// iptFields splits a saved rule into its words as iptables-restore
// reads them: a double-quoted word (iptables-save quotes a comment with
// spaces, "like this", and escapes quotes inside it as \") is one
// word, without its quotes. So a foreign comment that merely starts
// with our name, or holds "-j ISTIO_OUTPUT", is not taken for ours.
func iptFields(l string) []string {
	var out []string
	var w strings.Builder
	inWord, quoted := false, false
	for i := 0; i < len(l); i++ {
		c := l[i]
		switch {
		case quoted && c == '\\' && i+1 < len(l) && (l[i+1] == '"' || l[i+1] == '\\'):
			i++
			w.WriteByte(l[i])
		case c == '"':
			quoted, inWord = !quoted, true
		case !quoted && (c == ' ' || c == '\t'):
			if inWord {
				out = append(out, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		out = append(out, w.String())
	}
	return out
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
