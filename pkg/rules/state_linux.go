package rules

// What of ours is in the calling thread's network namespace, whatever
// the backend that wrote it: Probe reads it without running a binary,
// RemoveAll removes it, CheckNoneOurs lists it. The CNI plugin's DEL,
// CHECK and STATUS and egress-init's cleanup use these, so that there is
// one answer to "is this ours" (the backends' own parsers).

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"

	"github.com/google/nftables"
)

// State is what Probe found in the calling thread's network namespace.
// For nftables it is certain; for the iptables flavours it says only
// that a table we write exists, which may or may not hold rules of ours
// (only the flavour's save output tells, and reading it runs a binary).
type State struct {
	// NFTFamilies are the families in which our nftables table exists.
	NFTFamilies []nftables.TableFamily
	// IPTablesNFT: an ip or ip6 nftables table that the iptables-nft
	// flavour writes (nat, mangle, raw) exists.
	IPTablesNFT bool
	// IPTablesLegacy: a legacy xtables table we write (nat, mangle,
	// raw) is registered, or procfs cannot tell.
	IPTablesLegacy bool
	// Err says why the nftables tables could not be listed. NFTables
	// and IPTablesNFT are then assumed to hold state (see MayHold), so
	// that their backends run and report their own errors.
	Err error
}

// MayHold reports whether backend name may hold state of ours.
func (s State) MayHold(name BackendName) bool {
	switch name {
	case BackendNFTables:
		return s.Err != nil || len(s.NFTFamilies) > 0
	case BackendIPTablesNFT:
		return s.Err != nil || s.IPTablesNFT
	case BackendIPTablesLegacy:
		return s.IPTablesLegacy
	}
	return false
}

// concreteBackends are the backends, in the order RemoveAll runs them.
var concreteBackends = []BackendName{BackendNFTables, BackendIPTablesNFT, BackendIPTablesLegacy}

// Probe reads, without running any binary, which backends may hold
// state of ours in the calling thread's network namespace: the nftables
// tables over netlink, and the legacy xtables tables registered in
// /proc/thread-self/net.
func Probe() State {
	var st State
	st.IPTablesLegacy = legacyTablesRegistered(FamilyIPv4) || legacyTablesRegistered(FamilyIPv6)
	conn, err := nftables.New()
	if err != nil {
		st.Err = fmt.Errorf("could not open nftables netlink socket: %w", err)
		return st
	}
	defer conn.CloseLasting()
	tables, err := conn.ListTables()
	if err != nil {
		st.Err = fmt.Errorf("could not list nftables tables: %w", err)
		return st
	}
	for _, t := range tables {
		switch {
		case t.Name == NFTTable && slices.Contains(nftAllFamilies, t.Family):
			st.NFTFamilies = append(st.NFTFamilies, t.Family)
		case slices.Contains(iptTables, t.Name) && (t.Family == nftables.TableFamilyIPv4 || t.Family == nftables.TableFamilyIPv6):
			st.IPTablesNFT = true
		}
	}
	return st
}

// RemoveAll removes everything of ours from the calling thread's
// network namespace, with every backend that may hold some (Probe), and
// returns the backends that ran. The iptables flavours run only where a
// table of theirs exists, so RemoveAll never creates state (running the
// legacy binaries registers legacy tables), and a flavour whose binaries
// are not installed is skipped. It succeeds when there is nothing to
// remove; each error names its backend.
func RemoveAll(ctx context.Context) ([]BackendName, error) {
	return removeAll(ctx, Probe(), NewBackend)
}

func removeAll(ctx context.Context, st State, newBackend func(BackendName, BackendOptions) (Backend, error)) ([]BackendName, error) {
	var errs []error
	var ran []BackendName
	for _, name := range concreteBackends {
		if !st.MayHold(name) {
			continue
		}
		b, err := newBackend(name, BackendOptions{})
		if err == nil {
			err = b.Remove(ctx)
		}
		if IsBinaryMissing(err) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
			continue
		}
		ran = append(ran, name)
	}
	return ran, errors.Join(errs...)
}

