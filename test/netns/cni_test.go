//go:build linux

package netns_test

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/testutils"

	"github.com/egress-cni/egress-cni/internal/nstest"
)

// TestCNIChain runs egress-cni in a real CNI chain (loopback; bridge +
// host-local; egress-cni) through libcni, in node namespaces of ours.
// One top-level test builds the plugins once; each subtest has its own
// node.
func TestCNIChain(t *testing.T) {
	nstest.RequirePrivileged(t)
	binDir := t.TempDir()
	buildReferencePlugins(t, binDir)
	buildEgressCNI(t, binDir)

	for _, v := range []string{"0.4.0", "1.0.0", "1.1.0"} {
		for _, backend := range []string{"", "iptables-nft", "iptables-legacy"} {
			name := fmt.Sprintf("traffic/cni-%s/backend-%s", v, orAuto(backend))
			if v != "1.0.0" && backend != "" {
				continue // every backend once, every version once
			}
			t.Run(name, func(t *testing.T) { testTraffic(t, binDir, v, backend) })
		}
	}
	t.Run("add-twice", func(t *testing.T) { testAddTwice(t, binDir) })
	t.Run("check-tamper", func(t *testing.T) { testCheckTamper(t, binDir) })
	t.Run("del", func(t *testing.T) { testDel(t, binDir) })
	t.Run("skipped-pods", func(t *testing.T) { testSkippedPods(t, binDir) })
	t.Run("bad-annotation", func(t *testing.T) { testBadAnnotation(t, binDir) })
	t.Run("no-annotations-capability", func(t *testing.T) { testNoCapability(t, binDir) })
	for _, backend := range []string{"", "iptables-nft", "iptables-legacy"} {
		t.Run("parallel-30/backend-"+orAuto(backend), func(t *testing.T) { testParallel(t, binDir, 30, backend) })
	}
	t.Run("status-gc", func(t *testing.T) { testStatusGC(t, binDir) })
	t.Run("tproxy", func(t *testing.T) { testTPROXY(t, binDir) })
}

// testTPROXY: a pod annotated for TPROXY (refused by the plugin until it
// wrote the policy route) gets Istio's mangle rules and the route; an
// inbound connection from the node reaches the proxy's transparent
// listener on 15006 with its original destination as the local address
// and the node's address as the peer. CHECK covers the route, and DEL
// removes it.
func testTPROXY(t *testing.T, binDir string) {
	c := newChain(t, binDir, chainOptions{cniVersion: "1.0.0"})
	p := injectedPod(t, "tproxy", "sidecar.istio.io/interceptionMode", "TPROXY")
	serveTransparent(t, p.netns, 15006)
	res, err := current.NewResultFromResult(c.mustAdd(p))
	if err != nil || len(res.IPs) == 0 {
		t.Fatalf("result %v: %v", res, err)
	}
	// The pod's own address, and one it does not hold, which only the
	// policy route delivers (the node routes it to the pod).
	podIP, _ := netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
	far := "198.51.100.77"
	nstest.Route(t, c.node, netip.MustParsePrefix(far+"/32"), podIP)
	for _, dst := range []string{net.JoinHostPort(podIP.String(), "8080"), net.JoinHostPort(far, "80")} {
		line, err := dialFrom(t, c.node, dst)
		if err != nil {
			t.Fatalf("to %s: %v", dst, err)
		}
		if want := "local=" + dst + " remote=" + gatewayIP + ":"; !strings.HasPrefix(line, want) {
			t.Errorf("to %s: got %q, want the original destination and the node's source (%s...)", dst, line, want)
		}
	}
	if rules4, _ := nstest.Exec(p.netns, "ip", "-4", "rule", "list"); !strings.Contains(rules4, "fwmark 0x539 lookup 133") {
		t.Errorf("no policy rule fwmark 1337 lookup 133:\n%s", rules4)
	}
	if err := c.check(p); err != nil {
		t.Errorf("CHECK after ADD: %v", err)
	}
	nstest.MustExec(t, p.netns, "ip", "-4", "route", "flush", "table", "133")
	if err := c.check(p); err == nil || !strings.Contains(err.Error(), "table 133") {
		t.Errorf("CHECK without the route: %v, want drift naming table 133", err)
	}
	if err := c.del(p, p.path); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if rules4, _ := nstest.Exec(p.netns, "ip", "-4", "rule", "list"); strings.Contains(rules4, "lookup 133") {
		t.Errorf("DEL left the policy rule:\n%s", rules4)
	}
	assertNoneOurs(t, p)
}

