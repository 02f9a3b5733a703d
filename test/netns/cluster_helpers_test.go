//go:build linux

package netns_test

// The simulated cluster of cluster_test.go: an "internet" host, a
// "router", an app node and an egress node, each a network namespace of
// ours, with pods made by the real CNI chain on each node.
//
//	internet  eth0 203.0.113.10/24  2001:db8:ff::10/64      echo :8080 (tcp, udp)
//	   |
//	router    inet0 203.0.113.1/24  2001:db8:ff::1/64
//	          app0  192.0.2.1/30    2001:db8:a::1/64  -> 198.51.100.0/26, 2001:db8:1a::/64
//	          egr0  192.0.2.5/30    2001:db8:e::1/64  -> 198.51.100.64/26, 2001:db8:1e::/64
//	   |                  |
//	app node  uplink 192.0.2.2/30   egress node uplink 192.0.2.6/30
//	          cni0 198.51.100.1/26              cni0 198.51.100.65/26
//	               2001:db8:1a::1/64                 2001:db8:1e::1/64
//
// Every address is from a documentation range; nothing has a route to
// the machine's real network.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/nscore"
	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/internal/sim"
	"github.com/egress-cni/egress-cni/internal/simtest"
	"github.com/egress-cni/egress-cni/pkg/node"
)

var (
	inetIPv4     = netip.MustParseAddr("203.0.113.10")
	inetIPv6     = netip.MustParseAddr("2001:db8:ff::10")
	inetEchoPort = 8080
	// gatewayForwardPort is where the gateway pod's forwarder listens
	// (Istio's egress gateway uses 15443 for mTLS from sidecars).
	gatewayForwardPort = 15443
)

// clusterNode is one node namespace with its CNI chain.
type clusterNode struct {
	name       string
	ns         ns.NetNS
	chain      *chain
	uplink4    netip.Addr
	uplink6    netip.Addr
	nodeConfig string
	cfg        *node.Config
}

type cluster struct {
	t        *testing.T
	internet ns.NetNS
	router   ns.NetNS
	app      *clusterNode
	egress   *clusterNode
	net      *sim.Net
}

// clusterPodCIDRs etc. are what both nodes' configs allow.
const clusterAllow = `"podCIDRs": ["198.51.100.0/25", "2001:db8:1a::/64", "2001:db8:1e::/64"],
	"nodeCIDRs": ["192.0.2.0/29", "2001:db8:a::/64", "2001:db8:e::/64"]`

// newCluster builds the namespaces, links and routes (internal/sim's
// cluster network, through internal/simtest); nodes get a chain each but
// no node rules yet.
func newCluster(t *testing.T, binDir string) *cluster {
	t.Helper()
	w := simtest.Net(t, sim.NetOptions{CountPings: true})
	c := &cluster{t: t, internet: w.Internet, router: w.Router, net: w}
	nstest.ServeEcho(t, c.internet, ":"+strconv.Itoa(inetEchoPort))

	c.app = c.newNode(binDir, "app", "app0", 0, "198.51.100.0/26", "198.51.100.1", "2001:db8:1a::/64", "2001:db8:1a::1",
		`{"role": "app", `+clusterAllow+`}`)
	c.egress = c.newNode(binDir, "egress", "egr0", 4, "198.51.100.64/26", "198.51.100.65", "2001:db8:1e::/64", "2001:db8:1e::1",
		`{"role": "egress", "uplink": "uplink", "logDrops": true, `+clusterAllow+`}`)
	return c
}

// startCluster is the start of every cluster test: it skips without
// privileges, builds the reference plugins and egress-cni into binDir
// and the cluster on them. start is when it began, built how long the
// builds took.
func startCluster(t *testing.T) (c *cluster, binDir string, start time.Time, built time.Duration) {
	nstest.RequirePrivileged(t)
	start = time.Now()
	binDir = t.TempDir()
	buildReferencePlugins(t, binDir)
	buildEgressCNI(t, binDir)
	built = time.Since(start)
	return newCluster(t, binDir), binDir, start, built
}

