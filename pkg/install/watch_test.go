package install

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a log sink safe for the watcher goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// eventually polls cond for up to 5 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The watcher puts our entry back when the primary CNI rewrites its
// config, when another tool removes our entry, and when the primary
// switches to a .conf; readiness follows, and each repair is logged.
func TestWatchRepairs(t *testing.T) {
	e := newEnv(t)
	// A ready file left by a previous pod.
	if err := os.MkdirAll(filepath.Dir(e.readyFile), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.readyFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	in := e.installer(t, func(o *Options) {
		o.Debounce = 20 * time.Millisecond
		o.Resync = time.Hour
		o.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
			if _, err := os.Stat(e.readyFile); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("ready file outlives Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not stop")
		}
	}()

	readyFile := func() bool { _, err := os.Stat(e.readyFile); return err == nil }
	eventually(t, "stale ready file removed", func() bool { return !readyFile() })
	// No config yet: not ready, waiting.
	time.Sleep(50 * time.Millisecond)
	if in.Ready() || readyFile() {
		t.Fatal("ready without a config")
	}

	// The primary CNI installs its config (atomically, as most do).
	path := filepath.Join(e.confDir, "10-calico.conflist")
	calico, err := os.ReadFile("testdata/primary/10-calico.conflist")
	if err != nil {
		t.Fatal(err)
	}
	primaryWrite := func(name string, b []byte) {
		tmp := filepath.Join(e.confDir, ".tmp-primary")
		if err := os.WriteFile(tmp, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(e.confDir, name)); err != nil {
			t.Fatal(err)
		}
	}
	primaryWrite("10-calico.conflist", calico)
	eventually(t, "first install", func() bool { return in.InPlace() && in.Ready() && readyFile() })

	// The primary rewrites its file (Calico's install-cni does on restart).
	primaryWrite("10-calico.conflist", calico)
	eventually(t, "re-insert after rewrite", func() bool { return in.InPlace() && readyFile() })
	if !strings.Contains(logs.String(), "msg=repaired") {
		t.Fatalf("repair not logged:\n%s", logs.String())
	}

	// In place, non-atomic rewrite (truncate and write).
	if err := os.WriteFile(path, calico, 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, "re-insert after in-place write", in.InPlace)

	// Another installer removes our entry.
	b, _ := os.ReadFile(path)
	out, err := removeOurEntries(b)
	if err != nil {
		t.Fatal(err)
	}
	primaryWrite("10-calico.conflist", out)
	eventually(t, "re-insert after removal", in.InPlace)

	// The primary is replaced by one that writes a .conf sorting first.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	bridge, _ := os.ReadFile("testdata/primary/10-bridge.conf")
	primaryWrite("00-bridge.conf", bridge)
	eventually(t, "conversion", func() bool {
		_, err := os.Stat(filepath.Join(e.confDir, "00-bridge.conf"))
		return errors.Is(err, fs.ErrNotExist) && in.InPlace()
	})
	checkEntry(t, filepath.Join(e.confDir, "00-bridge.conflist"))
	if n := strings.Count(logs.String(), "msg=repaired"); n < 4 {
		t.Errorf("%d repairs logged, want at least 4:\n%s", n, logs.String())
	}

	// All config gone: not ready.
	if err := os.Remove(filepath.Join(e.confDir, "00-bridge.conflist")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "not ready without config", func() bool { return !in.Ready() && !readyFile() })
}

func TestHealthEndpoint(t *testing.T) {
	e := newEnv(t, "10-flannel.conflist")
	in := e.installer(t)
	ctx, cancel := context.WithCancel(context.Background())
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	addr := l.Addr().String()
	done := make(chan error, 1)
	go func() { done <- in.serveHealth(ctx, l) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serveHealth: %v", err)
		}
	}()
	get := func() int {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if c := get(); c != http.StatusServiceUnavailable {
		t.Fatalf("readyz before install: %d", c)
	}
	if _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	if c := get(); c != http.StatusOK {
		t.Fatalf("readyz after install: %d", c)
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if c := get(); c != http.StatusServiceUnavailable {
		t.Fatalf("readyz after uninstall: %d", c)
	}
}

// The config directory removed and recreated: the resync watches it again.
func TestWatchDirRecreated(t *testing.T) {
	e := newEnv(t, "10-flannel.conflist")
	in := e.installer(t, func(o *Options) {
		o.Debounce = 10 * time.Millisecond
		o.Resync = 50 * time.Millisecond
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	eventually(t, "install", in.InPlace)
	if err := os.RemoveAll(e.confDir); err != nil {
		t.Fatal(err)
	}
	eventually(t, "not ready", func() bool { return !in.Ready() })
	if err := os.MkdirAll(e.confDir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.copyFixture(t, "10-flannel.conflist")
	eventually(t, "install in the new directory", in.InPlace)
}
