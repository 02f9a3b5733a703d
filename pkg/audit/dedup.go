package audit

import (
	"time"
)

// dedup says whether an event key was already logged within the window.
// It holds at most max keys: when full, expired keys are dropped, and if
// none has expired the new key is still logged but not remembered (a
// flood of distinct attempts is bounded by the kernel's rate limit, and
// memory by max).
type dedup struct {
	window time.Duration
	max    int
	seen   map[string]time.Time // key -> when it was logged
	// suppressed counts the repeats not logged.
	suppressed uint64
}

func newDedup(window time.Duration, limit int) *dedup {
	return &dedup{window: window, max: limit, seen: make(map[string]time.Time)}
}

// first reports whether key should be logged at now.
func (d *dedup) first(key string, now time.Time) bool {
	if d.window <= 0 {
		return true
	}
	if t, ok := d.seen[key]; ok && now.Sub(t) < d.window {
		d.suppressed++
		return false
	}
	if len(d.seen) >= d.max {
		d.expire(now)
	}
	if len(d.seen) < d.max {
		d.seen[key] = now
	}
	return true
}

func (d *dedup) expire(now time.Time) {
	for k, t := range d.seen {
		if now.Sub(t) >= d.window {
			delete(d.seen, k)
		}
	}
}