// newNode makes a node on the cluster's network (simtest.WireNode: its
// uplink to the router at 192.0.2.(off+1/off+2)/30, routes both ways,
// forwarding on) and a CNI chain (bridge cni0 with a dual-stack
// host-local range, then egress-cni with nodeEnforcement). pluginExtra
// are extra members of egress-cni's object in the conflist (for example
// a gatewaySelector).
func (c *cluster) newNode(binDir, name, routerIf string, off byte, sub4, gw4, sub6, gw6, nodeConfig string, pluginExtra ...string) *clusterNode {
	t := c.t
	t.Helper()
	nn := simtest.WireNode(t, c.net, name, routerIf, off, sub4, sub6)
	n := &clusterNode{name: name, ns: nn.NS, nodeConfig: nodeConfig, uplink4: nn.Uplink4, uplink6: nn.Uplink6}
	var err error
	if n.cfg, err = node.Parse([]byte(nodeConfig)); err != nil {
		t.Fatalf("node config %s: %v", name, err)
	}

	extra := ""
	for _, e := range pluginExtra {
		extra += ", " + e
	}
	ch := &chain{t: t, binDir: binDir, node: n.ns, dir: t.TempDir(), cniVersion: "1.1.0"}
	ch.logFile = filepath.Join(ch.dir, "egress-cni.log")
	conflist := fmt.Sprintf(`{
  "cniVersion": "1.1.0",
  "name": "cluster-%s",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": false,
     "ipam": {"type": "host-local", "dataDir": %q,
              "ranges": [[{"subnet": %q, "gateway": %q}], [{"subnet": %q, "gateway": %q}]],
              "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}},
    {"type": "egress-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": true},
     "logFile": %q, "logLevel": "debug", "nodeEnforcement": true, "stateDir": %q%s}
  ]
}`, name, filepath.Join(ch.dir, "ipam"), sub4, gw4, sub6, gw6, ch.logFile, filepath.Join(ch.dir, "state"), extra)
	ch.list, err = libcni.ConfListFromBytes([]byte(conflist))
	if err != nil {
		t.Fatalf("bad conflist: %v\n%s", err, conflist)
	}
	ch.loopback, err = libcni.ConfFromBytes([]byte(`{"cniVersion": "1.1.0", "name": "cni-loopback", "type": "loopback"}`))
	if err != nil {
		t.Fatal(err)
	}
	ch.cni = libcni.NewCNIConfigWithCacheDir([]string{binDir}, filepath.Join(ch.dir, "cache"), nil)
	n.chain = ch
	return n
}

// in runs fn in the node namespace (pkg/node works on the current one).
func (n *clusterNode) in(fn func() error) error {
	return n.ns.Do(func(ns.NetNS) error { return fn() })
}

func (n *clusterNode) apply(t *testing.T) {
	t.Helper()
	if err := n.in(func() error { return node.Apply(n.cfg) }); err != nil {
		t.Fatalf("apply node rules on %s: %v", n.name, err)
	}
}

// counters reads the node's drop counters (zero when the rules are not
// applied).
func (n *clusterNode) counters(t *testing.T) node.Counters {
	t.Helper()
	c, err := inNodeNS(n, node.ReadCounters)
	if err != nil {
		return node.Counters{}
	}
	return c
}

// inNodeNS calls f in the node's namespace.
func inNodeNS[T any](n *clusterNode, f func() (T, error)) (T, error) {
	var v T
	err := n.in(func() error {
		var err error
		v, err = f()
		return err
	})
	return v, err
}

// pods lists the node's pod registrations.
func (n *clusterNode) pods(t *testing.T) []node.Pod {
	t.Helper()
	ps, err := inNodeNS(n, node.ListPods)
	if err != nil {
		t.Fatalf("list pod registrations on %s: %v", n.name, err)
	}
	return ps
}

// registration is the node's registration of container id, if any.
func (n *clusterNode) registration(t *testing.T, id string) (node.Pod, bool) {
	t.Helper()
	for _, p := range n.pods(t) {
		if p.ContainerID == id {
			return p, true
		}
	}
	return node.Pod{}, false
}

// withoutNodeRules runs fn with our node rules flushed (both tables'
// chains deleted; the tables, sets and so the pod registrations stay, so
// pods can still be added), then re-applies them and forgets the
// connections made meanwhile, so that none outlives the control. It is
// the "control" of a test: the same path, with nothing of ours in the
// way.
func (n *clusterNode) withoutNodeRules(t *testing.T, fn func()) {
	t.Helper()
	before := len(n.pods(t))
	nstest.DeleteChains(t, n.ns, "inet", node.Table)
	nstest.DeleteChains(t, n.ns, "bridge", node.Table)
	if got := len(n.pods(t)); got != before {
		t.Fatalf("%s: deleting the node rules' chains changed the pod registrations (%d -> %d)", n.name, before, got)
	}
	defer func() {
		n.apply(t)
		n.flushConntrack(t)
	}()
	fn()
}

// flushConntrack deletes every conntrack entry of the node, both
// families.
func (n *clusterNode) flushConntrack(t *testing.T) {
	t.Helper()
	if err := n.in(func() error {
		for _, f := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
			if _, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, f, matchAllFlows{}); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("flush conntrack on %s: %v", n.name, err)
	}
}

