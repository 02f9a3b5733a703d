package install

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
)

// relevant reports whether a file event can change the runtime's config:
// a config file was created, written, renamed or removed. Our temporary
// files and anything without a config extension are ignored.
func relevant(ev fsnotify.Event) bool {
	base := filepath.Base(ev.Name)
	if strings.HasPrefix(base, ".egress-cni-") || !isConfName(base) {
		return false
	}
	return ev.Has(fsnotify.Create) || ev.Has(fsnotify.Write) || ev.Has(fsnotify.Rename) || ev.Has(fsnotify.Remove)
}

// Run installs, then keeps our entry in place until ctx ends: it watches
// the config directory with fsnotify (debounced) and reconciles again on
// every relevant change, and every Resync in case an event was lost. Each
// repair is logged. Node rules are applied first and checked for drift at
// every resync. Run returns nil when ctx ends, or an error when the
// directory cannot be watched or the node rules cannot be applied at
// start.
func (in *Installer) Run(ctx context.Context) error {
	// The ready file is on the host (shared with the next pod): it must
	// not outlive the watcher, nor be trusted before the first check.
	in.setReady(false)
	defer in.setReady(false)
	if err := os.MkdirAll(in.opts.ConfDir, 0o755); err != nil {
		return fmt.Errorf("could not create %s: %w", in.opts.ConfDir, err)
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("could not start watcher: %w", err)
	}
	defer w.Close()
	if err := w.Add(in.opts.ConfDir); err != nil {
		return fmt.Errorf("could not watch %s: %w", in.opts.ConfDir, err)
	}
	if err := in.ApplyNodeRules(); err != nil {
		return err
	}
	in.startObservability(ctx)
	// Watch before the first check, so that nothing deleted between the
	// two goes unnoticed.
	tamper := in.watchNodeRules(ctx)
	links := in.watchLinks(ctx)
	in.reconcile("startup")
	in.scanAttachments()

	resync := time.NewTicker(in.opts.Resync)
	defer resync.Stop()
	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	var pending []string
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("watcher closed")
			}
			if !relevant(ev) {
				continue
			}
			if len(pending) < 8 {
				pending = append(pending, ev.String())
			}
			// Readiness follows the entry at once; the repair waits for
			// the burst of writes to settle.
			if in.Ready() && !in.InPlace() {
				in.setReady(false)
			}
			debounce.Reset(in.opts.Debounce)
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("watcher closed")
			}
			// Usually a queue overflow: events were lost, look again.
			in.log.Warn("watcher error; reconciling", "error", err)
			debounce.Reset(in.opts.Debounce)
		case name := <-links:
			in.dropRegistrationsOf(name)
		case <-tamper:
			// Something deleted rules of ours: repair now, not at the
			// next resync. A flushed table fails closed meanwhile; a
			// deleted one is open until this runs.
			in.repairNodeRules("nftables monitor", time.Now())
		case <-debounce.C:
			in.reconcile(strings.Join(pending, "; "))
			pending = pending[:0]
		case <-resync.C:
			// The directory may have been removed and recreated, which
			// drops the inotify watch; adding it again is harmless.
			if err := w.Add(in.opts.ConfDir); err != nil {
				in.log.Warn("could not watch the config directory", "dir", in.opts.ConfDir, "error", err)
			}
			in.reconcile("resync")
			in.repairNodeRules("resync", time.Now())
			in.scanAttachments()
		}
	}
}

// reconcile runs Install and logs what happened.
func (in *Installer) reconcile(reason string) {
	res, err := in.Install()
	switch {
	case IsNoConfig(err):
		in.log.Warn("waiting for the primary CNI's config", "reason", reason, "error", err)
	case err != nil:
		in.log.Error("could not install our entry", "reason", reason, "error", err)
	case !res.Changed():
		in.log.Debug("entry in place", "file", res.File, "reason", reason)
	case reason == "startup":
		in.log.Info("installed", "file", res.File, "action", res.Action, "binary", res.Binary, "removed", res.Removed)
	default:
		in.log.Info("repaired", "file", res.File, "action", res.Action, "binary", res.Binary, "removed", res.Removed, "reason", reason)
	}
}

// ServeHealth serves /readyz (200 while our entry is in place, 503
// otherwise) and /healthz (200) on addr until ctx ends.
func (in *Installer) ServeHealth(ctx context.Context, addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("could not listen on %s: %w", addr, err)
	}
	return in.serveHealth(ctx, l)
}

func (in *Installer) serveHealth(ctx context.Context, l net.Listener) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !in.Ready() {
			http.Error(w, "egress-cni entry not in place", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
