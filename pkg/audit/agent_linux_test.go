package audit

import (
	"context"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// NFLOG gives a group to one socket per namespace: a second agent on the
// same group fails to bind (the installer retries), and binds once the
// first is gone. A real kernel, a fresh namespace of our own.
func TestOneReaderPerGroup(t *testing.T) {
	nstest.RequirePrivileged(t)
	host := nstest.NewNS(t)
	bound := &signalWriter{word: "reading node-rule drops", ch: make(chan struct{})}
	first, err := New(Options{NetNS: host.Path(), Group: 4242, Logger: slog.New(slog.NewTextHandler(bound, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- first.Run(ctx) }()
	select {
	case <-bound.ch:
	case err := <-done:
		t.Fatalf("first reader: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("first reader never bound")
	}
	if !first.Bound() {
		t.Error("the first reader is bound but says it is not")
	}
	second, _ := New(Options{NetNS: host.Path(), Group: 4242})
	ctx2, cancel2 := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel2()
	if err := second.Run(ctx2); err == nil || !strings.Contains(err.Error(), "could not bind NFLOG group 4242") {
		t.Fatalf("second reader of the group: %v", err)
	}
	if second.Bound() {
		t.Error("the second reader failed to bind but says it is bound")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("first reader: %v", err)
	}
	if first.Bound() {
		t.Error("the first reader stopped but says it is bound")
	}
	// Another group in the same namespace, and the first group once its
	// reader is gone, bind.
	for _, g := range []uint16{4243, 4242} {
		a, _ := New(Options{NetNS: host.Path(), Group: g})
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		err := a.Run(ctx)
		cancel()
		if err != nil {
			t.Errorf("group %d: %v", g, err)
		}
	}
}

// signalWriter closes ch when a write holds word.
type signalWriter struct {
	word string
	ch   chan struct{}
	once sync.Once
}

func (w *signalWriter) Write(p []byte) (int, error) {
	if strings.Contains(string(p), w.word) {
		w.once.Do(func() { close(w.ch) })
	}
	return len(p), nil
}

// The NFLOG socket gets the receive buffer asked for even past
// net.core.rmem_max (SO_RCVBUFFORCE, CAP_NET_ADMIN), which SO_RCVBUF
// alone is capped at.
func TestReadBufferPastRmemMax(t *testing.T) {
	nstest.RequirePrivileged(t)
	b, err := os.ReadFile("/proc/sys/net/core/rmem_max")
	if err != nil {
		t.Fatal(err)
	}
	rmemMax, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if rmemMax > 64<<20 {
		t.Skipf("net.core.rmem_max is %d: asking past it would take too much memory", rmemMax)
	}
	// SO_RCVBUF reports twice what was set; capped, at most 2*rmem_max.
	ask := 4 * rmemMax
	host := nstest.NewNS(t)
	bound := &signalWriter{word: "reading node-rule drops", ch: make(chan struct{})}
	a, err := New(Options{NetNS: host.Path(), Group: 4244, ReadBuffer: ask, Logger: slog.New(slog.NewTextHandler(bound, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	select {
	case <-bound.ch:
	case err := <-done:
		t.Fatalf("reader: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("reader never bound")
	}
	got := a.ReadBuffer()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Logf("rmem_max %d, asked %d, SO_RCVBUF %d", rmemMax, ask, got)
	if got < ask {
		t.Errorf("receive buffer %d, want at least the %d asked (rmem_max %d)", got, ask, rmemMax)
	}
}