func orAuto(b string) string {
	if b == "" {
		return "auto"
	}
	return b
}

func backendKey(b string) string {
	if b == "" {
		return ""
	}
	return fmt.Sprintf(`"backend": %q`, b)
}

// dialReply dials addr from the pod as uid and parses the server's reply.
func dialReply(t *testing.T, p *pod, uid uint32, addr string) nstest.Reply {
	t.Helper()
	line := nstest.MustDial(t, p.netns, uid, uid, "tcp4", addr)
	r, err := nstest.ParseReply(line)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// assertProxied says the app's connection to addr landed on the pod's
// proxy, which saw addr as the original destination.
func assertProxied(t *testing.T, p *pod, addr string) {
	t.Helper()
	r := dialReply(t, p, cniAppUID, addr)
	if r.Kind != nstest.KindProxy || r.Port != 15001 || r.Orig != netip.MustParseAddrPort(addr) {
		t.Errorf("pod %s, app UID %d to %s: got %+v, want the proxy on 15001 with orig=%s", p.name, cniAppUID, addr, r, addr)
	}
}

// assertDirect says uid's connection to addr reached the real server.
func assertDirect(t *testing.T, p *pod, uid uint32, addr string) {
	t.Helper()
	r := dialReply(t, p, uid, addr)
	if r.Kind != nstest.KindDirect || r.Dst != netip.MustParseAddrPort(addr) {
		t.Errorf("pod %s, UID %d to %s: got %+v, want a direct connection", p.name, uid, addr, r)
	}
}

func testTraffic(t *testing.T, binDir, cniVersion, backend string) {
	c := newChain(t, binDir, chainOptions{cniVersion: cniVersion, egress: backendKey(backend)})
	internet := net.JoinHostPort(internetIP, echoPort)
	gateway := net.JoinHostPort(gatewayIP, echoPort)

	web := injectedPod(t, "web")
	nstest.ServeProxy(t, web.netns, 15001)
	res := c.mustAdd(web)
	if res.Version() != cniVersion {
		t.Errorf("result version %s, want %s", res.Version(), cniVersion)
	}
	if !strings.Contains(fmt.Sprint(res), "198.51.100.") {
		t.Errorf("result lacks the bridge's IP: %v", res)
	}
	assertProxied(t, web, internet)
	assertProxied(t, web, gateway)
	assertDirect(t, web, cniProxyUID, internet)

	// A pod whose annotation excludes the internet address.
	ex := injectedPod(t, "excluded", "traffic.sidecar.istio.io/excludeOutboundIPRanges", internetIP+"/32")
	nstest.ServeProxy(t, ex.netns, 15001)
	c.mustAdd(ex)
	assertDirect(t, ex, cniAppUID, internet)
	assertProxied(t, ex, gateway)

	for _, p := range []*pod{web, ex} {
		if err := c.check(p); err != nil {
			t.Errorf("CHECK %s: %v", p.name, err)
		}
	}
	recs := c.logRecords(web)
	var found bool
	for _, r := range recs {
		if r["cmd"] == "ADD" && r["decision"] == "captured" && r["backend"] != "" && r["duration"] != nil {
			found = true
			if backend != "" && r["backend"] != backend {
				t.Errorf("logged backend %v, want %s", r["backend"], backend)
			}
		}
	}
	if !found {
		t.Errorf("no ADD record with decision and backend for web: %v", recs)
	}
	for _, p := range []*pod{web, ex} {
		if err := c.del(p, p.path); err != nil {
			t.Errorf("DEL %s: %v", p.name, err)
		}
		assertNoneOurs(t, p)
	}
}

func testAddTwice(t *testing.T, binDir string) {
	c := newChain(t, binDir, chainOptions{})
	p := injectedPod(t, "twice", "traffic.sidecar.istio.io/excludeOutboundIPRanges", "192.0.2.0/24,2001:db8::/32")
	c.mustAdd(p)
	first := nstest.DumpAll(t, p.netns)
	if !strings.Contains(first, "table inet egress_cni") {
		t.Fatalf("no egress_cni table after ADD:\n%s", first)
	}
	// The runtime may repeat the plugin's ADD with the same prevResult.
	if _, err := c.execEgress(p, "ADD", c.cachedResult(p)); err != nil {
		t.Fatalf("second ADD: %v", err)
	}
	if second := nstest.DumpAll(t, p.netns); second != first {
		t.Errorf("second ADD changed the state:\n--- first\n%s\n--- second\n%s", first, second)
	}
	if err := c.check(p); err != nil {
		t.Errorf("CHECK after second ADD: %v", err)
	}
	if err := c.del(p, p.path); err != nil {
		t.Error(err)
	}
}

func testCheckTamper(t *testing.T, binDir string) {
	c := newChain(t, binDir, chainOptions{})
	p := injectedPod(t, "tamper")
	c.mustAdd(p)
	if err := c.check(p); err != nil {
		t.Fatalf("CHECK right after ADD: %v", err)
	}
	// A NET_ADMIN container flushes its own capture.
	nstest.MustExec(t, p.netns, "nft", "flush", "chain", "inet", "egress_cni", "ISTIO_OUTPUT")
	err := c.check(p)
	if err == nil {
		t.Fatal("CHECK passed after the ISTIO_OUTPUT chain was flushed")
	}
	te := cniError(t, err)
	for _, s := range []string{"team-a/tamper", "drift", "missing", "ISTIO_OUTPUT"} {
		if !strings.Contains(te.Msg, s) {
			t.Errorf("CHECK error %q does not mention %q", te.Msg, s)
		}
	}
	t.Logf("CHECK after tampering: code %d: %s", te.Code, te.Msg)
	// ADD again repairs it.
	if _, err := c.execEgress(p, "ADD", c.cachedResult(p)); err != nil {
		t.Fatal(err)
	}
	if err := c.check(p); err != nil {
		t.Errorf("CHECK after repair: %v", err)
	}
	// An extra rule in our table is drift too.
	nstest.MustExec(t, p.netns, "nft", "insert", "rule", "inet", "egress_cni", "ISTIO_OUTPUT", "meta", "skuid", "1000", "return")
	if err := c.check(p); err == nil {
		t.Error("CHECK passed with a rule inserted into ISTIO_OUTPUT")
	}
	if err := c.del(p, p.path); err != nil {
		t.Error(err)
	}
	// CHECK after DEL fails: the rules are gone (so is the veth).
	if err := c.check(p); err == nil {
		t.Error("CHECK passed after DEL")
	}
}

func testDel(t *testing.T, binDir string) {
	c := newChain(t, binDir, chainOptions{})

	// DEL twice.
	p := injectedPod(t, "deltwice")
	c.mustAdd(p)
	for i := range 2 {
		if err := c.del(p, p.path); err != nil {
			t.Fatalf("DEL #%d: %v", i+1, err)
		}
	}
	if got := nstest.DumpAll(t, p.netns); got != pristineDump(t) {
		t.Errorf("DEL left rules:\n%s", got)
	}

	// DEL with CNI_NETNS="" (containerd's rmp of a sandbox whose netns
	// is gone), and no prevResult.
	p2 := injectedPod(t, "delnonetns")
	c.mustAdd(p2)
	if err := c.del(p2, ""); err != nil {
		t.Errorf("DEL with empty netns: %v", err)
	}
	if _, err := c.execEgress(p2, "DEL", nil); err != nil {
		t.Errorf("egress-cni DEL without prevResult: %v", err)
	}

	// DEL after the namespace is deleted.
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	gone := &pod{namespace: "team-a", name: "gone", id: "c-gone", netns: n, path: n.Path(),
		annotations: map[string]string{"sidecar.istio.io/status": statusAnnotation}}
	var once sync.Once
	remove := func() {
		once.Do(func() {
			if err := n.Close(); err != nil {
				t.Errorf("close netns: %v", err)
			}
			if err := testutils.UnmountNS(n); err != nil {
				t.Errorf("unmount netns: %v", err)
			}
		})
	}
	t.Cleanup(remove)
	c.mustAdd(gone)
	remove()
	// ADD into a namespace that is gone: a clear error, code 3.
	_, err = c.execEgress(gone, "ADD", c.cachedResult(gone))
	if te := cniError(t, err); te.Code != types.ErrUnknownContainer || !strings.Contains(te.Msg, "team-a/gone") ||
		!strings.Contains(te.Msg, "does not exist") {
		t.Errorf("ADD into a deleted namespace: code %d: %s", te.Code, te.Msg)
	}
	for i := range 2 {
		if err := c.del(gone, gone.path); err != nil {
			t.Errorf("DEL #%d after the namespace was deleted: %v", i+1, err)
		}
	}
}

func testSkippedPods(t *testing.T, binDir string) {
	c := newChain(t, binDir, chainOptions{})
	for _, p := range []*pod{
		newPod(t, "kube-system", "coredns", map[string]string{"sidecar.istio.io/status": statusAnnotation}),
		newPod(t, "team-a", "plain", map[string]string{"app": "plain"}),
		newPod(t, "team-a", "noinject", map[string]string{"sidecar.istio.io/status": statusAnnotation, "sidecar.istio.io/inject": "false"}),
		newPod(t, "team-a", "none", map[string]string{"sidecar.istio.io/status": statusAnnotation, "sidecar.istio.io/interceptionMode": "NONE"}),
		newPod(t, "team-a", "nil-annotations", nil),
	} {
		t.Run(p.name, func(t *testing.T) {
			nstest.ServeProxy(t, p.netns, 15001)
			c.mustAdd(p)
			if got := nstest.DumpAll(t, p.netns); got != pristineDump(t) {
				t.Errorf("skipped pod got rules:\n%s", got)
			}
			assertDirect(t, p, cniAppUID, net.JoinHostPort(internetIP, echoPort))
			if err := c.check(p); err != nil {
				t.Errorf("CHECK of a skipped pod: %v", err)
			}
			var skipped bool
			for _, r := range c.logRecords(p) {
				if r["cmd"] == "ADD" && r["decision"] == "skipped" && r["reason"] != "" {
					skipped = true
				}
			}
			if !skipped {
				t.Errorf("no skipped ADD record: %v", c.logRecords(p))
			}
			// Rules of ours in a pod we do not capture are drift,
			// whichever backend wrote them.
			if want := map[string][2]string{
				"plain":    {"nftables", "table egress_cni"},
				"noinject": {"iptables-nft", "iptables-nft-save: -A OUTPUT"},
				"none":     {"iptables-legacy", "iptables-legacy-save: -A OUTPUT"},
			}[p.name]; want != [2]string{} {
				injected := *p
				injected.annotations = map[string]string{"sidecar.istio.io/status": statusAnnotation}
				if _, err := c.execEgressWith(&injected, "ADD", c.cachedResult(p), map[string]interface{}{"backend": want[0]}); err != nil {
					t.Fatal(err)
				}
				err := c.check(p)
				if err == nil || !strings.Contains(err.Error(), "is not captured") || !strings.Contains(err.Error(), want[1]) {
					t.Errorf("CHECK of a skipped pod holding %s rules: %v", want[0], err)
				}
			}
			if err := c.del(p, p.path); err != nil {
				t.Error(err)
			}
			assertNoneOurs(t, p)
		})
	}
}

func testBadAnnotation(t *testing.T, binDir string) {
	c := newChain(t, binDir, chainOptions{})
	const bad = "10.0.0.0/8,10.1.2.300/32"
	p := injectedPod(t, "bad", "traffic.sidecar.istio.io/excludeOutboundIPRanges", bad)
	_, err := c.add(p)
	if err == nil {
		t.Fatal("ADD accepted a bad annotation")
	}
	te := cniError(t, err)
	if te.Code != types.ErrInvalidNetworkConfig {
		t.Errorf("code %d, want %d", te.Code, types.ErrInvalidNetworkConfig)
	}
	for _, s := range []string{"team-a/bad", "traffic.sidecar.istio.io/excludeOutboundIPRanges", bad, "10.1.2.300/32"} {
		if !strings.Contains(te.Msg, s) {
			t.Errorf("error %q does not mention %q", te.Msg, s)
		}
	}
	t.Logf("ADD error: code %d: %s", te.Code, te.Msg)
	if got := nstest.DumpAll(t, p.netns); got != pristineDump(t) {
		t.Errorf("failed ADD touched the namespace:\n%s", got)
	}
	// The runtime cleans up after a failed ADD.
	if err := c.del(p, p.path); err != nil {
		t.Error(err)
	}

	// A bad config key fails every ADD with code 7 as well.
	c2 := newChain(t, binDir, chainOptions{egress: `"proxyPort": 99999`})
	p2 := injectedPod(t, "badconf")
	_, err = c2.add(p2)
	if te := cniError(t, err); te.Code != types.ErrInvalidNetworkConfig || !strings.Contains(te.Msg, "proxyPort") {
		t.Errorf("bad config: code %d %q", te.Code, te.Msg)
	}
	_ = c2.del(p2, p2.path)
}

func testParallel(t *testing.T, binDir string, n int, backend string) {
	c := newChain(t, binDir, chainOptions{egress: backendKey(backend)})
	pods := make([]*pod, n)
	for i := range pods {
		ann := []string{}
		if i%3 == 1 {
			ann = []string{"traffic.sidecar.istio.io/excludeOutboundIPRanges", internetIP + "/32"}
		}
		pods[i] = injectedPod(t, fmt.Sprintf("par-%02d", i), ann...)
		nstest.ServeProxy(t, pods[i].netns, 15001)
	}
	// On a real node the bridge exists long before a burst of pods. The
	// bridge plugin pins the bridge's MAC only after it has created it,
	// so pods that race its creation can record a MAC that changes under
	// them (its CHECK then fails): create it with one pod first.
	warm := injectedPod(t, "par-warm")
	c.mustAdd(warm)
	defer func() {
		if err := c.del(warm, warm.path); err != nil {
			t.Error(err)
		}
	}()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = c.add(p)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("parallel ADD %s: %v", pods[i].name, err)
		}
	}
	if t.Failed() {
		return
	}
	internet := net.JoinHostPort(internetIP, echoPort)
	for i, p := range pods {
		if err := c.check(p); err != nil {
			t.Errorf("CHECK %s: %v", p.name, err)
		}
		if i%3 == 1 {
			assertDirect(t, p, cniAppUID, internet)
		} else {
			assertProxied(t, p, internet)
		}
		if i%5 == 0 {
			assertDirect(t, p, cniProxyUID, internet)
		}
	}
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = c.del(p, p.path)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("parallel DEL %s: %v", pods[i].name, err)
		}
	}
}

