package rules

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
)

// Fake is a Backend that touches no kernel and runs no binary, for the
// tests of callers (pkg/cni). Like the real backends it acts on the
// calling thread's network namespace: it records, per namespace and per
// backend, the Ruleset last applied there as that backend renders it
// (RenderNFT, RenderIPTables: a later change to the Ruleset does not
// change the record), and Dump shows what it holds. So a test can assert what was
// applied, and where, rather than how many calls were made.
//
// It keeps the Backend contract: Apply replaces (never duplicates) what
// the same backend recorded in the namespace, Check returns a
// *DriftError naming the rendered lines that are missing or extra, and
// Remove forgets the namespace's rules of that backend, succeeding when
// there are none. Its RemoveAll and CheckNoneOurs stand in for the
// package functions of the same names over the record of every backend.
// What it does not model: kernel errors, the rules of others, and
// Detect.
//
// The Fake itself is the nftables backend; NewBackend gives the other
// flavours over the same record, and has NewBackend's signature so that
// it can stand in for it. It is safe for concurrent use.
type Fake struct {
	// ApplyErr, when set, is what Apply returns; nothing is recorded.
	// Set it before the Fake is shared between goroutines.
	ApplyErr error

	mu   sync.Mutex
	home string                            // the namespace of the process, at NewFake
	nss  map[string]map[BackendName]string // renderings, by namespace, then backend
	n    int                               // Applies that recorded
}

// NewFake returns a Fake that holds no rules.
func NewFake() *Fake {
	home, _ := os.Readlink("/proc/self/ns/net")
	return &Fake{home: home, nss: map[string]map[BackendName]string{}}
}

// NewBackend returns the named flavour over f's record. Auto resolves to
// nftables, as Detect does in a namespace that holds no rules.
func (f *Fake) NewBackend(name BackendName, _ BackendOptions) (Backend, error) {
	switch name {
	case BackendAuto, "", BackendNFTables:
		return fakeBackend{f, BackendNFTables}, nil
	case BackendIPTablesNFT, BackendIPTablesLegacy:
		return fakeBackend{f, name}, nil
	}
	return nil, unknownBackend(name)
}

func (f *Fake) Name() BackendName                  { return BackendNFTables }
func (f *Fake) Render(rs *Ruleset) (string, error) { return fakeBackend{f, BackendNFTables}.Render(rs) }
func (f *Fake) Apply(ctx context.Context, rs *Ruleset) error {
	return fakeBackend{f, BackendNFTables}.Apply(ctx, rs)
}
func (f *Fake) Check(ctx context.Context, rs *Ruleset) error {
	return fakeBackend{f, BackendNFTables}.Check(ctx, rs)
}
func (f *Fake) Remove(ctx context.Context) error { return fakeBackend{f, BackendNFTables}.Remove(ctx) }

// Dump renders everything f holds: per namespace, in the order of their
// names, per backend in BackendNames order, a header line
//
//	# netns NAME: BACKEND
//
// then the ruleset in that backend's syntax.
// NAME is "self" for the namespace the process was in at NewFake, else
// the kernel's name of it ("net:[4026532281]"). A Fake that holds no
// rules dumps as "".
func (f *Fake) Dump() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var names []string
	for ns := range f.nss {
		names = append(names, ns)
	}
	slices.Sort(names)
	var b strings.Builder
	for _, ns := range names {
		label := ns
		if ns == f.home {
			label = "self"
		}
		for _, n := range BackendNames {
			if text, ok := f.nss[ns][n]; ok {
				fmt.Fprintf(&b, "# netns %s: %s\n%s", label, n, text)
			}
		}
	}
	return b.String()
}

// fakeBackend is one flavour of a Fake.
type fakeBackend struct {
	f    *Fake
	name BackendName
}

func (b fakeBackend) Name() BackendName { return b.name }

// Render fails where the real backend's Render fails: a model that does
// not validate, or that its renderer rejects.
func (b fakeBackend) Render(rs *Ruleset) (string, error) {
	if err := rs.Validate(); err != nil {
		return "", err
	}
	if b.name != BackendNFTables {
		return renderIPTables(rs)
	}
	if _, err := nftObjectsFor(rs); err != nil {
		return "", fmt.Errorf("could not render nftables ruleset: %w", err)
	}
	return RenderNFT(rs), nil
}

// Apply records rs, unless the backend could not render it or ctx is
// done (as the real backends, it then changes nothing).
func (b fakeBackend) Apply(ctx context.Context, rs *Ruleset) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	text, err := b.Render(rs)
	if err != nil {
		return err
	}
	if b.f.ApplyErr != nil {
		return b.f.ApplyErr
	}
	ns := fakeThreadNS()
	b.f.mu.Lock()
	defer b.f.mu.Unlock()
	if b.f.nss[ns] == nil {
		b.f.nss[ns] = map[BackendName]string{}
	}
	b.f.nss[ns][b.name] = text
	b.f.n++
	return nil
}

// Applies is how many Apply calls recorded a ruleset, in any namespace
// (the record keeps only the last one per namespace and backend).
func (f *Fake) Applies() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.n
}

func (b fakeBackend) Check(ctx context.Context, rs *Ruleset) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	b.f.mu.Lock()
	have := b.f.nss[fakeThreadNS()][b.name]
	b.f.mu.Unlock()
	want, err := b.Render(rs)
	if err != nil {
		return err
	}
	return diffLines(string(b.name), fakeLines(want), fakeLines(have))
}

func (b fakeBackend) Remove(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	ns := fakeThreadNS()
	b.f.mu.Lock()
	defer b.f.mu.Unlock()
	delete(b.f.nss[ns], b.name)
	if len(b.f.nss[ns]) == 0 {
		delete(b.f.nss, ns)
	}
	return nil
}

// fakeLines are the lines of a rendering that say something: no blank
// lines, closing braces or comment lines.
func fakeLines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" && l != "}" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out
}

// fakeThreadNS names the calling thread's network namespace, as the real
// backends (netlink sockets, iptables-restore) see it.
func fakeThreadNS() string {
	ns, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		return "unknown"
	}
	return ns
}

// RemoveAll is rules.RemoveAll over the record: it forgets every
// backend's rules in the calling thread's namespace and returns the
// backends that held some, in RemoveAll's order.
func (f *Fake) RemoveAll(ctx context.Context) ([]BackendName, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ns := fakeThreadNS()
	f.mu.Lock()
	defer f.mu.Unlock()
	var ran []BackendName
	for _, name := range concreteBackends {
		if _, ok := f.nss[ns][name]; ok {
			ran = append(ran, name)
		}
	}
	delete(f.nss, ns)
	return ran, nil
}

// CheckNoneOurs is rules.CheckNoneOurs over the record: a *DriftError
// (Backend "any") whose Extra holds the recorded lines of every backend
// in the calling thread's namespace, prefixed with the backend's name.
func (f *Fake) CheckNoneOurs(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	d := &DriftError{Backend: "any"}
	for _, name := range concreteBackends {
		text, ok := f.nss[fakeThreadNS()][name]
		if !ok {
			continue
		}
		for _, l := range fakeLines(text) {
			d.Extra = append(d.Extra, string(name)+": "+l)
		}
	}
	if len(d.Extra) > 0 {
		return d
	}
	return nil
}
