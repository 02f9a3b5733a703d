// Package install is the node installer that the egress-cni DaemonSet
// runs: it copies the plugin binary into the host's CNI bin directory,
// adds our entry last in the chain of the config the runtime uses, keeps
// it there while the primary CNI rewrites its config, applies the node
// rules, and undoes all of that on uninstall.
//
// Config edits splice bytes (jsonedit.go): key order, unknown fields,
// numbers and the layout of every other plugin stay as the primary CNI
// wrote them, and uninstall after install gives back the original bytes.
package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/egress-cni/egress-cni/pkg/audit"
	"github.com/egress-cni/egress-cni/pkg/cni"
)

// Defaults for the DaemonSet, where the host's directories are mounted
// under /host.
const (
	DefaultConfDir   = "/host/etc/cni/net.d"
	DefaultBinDir    = "/host/opt/cni/bin"
	DefaultBinary    = "/opt/egress-cni/bin/egress-cni"
	DefaultLockFile  = "/run/egress-cni/install.lock"
	DefaultReadyFile = "/run/egress-cni/ready"
	DefaultResync    = time.Minute
	DefaultDebounce  = 100 * time.Millisecond
)

// ConfExtensions are the config file extensions runtimes read, in the
// order containerd (go-cni) and CRI-O (ocicni) list them. .conf and .json
// hold one plugin, .conflist a chain.
var ConfExtensions = []string{".conf", ".conflist", ".json"}

// Actions reported in Result.Action.
const (
	ActionNone      = "unchanged"
	ActionInserted  = "inserted"
	ActionReplaced  = "replaced"
	ActionMoved     = "moved to the end of the chain"
	ActionConverted = "converted to a .conflist"
)

// Options configure an Installer. Zero values take the defaults above,
// except BinarySource ("" copies no binary), NodeConfig ("" applies no
// node rules) and ReadyFile ("" keeps readiness in memory only).
type Options struct {
	// ConfDir is the CNI config directory the runtime reads.
	ConfDir string
	// ConfFile names the config to edit (a base name in ConfDir). Empty:
	// the lexically first valid config file, which is what containerd
	// and CRI-O use.
	ConfFile string
	// BinDir is the host's CNI bin directory; BinarySource the plugin
	// binary to copy into it as egress-cni.
	BinDir, BinarySource string
	// Entry is our conflist entry, from NormalizeEntry. nil: DefaultEntry.
	Entry []byte
	// LockFile serialises installers on the node (flock).
	LockFile string
	// ReadyFile exists only while our entry is in place.
	ReadyFile string
	// NodeConfig is the node rules config (pkg/node JSON).
	NodeConfig string
	// NodeConfigCopy, if set, is where ApplyNodeRules keeps a copy of
	// NodeConfig on the host, for the plugin's "nodeConfig" key: after a
	// reboot the first ADD applies the node rules from it before the
	// installer runs again. Uninstall removes it.
	NodeConfigCopy string
	// NetNS is the network namespace for the node rules; "" is the
	// installer's own (the host's, with hostNetwork).
	NetNS string
	// NetNSDir is where the runtime pins pod network namespaces; Run
	// scans them at every resync for interfaces that bypass the host's
	// IP stack (ScanAttachments). "" scans nothing.
	NetNSDir string
	// RemoveNodeRules makes Uninstall remove the node rules.
	RemoveNodeRules bool
	// Resync is the period of a full reconcile besides the watcher.
	Resync time.Duration
	// Debounce waits for a burst of file events to settle.
	Debounce time.Duration
	// Logger; nil logs nothing.
	Logger *slog.Logger

	// MetricsAddr is where Run serves Prometheus metrics at /metrics
	// (":9964"); "" serves none.
	MetricsAddr string
	// AuditOut receives Run's drop audit, one JSON line per connection
	// attempt (pkg/audit); nil: no audit lines (the per-pod counters
	// are still kept while PodRetention is set).
	AuditOut io.Writer
	// StateDir holds the plugin's pod identity records (the plugin's
	// "stateDir", as mounted here).
	StateDir string
	// NodeName names the node in the audit lines.
	NodeName string
	// AuditDedup is the audit's dedup window; PodRetention how long a
	// gone pod's per-pod series are kept (0: no per-pod series).
	AuditDedup, PodRetention time.Duration
}