type matchAllFlows struct{}

func (matchAllFlows) MatchConntrackFlow(*netlink.ConntrackFlow) bool { return true }

func (n *clusterNode) gateways(t *testing.T) []node.Gateway {
	t.Helper()
	gws, err := inNodeNS(n, node.ListGateways)
	if err != nil {
		t.Fatalf("list gateways on %s: %v", n.name, err)
	}
	return gws
}

// clusterPod is a pod on a node, with the addresses the chain gave it.
type clusterPod struct {
	*pod
	node     *clusterNode
	ip4, ip6 netip.Addr
}

// newClusterPod makes the pod's namespace (DAD off, so its IPv6 address
// is usable at once).
func (n *clusterNode) newClusterPod(t *testing.T, namespace, name string, ann map[string]string) *clusterPod {
	t.Helper()
	p := newPod(t, namespace, name, ann)
	nstest.Sysctl(t, p.netns, "net.ipv6.conf.default.accept_dad", "0")
	nstest.Sysctl(t, p.netns, "net.ipv6.conf.all.accept_dad", "0")
	return &clusterPod{pod: p, node: n}
}

// add runs loopback and the chain for the pod, with extra CNI_ARGS (for
// example IP= for host-local).
func (n *clusterNode) add(p *clusterPod, extraArgs ...[2]string) error {
	rt := n.chain.rt(p.pod, p.path)
	rt.Args = append(rt.Args, extraArgs...)
	var res types.Result
	err := n.in(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := n.chain.cni.AddNetwork(ctx, n.chain.loopback, rt); err != nil {
			return fmt.Errorf("loopback: %w", err)
		}
		var err error
		res, err = n.chain.cni.AddNetworkList(ctx, n.chain.list, rt)
		return err
	})
	if err != nil {
		return err
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return err
	}
	for _, ip := range r.IPs {
		a, _ := netip.AddrFromSlice(ip.Address.IP)
		if a = a.Unmap(); a.Is4() {
			p.ip4 = a
		} else {
			p.ip6 = a
		}
	}
	return nil
}

func (n *clusterNode) mustAdd(t *testing.T, p *clusterPod, extraArgs ...[2]string) {
	t.Helper()
	if err := n.add(p, extraArgs...); err != nil {
		t.Fatalf("ADD %s/%s on %s: %v", p.namespace, p.name, n.name, err)
	}
}

// del runs the chain's DEL with the same CNI_ARGS as ADD (host-local
// releases by container ID).
func (n *clusterNode) del(p *clusterPod) error {
	return n.chain.del(p.pod, p.path)
}

// delPods runs DEL for each pod on its node; a failure is an error of
// the test.
func delPods(t *testing.T, pods ...*clusterPod) {
	t.Helper()
	for _, p := range pods {
		if err := p.node.del(p); err != nil {
			t.Errorf("DEL %s: %v", p.name, err)
		}
	}
}

// hostVeth is the name of the pod's host-side veth, read independently
// of the plugin: eth0's IFLA_LINK in the pod, resolved in the node.
func (n *clusterNode) hostVeth(t *testing.T, p *clusterPod) string {
	t.Helper()
	var idx int
	if err := p.netns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		idx = l.Attrs().ParentIndex
		return nil
	}); err != nil {
		t.Fatalf("pod %s: %v", p.name, err)
	}
	var name string
	if err := n.in(func() error {
		l, err := netlink.LinkByIndex(idx)
		if err != nil {
			return err
		}
		name = l.Attrs().Name
		return nil
	}); err != nil {
		t.Fatalf("host veth of %s: %v", p.name, err)
	}
	return name
}

// inetSeen reads how many packets to the echo port reached the internet
// host.
func (c *cluster) inetSeen(t *testing.T) uint64 {
	t.Helper()
	out := nstest.MustExec(t, c.internet, "nft", "list", "counter", "inet", "probe", "seen")
	_, rest, ok := strings.Cut(out, "packets")
	if !ok {
		t.Fatalf("counter without packets: %q", out)
	}
	f := append([]string{"packets"}, strings.Fields(rest)...)
	n, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		t.Fatalf("bad counter output %q", out)
	}
	return n
}

// relay copies both ways between a and b until either side is done, with
// a bounded lifetime.
func relay(a, b net.Conn) { nscore.Relay(a, b, 2*time.Second) }

// serveTCP listens on addr (IPv4) inside n and hands each connection to
// handle on its own goroutine; it stops in t.Cleanup.
func serveTCP(t *testing.T, n ns.NetNS, addr string, handle func(*net.TCPConn)) {
	t.Helper()
	serveTCPOn(t, n, "tcp4", addr, handle)
}

