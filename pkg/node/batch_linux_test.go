package node

import (
	"encoding/json"
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// TestApplyBatchBytes applies node rules with a large allow list (6,000
// IPv4 and 3,000 IPv6 host routes that do not merge) through the nftConn
// seam into a rules.NFTRecorder, without root, and reads the batch back
// from its bytes: one batch, every element of both allow sets in order,
// and a size that fits the socket buffer Apply asked for. The node
// layer's batch was once cut short; a truncated element list, an element
// attribute past 64 KiB or a socket sized too small fails this test.
func TestApplyBatchBytes(t *testing.T) {
	for _, role := range []Role{RoleApp, RoleEgress} {
		t.Run(string(role), func(t *testing.T) {
			var allow []string
			for i := range 6000 {
				v := 2 * i
				allow = append(allow, fmt.Sprintf("10.100.%d.%d/32", v>>8, v&0xff))
			}
			for i := range 3000 {
				allow = append(allow, fmt.Sprintf("2001:db8::%x/128", 2*i))
			}
			conf := map[string]any{"role": role, "podCIDRs": []string{"10.244.0.0/16"}, "allow": allow}
			if role == RoleEgress {
				conf["uplink"] = "eth0"
			}
			js, err := json.Marshal(conf)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := Parse(js)
			if err != nil {
				t.Fatal(err)
			}
			r := &rules.NFTRecorder{}
			defer func(old func(int) (*nftables.Conn, error)) { nftConn = old }(nftConn)
			nftConn = r.Conn
			if err := Apply(cfg); err != nil {
				t.Fatal(err)
			}
			bs := r.Batches()
			if len(bs) != 1 {
				t.Fatalf("Apply sent %d batches, want 1", len(bs))
			}
			b := bs[0]
			got, err := b.Elements()
			if err != nil {
				t.Fatalf("the batch does not decode: %v", err)
			}
			p := newProgram(cfg)
			total := 0
			for _, s := range p.sets {
				if !s.static {
					continue
				}
				want := rules.NFTElementKeys(p.allowElements(s))
				total += len(want)
				k := rules.NFTSetKey(s.set())
				if diff := cmp.Diff(want, got[k]); diff != "" {
					t.Errorf("set %s: %d elements sent, want %d (-want +got):\n%.2000s", k, len(got[k]), len(want), diff)
				}
			}
			if total < 9000 {
				t.Fatalf("only %d allow elements: the allow list merged", total)
			}
			if !b.Fits() {
				t.Errorf("the batch is %d bytes; a socket for the hint %d holds less", b.Bytes(), b.SockBuf)
			}
			t.Logf("%d messages, %d bytes, %d allow elements, socket hint %d", len(b.Messages), b.Bytes(), total, b.SockBuf)
		})
	}
}