func testStatusGC(t *testing.T, binDir string) {
	c := newChain(t, binDir, chainOptions{cniVersion: "1.1.0"})
	p := injectedPod(t, "gc")
	c.mustAdd(p)
	err := c.inNode(func() error { return c.cni.GetStatusNetworkList(t.Context(), c.list) })
	if err != nil {
		t.Errorf("STATUS: %v", err)
	}
	// GC with the pod still valid must leave its rules alone.
	before := nstest.DumpAll(t, p.netns)
	err = c.inNode(func() error {
		return c.cni.GCNetworkList(t.Context(), c.list, &libcni.GCArgs{
			ValidAttachments: []types.GCAttachment{{ContainerID: p.id, IfName: "eth0"}},
		})
	})
	if err != nil {
		t.Errorf("GC: %v", err)
	}
	if after := nstest.DumpAll(t, p.netns); after != before {
		t.Errorf("GC changed a valid pod's rules")
	}
	if err := c.check(p); err != nil {
		t.Errorf("CHECK after GC: %v", err)
	}
	if err := c.del(p, p.path); err != nil {
		t.Error(err)
	}
}

// Without the capability the runtime delivers no annotations: an app pod
// is refused (fail closed) and left untouched; kube-system still starts.
func testNoCapability(t *testing.T, binDir string) {
	c := newChain(t, binDir, chainOptions{noCapability: true})
	p := injectedPod(t, "nocap")
	_, err := c.add(p)
	if err == nil {
		t.Fatal("ADD succeeded without annotations")
	}
	te := cniError(t, err)
	if te.Code != types.ErrInvalidNetworkConfig || !strings.Contains(te.Msg, "team-a/nocap") ||
		!strings.Contains(te.Msg, "io.kubernetes.cri.pod-annotations") {
		t.Errorf("code %d: %s", te.Code, te.Msg)
	}
	if got := nstest.DumpAll(t, p.netns); got != pristineDump(t) {
		t.Errorf("failed ADD touched the namespace:\n%s", got)
	}
	if err := c.del(p, p.path); err != nil {
		t.Error(err)
	}
	sys := newPod(t, "kube-system", "coredns", nil)
	c.mustAdd(sys)
	if err := c.del(sys, sys.path); err != nil {
		t.Error(err)
	}
}