// Installer installs and uninstalls egress-cni on one node.
type Installer struct {
	opts  Options
	log   *slog.Logger
	ready atomic.Bool
	// bypassing: the host-bypassing attachments of the last scan (only
	// Run's goroutine touches it); unenforceable: their count.
	bypassing     map[string]bool
	unenforceable atomic.Int64
	// scanUp: the last attachment scan ran fully.
	scanUp atomic.Bool
	// repairs counts node-rule repairs; watching: the monitor is up.
	repairs  atomic.Int64
	watching atomic.Bool
	// applySeconds times every ApplyNodeRules.
	applySeconds prometheus.Histogram
	// auditor is Run's drop audit, once started.
	auditor atomic.Pointer[audit.Auditor]
}

// New checks the options and fills in defaults.
func New(o Options) (*Installer, error) {
	if o.ConfDir == "" {
		o.ConfDir = DefaultConfDir
	}
	if o.BinDir == "" {
		o.BinDir = DefaultBinDir
	}
	if o.LockFile == "" {
		o.LockFile = DefaultLockFile
	}
	if o.Resync <= 0 {
		o.Resync = DefaultResync
	}
	if o.Debounce <= 0 {
		o.Debounce = DefaultDebounce
	}
	if o.ConfFile != "" && (o.ConfFile != filepath.Base(o.ConfFile) || !isConfName(o.ConfFile)) {
		return nil, fmt.Errorf("config file %q: want a file name in %s ending in .conf, .conflist or .json", o.ConfFile, o.ConfDir)
	}
	if o.Entry == nil {
		o.Entry = []byte(DefaultEntry)
	}
	e, err := NormalizeEntry(o.Entry)
	if err != nil {
		return nil, fmt.Errorf("plugin entry: %w", err)
	}
	o.Entry = e
	log := o.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.AuditDedup < 0 || o.PodRetention < 0 {
		return nil, fmt.Errorf("audit dedup window %v and pod metrics retention %v cannot be negative", o.AuditDedup, o.PodRetention)
	}
	return &Installer{opts: o, log: log, applySeconds: newApplySeconds()}, nil
}

// Entry returns the normalized entry the installer inserts.
func (in *Installer) Entry() []byte { return in.opts.Entry }

// BinaryPath is where the plugin binary is installed.
func (in *Installer) BinaryPath() string { return filepath.Join(in.opts.BinDir, cni.PluginType) }

func isConfName(n string) bool {
	ext := filepath.Ext(n)
	for _, e := range ConfExtensions {
		if ext == e {
			return true
		}
	}
	return false
}

// ConfigError is a config file the installer cannot use. The file is left
// untouched.
type ConfigError struct {
	Path string
	Err  error
}

func (e *ConfigError) Error() string { return fmt.Sprintf("CNI config %s: %v", e.Path, e.Err) }
func (e *ConfigError) Unwrap() error { return e.Err }

// NoConfigError says the directory holds no valid config yet (the primary
// CNI has not written one). Skipped lists the invalid files.
type NoConfigError struct {
	Dir     string
	Skipped []error
}

func (e *NoConfigError) Error() string {
	msg := fmt.Sprintf("no valid CNI config in %s yet", e.Dir)
	if len(e.Skipped) > 0 {
		msg += "; skipped: " + errors.Join(e.Skipped...).Error()
	}
	return strings.ReplaceAll(msg, "\n", "; ")
}

// IsNoConfig reports whether err is a *NoConfigError.
func IsNoConfig(err error) bool {
	var e *NoConfigError
	return errors.As(err, &e)
}

// validate loads a config file as the runtimes do: a .conflist through
// libcni's ConfListFromFile, .conf and .json through ConfFromFile, which
// must name a plugin type.
func validate(path string) error {
	if filepath.Ext(path) == ".conflist" {
		_, err := libcni.ConfListFromFile(path)
		return err
	}
	c, err := libcni.ConfFromFile(path)
	if err != nil {
		return err
	}
	if c.Network.Type == "" {
		return errors.New(`no plugin "type"`)
	}
	return nil
}

