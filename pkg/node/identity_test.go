package node

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestIdentityRecords(t *testing.T) {
	dir := t.TempDir()
	a := Identity{ContainerID: "c1", Namespace: "shop", Name: "cart-0", Port: "veth1", L3: "cni0", IPs: []netip.Addr{netip.MustParseAddr("198.51.100.7")}}
	b := Identity{ContainerID: "c2", Namespace: "shop", Name: "web-0", Port: "veth2", L3: "cni0"}
	for _, id := range []Identity{a, b} {
		if err := WriteIdentity(dir, id); err != nil {
			t.Fatal(err)
		}
	}
	got, err := ReadIdentities(dir)
	if err != nil || len(got) != 2 || got["c1"].Name != "cart-0" || got["c1"].IPs[0] != a.IPs[0] || got["c2"].Namespace != "shop" {
		t.Fatalf("read back %+v, %v", got, err)
	}
	// Overwrite is atomic and leaves no temporary file.
	a.Name = "cart-1"
	if err := WriteIdentity(dir, a); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(filepath.Join(dir, identityDir))
	if len(ents) != 2 {
		t.Fatalf("directory holds %d entries, want 2", len(ents))
	}
	removed, err := RemoveIdentities(dir, func(id string) bool { return id == "c1" })
	if err != nil || len(removed) != 1 || removed[0] != "c1" {
		t.Fatalf("removed %v, %v", removed, err)
	}
	got, _ = ReadIdentities(dir)
	if _, ok := got["c1"]; ok || len(got) != 1 {
		t.Fatalf("after remove: %+v", got)
	}
	// A record that does not parse is reported by path; the rest is read.
	if err := os.WriteFile(filepath.Join(dir, identityDir, "bad.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err = ReadIdentities(dir)
	if err == nil || !strings.Contains(err.Error(), "bad.json") || len(got) != 1 {
		t.Fatalf("bad record: %+v, %v", got, err)
	}
	for _, id := range []string{"", "../x", ".hidden", "a/b"} {
		if err := WriteIdentity(dir, Identity{ContainerID: id}); err == nil || !strings.Contains(err.Error(), "container ID") {
			t.Errorf("container ID %q accepted: %v", id, err)
		}
	}
	// No directory: nothing to read or remove.
	if got, err := ReadIdentities(filepath.Join(dir, "none")); err != nil || len(got) != 0 {
		t.Fatalf("missing dir: %v %v", got, err)
	}
}