// serveTCPOn is serveTCP with a chosen network ("tcp" for dual stack).
func serveTCPOn(t *testing.T, n ns.NetNS, network, addr string, handle func(*net.TCPConn)) {
	t.Helper()
	l, err := nscore.Listen(n, network, addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := &nscore.Servers{}
	t.Cleanup(s.Close)
	s.Serve(l, 0, func(c net.Conn) { handle(c.(*net.TCPConn)) })
}

// dialIn connects from inside namespace n (the socket stays there).
func dialIn(n ns.NetNS, network, addr string) (net.Conn, error) {
	return nscore.DialIn(n, network, addr, 2*time.Second)
}

// serveSidecar stands in for the app pod's Envoy (on network and addr:
// "tcp4", "0.0.0.0:15001"; "tcp", ":15001" for dual stack): it reads the
// captured connection's original destination, gives it to record (if
// not nil) and hands it to the gateway pod's forwarder ("<ip:port>\n",
// then the bytes), as a sidecar sends external traffic to the egress
// gateway. Its connection to the gateway must not be captured again: the
// app pod excludes the forwarder's port (the real Envoy runs as UID 1337
// instead).
func serveSidecar(t *testing.T, p *clusterPod, network, addr string, gateway netip.AddrPort, record func(orig netip.AddrPort)) {
	t.Helper()
	serveTCPOn(t, p.netns, network, addr, func(c *net.TCPConn) {
		defer c.Close()
		orig, err := nstest.OriginalDst(c)
		if err != nil {
			return
		}
		orig = netip.AddrPortFrom(orig.Addr().Unmap(), orig.Port())
		if record != nil {
			record(orig)
		}
		up, err := dialIn(p.netns, "tcp4", gateway.String())
		if err != nil {
			return
		}
		if _, err := fmt.Fprintf(up, "%s\n", orig); err != nil {
			up.Close()
			return
		}
		relay(c, up)
	})
}

// serveForwarder stands in for the egress gateway: it reads the
// destination line and connects there from the gateway pod, over
// dialNetwork ("tcp4"; "tcp" also reaches IPv6 destinations).
func serveForwarder(t *testing.T, p *clusterPod, dialNetwork string) {
	t.Helper()
	serveTCP(t, p.netns, fmt.Sprintf("0.0.0.0:%d", gatewayForwardPort), func(c *net.TCPConn) {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return
		}
		dst, err := netip.ParseAddrPort(strings.TrimSpace(line))
		if err != nil {
			return
		}
		up, err := dialIn(p.netns, dialNetwork, dst.String())
		if err != nil {
			return
		}
		// Nothing else was buffered: the client sends nothing first.
		relay(c, up)
	})
}

// pingIn sends one ICMP (or ICMPv6) echo request from inside n to dst
// over a raw socket and waits up to timeout for the matching reply.
func pingIn(n ns.NetNS, dst netip.Addr, timeout time.Duration) error {
	return n.Do(func(ns.NetNS) error {
		fam, proto, typ, replyType := unix.AF_INET, unix.IPPROTO_ICMP, byte(8), byte(0)
		if dst.Is6() {
			fam, proto, typ, replyType = unix.AF_INET6, unix.IPPROTO_ICMPV6, 128, 129
		}
		fd, err := unix.Socket(fam, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: dst.As16()}
		if dst.Is4() {
			sa = &unix.SockaddrInet4{Addr: dst.As4()}
		}
		tv := unix.NsecToTimeval(timeout.Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		id := uint16(os.Getpid())
		msg := []byte{typ, 0, 0, 0, byte(id >> 8), byte(id), 0, 1, 'e', 'g', 'r', 'e', 's', 's'}
		if !dst.Is6() { // the kernel computes ICMPv6 checksums itself
			var sum uint32
			for i := 0; i < len(msg); i += 2 {
				sum += uint32(msg[i])<<8 | uint32(msg[i+1])
			}
			sum = (sum >> 16) + (sum & 0xffff)
			sum += sum >> 16
			msg[2], msg[3] = byte(^sum>>8), byte(^sum)
		}
		if err := unix.Sendto(fd, msg, 0, sa); err != nil {
			return err
		}
		deadline := time.Now().Add(timeout)
		buf := make([]byte, 1500)
		for time.Now().Before(deadline) {
			k, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				return err
			}
			b := buf[:k]
			if !dst.Is6() && len(b) > 20 {
				b = b[int(b[0]&0x0f)*4:] // IPv4 raw sockets see the IP header
			}
			if len(b) >= 8 && b[0] == replyType && b[4] == byte(id>>8) && b[5] == byte(id) {
				return nil
			}
		}
		return errors.New("no echo reply")
	})
}
