package bench

import (
	"strings"
	"testing"
	"time"
)

func TestSummarize(t *testing.T) {
	var s []time.Duration
	for i := 100; i >= 1; i-- {
		s = append(s, time.Duration(i)*time.Millisecond)
	}
	st := summarize(s)
	if st.N != 100 || st.Min != time.Millisecond || st.Max != 100*time.Millisecond {
		t.Errorf("n/min/max = %d/%v/%v", st.N, st.Min, st.Max)
	}
	if st.P50 != 50*time.Millisecond || st.P99 != 99*time.Millisecond {
		t.Errorf("p50/p99 = %v/%v, want nearest rank 50ms/99ms", st.P50, st.P99)
	}
	if st.Median != 50500*time.Microsecond {
		t.Errorf("median = %v, want 50.5ms (mean of the middle two)", st.Median)
	}
	if (summarize(nil) != Stats{}) {
		t.Error("empty samples must give zero stats")
	}
}

func TestExcludedCIDRsDoNotMerge(t *testing.T) {
	c := excludedCIDRs(3)
	if strings.Join(c, ",") != "10.0.0.0/32,10.0.0.2/32,10.0.0.4/32" {
		t.Errorf("got %v", c)
	}
	// 10,000 bare addresses must fit one argv string (128 KiB).
	var n int
	for _, s := range excludedCIDRs(10000) {
		n += len(strings.TrimSuffix(s, "/32")) + 1
	}
	if n >= 128<<10 {
		t.Errorf("-x list of 10000 is %d bytes, over MAX_ARG_STRLEN", n)
	}
}

func TestIPTFloorFile(t *testing.T) {
	got := iptFloorFile([]string{"10.0.0.0/32"})
	want := `*nat
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 10.0.0.0/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
`
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

func TestAppliedIn(t *testing.T) {
	if d := appliedIn([]byte("egress-init: backend=nftables applied in 1.758ms\n")); d != 1758*time.Microsecond {
		t.Errorf("got %v", d)
	}
	if d := appliedIn([]byte("nothing here")); d != 0 {
		t.Errorf("got %v", d)
	}
}

// TestEvaluate checks the verdicts at and around each limit, from
// numbers, never from text.
func TestEvaluate(t *testing.T) {
	st := func(med time.Duration) Stats { return Stats{N: 1, Median: med, P50: med, P99: med} }
	res := &Results{Settings: Config{ApplyNs: []int{0}}}
	res.Apply = []ApplyRow{
		{Backend: "nftables", N: 0, Stats: st(12 * time.Millisecond)},
		{Backend: "nftables", Floor: true, N: 0, Stats: st(10 * time.Millisecond)},
		{Backend: "iptables-nft", N: 0, Stats: st(14 * time.Millisecond)},
		{Backend: "iptables-nft", Floor: true, N: 0, Stats: st(10 * time.Millisecond)},
		// A diagnostic row must never be judged.
		{Variant: "iptables-nft with GOGC=off (diagnostic)", Backend: "iptables-nft", Diag: true, N: 0, Stats: st(1 * time.Millisecond)},
	}
	res.CNI = &CNIResult{Floor: st(10 * time.Millisecond), Rows: []CNIRow{{Backend: "nftables",
		Add: Stats{N: 1, P50: 15 * time.Millisecond, P99: 31 * time.Millisecond}}}}
	res.Memory = []MemRow{{Backend: "nftables", Plugin: true, KiB: 29296}}
	res.Data = []DataRow{{Backend: "nftables", N: 0, Rate: 1000}, {Backend: "nftables", N: 10000, Rate: 899}}
	got := map[string]bool{}
	for _, tg := range evaluate(res) {
		got[tg.Name] = tg.Pass
	}
	want := map[string]bool{
		"egress-init apply, nftables, N=0: median / nftfloor (1 netlink batch) median": true,  // 1.2x
		"egress-init apply, iptables-nft, N=0: median / iptables-nft-restore median":   false, // 1.4x
		"CNI ADD p50 (nftables) / nftfloor N=0 median":                                 true,  // 1.5x
		"CNI ADD p99 (nftables) / nftfloor N=0 median":                                 false, // 3.1x
		"egress-cni ADD peak RSS (nftables), N=10000":                                  true,  // 29296 KiB < 30 MB
		"data plane (nftables): conn/s at N=10000 / at N=0":                            false, // 89.9%
	}
	for name, pass := range want {
		p, ok := got[name]
		if !ok {
			t.Errorf("target %q missing; have %v", name, got)
			continue
		}
		if p != pass {
			t.Errorf("%s: pass=%v, want %v", name, p, pass)
		}
	}
	if len(got) != len(want) {
		t.Errorf("got %d targets, want %d: %v", len(got), len(want), got)
	}
	res.Targets = evaluate(res)
	md := Markdown(res)
	for _, s := range []string{"| **PASS** |", "| **MISS** |", "with GOGC=off (diagnostic)"} {
		if !strings.Contains(md, s) {
			t.Errorf("report lacks %q", s)
		}
	}
}