// FindConfig returns the config file the runtime uses: ConfFile when set
// (an invalid one is an error), otherwise the lexically first valid file,
// skipping invalid ones as CRI-O and the kubelet's CNI loader do.
func (in *Installer) FindConfig() (string, error) { return in.findConfig(false) }

// findConfig is FindConfig; quiet does not log skipped files (for the
// readiness check on every file event).
func (in *Installer) findConfig(quiet bool) (string, error) {
	dir := in.opts.ConfDir
	if in.opts.ConfFile != "" {
		path := filepath.Join(dir, in.opts.ConfFile)
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) && filepath.Ext(path) != ".conflist" {
			// We converted it earlier: the conflist carries its name.
			conv := strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
			if b, err := os.ReadFile(conv); err == nil && convertedFrom(b) == in.opts.ConfFile {
				return conv, nil
			}
		}
		if err := validate(path); err != nil {
			return "", &ConfigError{Path: path, Err: err}
		}
		return path, nil
	}
	files, err := libcni.ConfFiles(dir, ConfExtensions)
	if err != nil {
		return "", fmt.Errorf("could not list %s: %w", dir, err)
	}
	sort.Strings(files)
	var skipped []error
	for _, f := range files {
		if err := validate(f); err != nil {
			if quiet {
				skipped = append(skipped, &ConfigError{Path: f, Err: err})
				continue
			}
			in.log.Warn("skipping invalid CNI config, as the runtime does", "file", f, "error", err)
			skipped = append(skipped, &ConfigError{Path: f, Err: err})
			continue
		}
		return f, nil
	}
	return "", &NoConfigError{Dir: dir, Skipped: skipped}
}

// convertedFrom returns the ConvertedFromKey value of a conflist, or "".
func convertedFrom(b []byte) string {
	doc, err := parseDocument(b)
	if err != nil {
		return ""
	}
	v, ok := doc.get(ConvertedFromKey)
	if !ok {
		return ""
	}
	var s string
	_ = json.Unmarshal(doc.raw(v), &s)
	return s
}

// Result says what Install did.
type Result struct {
	// File is the config that holds our entry now.
	File string
	// Action is one of the Action* constants.
	Action string
	// Removed is the .conf replaced by File, for ActionConverted.
	Removed string
	// Binary reports that the plugin binary was (re)written.
	Binary bool
}

// Changed reports whether Install wrote anything.
func (r Result) Changed() bool { return r.Action != ActionNone || r.Binary }

// maxAttempts bounds the retries when the primary CNI rewrites the file
// while we edit it.
const maxAttempts = 5

// Install copies the binary and puts our entry last in the chain of the
// runtime's config, under the node lock. A second call writes nothing.
// A config it cannot parse is never written. If the primary CNI keeps
// rewriting a .conf during a conversion, our conflist may be left next to
// the newer .conf, which sorts first and so stays the runtime's config;
// the next reconcile converts again over our conflist.
func (in *Installer) Install() (Result, error) {
	l, err := acquire(in.opts.LockFile)
	if err != nil {
		return Result{}, err
	}
	defer l.Release()
	var res Result
	// A chain with another project's egress-cni plugin (AWS VPC CNI)
	// must stop us before we overwrite that project's binary.
	if err := in.preflight(); err != nil {
		in.setReady(false)
		return res, err
	}
	if in.opts.BinarySource != "" {
		if res.Binary, err = copyBinary(in.opts.BinarySource, in.BinaryPath()); err != nil {
			in.setReady(false)
			return res, err
		}
	}
	for range maxAttempts {
		r, err := in.insertOnce()
		if errors.Is(err, errChanged) {
			in.log.Info("config changed while we edited it; retrying", "file", r.File)
			continue
		}
		r.Binary = res.Binary
		in.setReady(err == nil)
		return r, err
	}
	in.setReady(false)
	return res, fmt.Errorf("config in %s kept changing; gave up after %d attempts (the watcher retries)", in.opts.ConfDir, maxAttempts)
}

