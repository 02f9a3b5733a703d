package install

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// For any conflist the splice accepts: the output is valid JSON that ends
// with our entry exactly once, a second ensureEntry changes nothing, and
// removing the entry gives back the input byte for byte when the input
// held no entry of ours.
func FuzzEnsureEntry(f *testing.F) {
	files, _ := filepath.Glob("testdata/primary/*.conflist")
	for _, p := range files {
		b, _ := os.ReadFile(p)
		f.Add(b)
	}
	f.Add([]byte(`{"name":"n","plugins":[{"type":"a"},{"type":"egress-cni"}]}`))
	f.Add([]byte("{\"plugins\":[\n\t{\"type\":\"a\"}\n\t,\n\t{\"type\":\"b\"}\n]}"))
	entry := []byte(`{"type":"egress-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true}}`)
	f.Fuzz(func(t *testing.T, in []byte) {
		out, action, err := ensureEntry(in, entry)
		if err != nil {
			return
		}
		if !json.Valid(out) {
			t.Fatalf("invalid output for %q: %q", in, out)
		}
		c, err := parseChain(out)
		if err != nil {
			t.Fatalf("output does not parse: %v: %q", err, out)
		}
		if !c.hasEntry(entry) {
			t.Fatalf("entry not last exactly once: %q", out)
		}
		again, a2, err := ensureEntry(out, entry)
		if err != nil || a2 != ActionNone || !bytes.Equal(again, out) {
			t.Fatalf("not idempotent: %s %v", a2, err)
		}
		if action == ActionInserted {
			back, err := removeOurEntries(out)
			if err != nil || !bytes.Equal(back, in) {
				t.Fatalf("round trip: %v\nin  %q\nout %q\nback %q", err, in, out, back)
			}
		}
	})
}