// CheckNoneOurs returns nil when the calling thread's network namespace
// holds nothing of ours, a *DriftError (Backend "any") whose Extra lists
// what it holds, or another error when the state could not be read. What
// counts as ours is what the backends own: our nftables table, and what
// the iptables parsers find (our chains and their rules, and the entry
// rules that carry our comment or jump to our chains) in every table we
// write. Extra lines are "table egress_cni (family inet)" and
// "<binary>: <saved rule>" ("iptables-nft-save: -A OUTPUT ..."). A
// flavour whose binaries are not installed holds nothing of ours.
func CheckNoneOurs(ctx context.Context) error {
	st := Probe()
	if st.Err != nil {
		return st.Err
	}
	d := &DriftError{Backend: "any"}
	for _, f := range st.NFTFamilies {
		d.Extra = append(d.Extra, fmt.Sprintf("table %s (family %s)", NFTTable, nftFamilyName(f)))
	}
	for _, name := range []BackendName{BackendIPTablesNFT, BackendIPTablesLegacy} {
		if !st.MayHold(name) {
			continue
		}
		r := newExecRunner(name, BackendOptions{})
		ipt := &iptBackend{name: name, run: r}
		for _, f := range iptFamilies {
			have, err := ipt.owned(ctx, f)
			if IsBinaryMissing(err) {
				continue
			}
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			for _, l := range tablesLines(have) {
				d.Extra = append(d.Extra, r.binary(f, "save")+": "+l)
			}
		}
	}
	if len(d.Extra) > 0 {
		return d
	}
	return nil
}

// Available reports whether backend name can work here: the nftables
// netlink interface answers (nftables, and auto, which picks nftables on
// a fresh namespace), or the flavour's restore binaries are installed.
// It only reads.
func Available(name BackendName) error {
	var bins []string
	switch name {
	case BackendIPTablesNFT, BackendIPTablesLegacy:
		r := newExecRunner(name, BackendOptions{})
		bins = []string{r.binary(FamilyIPv4, "restore"), r.binary(FamilyIPv6, "restore")}
		for _, b := range bins {
			if _, err := r.lookPath(b); err != nil {
				return fmt.Errorf("backend %s needs %s: %w", name, b, err)
			}
		}
		return nil
	case BackendAuto, "", BackendNFTables:
		conn, err := nftables.New()
		if err != nil {
			return fmt.Errorf("nftables netlink is not usable: %w", err)
		}
		defer conn.CloseLasting()
		if _, err := conn.ListTables(); err != nil {
			return fmt.Errorf("nftables netlink is not usable: %w", err)
		}
		return nil
	}
	return unknownBackend(name)
}

// threadNetFile is the path of a file under the net directory of the
// calling thread's procfs entry. Not /proc/self/net: that is the thread
// group leader's namespace, and only the calling (locked) thread is
// inside the target namespace.
func threadNetFile(name string) string { return "/proc/thread-self/net/" + name }

// legacyTableNames returns the legacy xtables tables of family f
// registered in the calling thread's network namespace. known is false
// when procfs cannot tell.
func legacyTableNames(f Family) (names []string, known bool) {
	if _, err := os.Stat(threadNetFile("")); err != nil {
		return nil, false
	}
	file := "ip_tables_names"
	if f == FamilyIPv6 {
		file = "ip6_tables_names"
	}
	b, err := os.ReadFile(threadNetFile(file))
	if err != nil {
		// Absent while the ip(6)_tables module is not loaded.
		return nil, errors.Is(err, fs.ErrNotExist)
	}
	return strings.Fields(string(b)), true
}

// legacyInUse reports whether any legacy xtables table (ours or not) is
// registered in the calling thread's network namespace.
func legacyInUse() bool {
	for _, f := range iptFamilies {
		if names, _ := legacyTableNames(f); len(names) > 0 {
			return true
		}
	}
	return false
}

// legacyTablesRegistered reports whether a legacy table we write (nat,
// mangle, raw) of family f exists in the calling thread's network
// namespace. When that cannot be told (no procfs), it says yes, so that
// the legacy save runs and tells.
func legacyTablesRegistered(f Family) bool {
	names, known := legacyTableNames(f)
	if !known {
		return true
	}
	for _, t := range iptTables {
		if slices.Contains(names, t) {
			return true
		}
	}
	return false
}