// preflight refuses a runtime config that holds a foreign plugin of our
// type. A missing or broken config is left to insertOnce to report.
func (in *Installer) preflight() error {
	path, err := in.FindConfig()
	if err != nil || filepath.Ext(path) != ".conflist" {
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	if c, err := parseChain(b); err == nil {
		if i := c.foreign(); i >= 0 {
			return &ConfigError{Path: path, Err: &ForeignEntryError{Index: i, Entry: string(c.doc.raw(c.elems[i]))}}
		}
	}
	return nil
}

func (in *Installer) insertOnce() (Result, error) {
	path, err := in.FindConfig()
	if err != nil {
		return Result{}, err
	}
	res := Result{File: path}
	b, err := os.ReadFile(path)
	if err != nil {
		return res, fmt.Errorf("could not read %s: %w", path, err)
	}
	mode, owner, err := statOwner(path)
	if err != nil {
		return res, err
	}
	ext := filepath.Ext(path)
	if ext == ".conflist" {
		out, action, err := ensureEntry(b, in.opts.Entry)
		if err != nil {
			return res, &ConfigError{Path: path, Err: err}
		}
		res.Action = action
		if action == ActionNone {
			return res, nil
		}
		if err := in.checkPluginDir(path, b); err != nil {
			return res, &ConfigError{Path: path, Err: err}
		}
		return res, writeAtomic(path, out, mode, owner, b)
	}

	// A single-plugin .conf/.json becomes a .conflist of the same base
	// name. The conflist is written first and the old file removed after,
	// so the runtime always finds a config.
	out, err := convertConf(b, filepath.Base(path), in.opts.Entry)
	if err != nil {
		return res, &ConfigError{Path: path, Err: err}
	}
	conv := strings.TrimSuffix(path, ext) + ".conflist"
	var expect []byte
	if old, err := os.ReadFile(conv); err == nil {
		// Ours from an earlier conversion, and the primary CNI wrote its
		// .conf again since: replace it. Anything else is not ours.
		if convertedFrom(old) != filepath.Base(path) {
			return res, &ConfigError{Path: path, Err: fmt.Errorf("cannot convert to %s: that file exists and was not made by %s", conv, cni.PluginType)}
		}
		expect = old
	}
	if err := writeAtomic(conv, out, mode, owner, expect); err != nil {
		return res, err
	}
	if cur, err := os.ReadFile(path); err != nil || !bytes.Equal(cur, b) {
		// Rewritten meanwhile: convert the new content next attempt.
		return res, errChanged
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return res, fmt.Errorf("could not remove %s after converting it: %w", path, err)
	}
	syncDir(filepath.Dir(path))
	res.File, res.Removed, res.Action = conv, path, ActionConverted
	return res, nil
}

// checkPluginDir refuses a conflist whose plugins libcni also loads from
// the directory <confdir>/<name>/ (CNI 1.1 "loadOnlyInlinedPlugins":
// false): those come after the inline ones, so our entry would not be
// last.
func (in *Installer) checkPluginDir(path string, b []byte) error {
	l, err := libcni.ConfListFromBytes(b)
	if err != nil || l.LoadOnlyInlinedPlugins {
		return nil
	}
	files, _ := libcni.ConfFiles(filepath.Join(filepath.Dir(path), l.Name), []string{".conf"})
	if len(files) > 0 {
		return fmt.Errorf("plugins are also loaded from %s, after ours; set loadOnlyInlinedPlugins or name the config explicitly", filepath.Join(filepath.Dir(path), l.Name))
	}
	return nil
}

// InPlace reports whether the runtime's config ends with our entry.
func (in *Installer) InPlace() bool {
	path, err := in.findConfig(true)
	if err != nil || filepath.Ext(path) != ".conflist" {
		return false
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	c, err := parseChain(b)
	return err == nil && c.hasEntry(in.opts.Entry)
}

// Ready reports the last known readiness.
func (in *Installer) Ready() bool { return in.ready.Load() }

func (in *Installer) setReady(ok bool) {
	in.ready.Store(ok)
	if in.opts.ReadyFile == "" {
		return
	}
	if !ok {
		if err := os.Remove(in.opts.ReadyFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			in.log.Error("could not remove readiness file", "file", in.opts.ReadyFile, "error", err)
		}
		return
	}
	if _, err := os.Stat(in.opts.ReadyFile); err == nil {
		return
	}
	if err := os.MkdirAll(filepath.Dir(in.opts.ReadyFile), 0o755); err == nil {
		err = os.WriteFile(in.opts.ReadyFile, []byte("ready\n"), 0o644)
		if err == nil {
			return
		}
	}
	in.log.Error("could not write readiness file", "file", in.opts.ReadyFile)
}

// Uninstall removes our entry from every config in the directory
// (writing a converted .conf back), then our binary, then, with
// RemoveNodeRules, the node rules. Nothing else is touched. Files that
// are not valid JSON or hold no entry of ours are left alone. It
// continues past errors and returns them all.
func (in *Installer) Uninstall() error {
	l, err := acquire(in.opts.LockFile)
	if err != nil {
		return err
	}
	defer l.Release()
	in.setReady(false)
	var errs []error
	files, err := libcni.ConfFiles(in.opts.ConfDir, ConfExtensions)
	if err != nil {
		errs = append(errs, fmt.Errorf("could not list %s: %w", in.opts.ConfDir, err))
	}
	sort.Strings(files)
	foreign := false
	for _, f := range files {
		fgn, err := in.uninstallFile(f)
		if err != nil {
			errs = append(errs, err)
		}
		foreign = foreign || fgn
	}
	// The entry goes first, so no new pod calls a binary that is gone.
	// A foreign plugin of our name (AWS VPC CNI) owns the binary.
	if foreign {
		in.log.Warn("not removing the plugin binary: another CNI's plugin of the same name uses it", "file", in.BinaryPath())
	} else if err := os.Remove(in.BinaryPath()); err == nil {
		in.log.Info("removed plugin binary", "file", in.BinaryPath())
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("could not remove plugin binary: %w", err))
	}
	if in.opts.RemoveNodeRules {
		if err := in.RemoveNodeRules(); err != nil {
			errs = append(errs, err)
		} else {
			in.log.Info("removed node rules")
		}
	}
	return errors.Join(errs...)
}

// uninstallFile removes our entry from one config file; foreign reports a
// plugin of our type that is not ours.
func (in *Installer) uninstallFile(f string) (foreign bool, err error) {
	b, err := os.ReadFile(f)
	if err != nil {
		return false, fmt.Errorf("could not read %s: %w", f, err)
	}
	c, err := parseChain(b)
	if err != nil {
		return false, nil // not a conflist we could have edited
	}
	if i := c.foreign(); i >= 0 {
		// Another project's plugin of our name: not ours to remove.
		in.log.Warn("leaving a foreign plugin of our type alone", "file", f, "index", i)
		return true, nil
	}
	if len(c.ours()) == 0 && convertedFrom(b) == "" {
		return false, nil
	}
	mode, owner, err := statOwner(f)
	if err != nil {
		return false, err
	}
	out, err := removeOurEntries(b)
	if err != nil {
		return false, &ConfigError{Path: f, Err: err}
	}
	name, conf, ok, err := restoreConf(out)
	if err != nil {
		return false, &ConfigError{Path: f, Err: err}
	}
	if !ok {
		if bytes.Equal(out, b) {
			return false, nil
		}
		if err := writeAtomic(f, out, mode, owner, b); err != nil {
			return false, err
		}
		in.log.Info("removed our entry", "file", f)
		return false, nil
	}
	orig := filepath.Join(filepath.Dir(f), name)
	if _, err := os.Stat(orig); errors.Is(err, os.ErrNotExist) {
		if err := writeAtomic(orig, conf, mode, owner, nil); err != nil {
			return false, err
		}
	} // else the primary CNI wrote its .conf again; it wins.
	if err := os.Remove(f); err != nil {
		return false, fmt.Errorf("could not remove %s: %w", f, err)
	}
	syncDir(filepath.Dir(f))
	in.log.Info("removed our entry and restored the original config", "file", orig, "removed", f)
	return false, nil
}
