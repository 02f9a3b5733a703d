package rules

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestRenderGolden renders every golden config with every backend's
// Render: nftables to testdata/nft/NAME.golden, both iptables flavours
// to testdata/ipt/NAME.golden (they write the same iptables-restore
// input). Run with -update to rewrite the files.
func TestRenderGolden(t *testing.T) {
	for _, tc := range goldenCases() {
		t.Run(tc.name, func(t *testing.T) {
			rs := goldenRuleset(t, tc.cfg)
			for _, name := range []BackendName{BackendNFTables, BackendIPTablesNFT, BackendIPTablesLegacy} {
				be, err := NewBackend(name, BackendOptions{})
				if err != nil {
					t.Fatal(err)
				}
				got, err := be.Render(rs)
				if err != nil {
					t.Fatalf("line %d: %s: render: %v", tc.line, name, err)
				}
				// The package-level renderers say the same, every time.
				dir, again := "ipt", RenderIPTables(rs)
				if name == BackendNFTables {
					dir, again = "nft", RenderNFT(rs)
				}
				if again != got {
					t.Errorf("line %d: %s: the package-level renderer differs from Render", tc.line, name)
				}
				path := filepath.Join("testdata", dir, tc.name+".golden")
				if updateGolden() {
					if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
						t.Fatal(err)
					}
					continue
				}
				want, err := os.ReadFile(path)
				if err != nil {
					t.Fatalf("line %d: %v (run with -update to create it)", tc.line, err)
				}
				if diff := cmp.Diff(string(want), got); diff != "" {
					t.Errorf("line %d: %s: %s differs (-want +got):\n%s", tc.line, name, path, diff)
				}
			}
		})
	}
}
