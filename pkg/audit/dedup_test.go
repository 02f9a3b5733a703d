package audit

import (
	"fmt"
	"testing"
	"time"
)

func TestDedup(t *testing.T) {
	t0 := time.Unix(1000, 0)
	d := newDedup(5*time.Second, 3)
	steps := []struct {
		key  string
		at   time.Duration
		want bool
	}{
		{"a", 0, true},
		{"a", time.Second, false},     // a repeat within the window
		{"b", time.Second, true},      // another attempt
		{"a", 5 * time.Second, true},  // the window is over
		{"a", 6 * time.Second, false}, // a new window started at 5 s
		{"c", 6 * time.Second, true},  // the map is full now (a, b, c)
		{"d", 6 * time.Second, true},  // b expired at 6 s and makes room
		{"e", 6 * time.Second, true},  // full, nothing expired: logged, not kept
		{"e", 6 * time.Second, true},  // so logged again
		{"d", 7 * time.Second, false}, // d was kept
		{"c", 11 * time.Second, true}, // c expired
		{"x", 12 * time.Second, true},
	}
	for i, s := range steps {
		if got := d.first(s.key, t0.Add(s.at)); got != s.want {
			t.Fatalf("step %d (%s at %v): got %v, want %v", i, s.key, s.at, got, s.want)
		}
	}
	if d.suppressed != 3 {
		t.Errorf("suppressed %d, want 3", d.suppressed)
	}
	// Bounded: 10,000 distinct keys keep at most max.
	for i := range 10000 {
		d.first(fmt.Sprint(i), t0.Add(13*time.Second))
	}
	if len(d.seen) > 3 {
		t.Errorf("holds %d keys, max 3", len(d.seen))
	}
	// No window: everything is logged.
	z := newDedup(0, 1)
	if first, again := z.first("a", t0), z.first("a", t0); !first || !again {
		t.Error("window 0 suppressed a repeat")
	}
}
