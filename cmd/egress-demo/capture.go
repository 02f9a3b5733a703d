package main

// The per-backend capture demo (-capture-backends): a pod and a "world"
// namespace joined by a veth pair, egress-init with Istio's injector
// arguments run in the pod for each backend, real traffic, and a table.
// This is the pod layer alone; the default run (main.go) is the cluster.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/sockopt"
)

// Addresses: documentation ranges only.
const (
	podV4, worldV4 = "192.0.2.2", "192.0.2.1"
	podV6, worldV6 = "2001:db8:1::2", "2001:db8:1::1"
	inetV4, inetV6 = "203.0.113.10", "2001:db8:2::10"
	excludedV4     = "198.51.100.10"
)

type cleanup []func()

func (c *cleanup) add(f func()) { *c = append(*c, f) }
func (c *cleanup) run() {
	for i := len(*c) - 1; i >= 0; i-- {
		(*c)[i]()
	}
}

func runCaptureBackends(ctx context.Context, initBin string) (bool, error) {
	var cl cleanup
	defer cl.run()

	initBin, err := filepath.Abs(initBin)
	if err != nil {
		return false, err
	}
	if _, err := os.Stat(initBin); err != nil {
		return false, fmt.Errorf("egress-init binary: %w (run `make build`)", err)
	}
	self, err := worldExecutable()
	if err != nil {
		return false, err
	}
	cl.add(func() { os.RemoveAll(filepath.Dir(self)) })

	w := tabwriter.NewWriter(os.Stdout, 2, 0, 2, ' ', 0)
	fmt.Fprintln(w, "BACKEND\tPATH\tEXPECTED\tSEEN\tOK")
	allOK := true
	for _, backend := range []string{"nftables", "iptables-nft", "iptables-legacy"} {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		rows, err := captureScenario(ctx, initBin, self, backend)
		if err != nil {
			return false, fmt.Errorf("backend %s: %w", backend, err)
		}
		for _, r := range rows {
			mark := "yes"
			if !r.ok() {
				mark, allOK = "NO", false
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", backend, r.path, r.want, r.seen, mark)
		}
	}
	w.Flush()
	return allOK, nil
}

type row struct{ path, want, seen string }

func (r row) ok() bool { return strings.HasPrefix(r.seen, r.want) }

// captureScenario builds a fresh pod and world, applies the rules with egress-init
// and runs the traffic.
func captureScenario(ctx context.Context, initBin, self, backend string) ([]row, error) {
	var cl cleanup
	defer cl.run()
	pod, err := newNS(&cl)
	if err != nil {
		return nil, err
	}
	world, err := newNS(&cl)
	if err != nil {
		return nil, err
	}
	if err := wire(pod, world); err != nil {
		return nil, fmt.Errorf("could not wire the namespaces: %w", err)
	}
	// Servers: in the pod, the sidecar stand-in (15001, 15006) and an app
	// on 8080 and 15021; in the world, the "internet" echo.
	for _, l := range []struct {
		n    ns.NetNS
		addr string
		tag  string
	}{
		{pod, ":15001", "redirected to proxy 15001"},
		{pod, ":15006", "redirected to inbound 15006"},
		{pod, ":8080", "direct to app"},
		{pod, ":15021", "direct to app"},
		{world, ":80", "direct"},
	} {
		stopFn, err := serve(l.n, l.addr, l.tag)
		if err != nil {
			return nil, err
		}
		cl.add(stopFn)
	}
	args := []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", excludedV4 + "/32",
		"-b", "*", "-d", "15090,15021,15020", "--backend", backend, "--netns", pod.Path()}
	cmd := exec.CommandContext(ctx, initBin, args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("egress-init %s: %v: %s", strings.Join(args, " "), err, out)
	}
	dial := func(uid uint32, addr string) string {
		out, err := runClient(ctx, pod, self, uid, addr)
		if err != nil {
			return "error: " + err.Error()
		}
		return out
	}
	inbound := func(addr string) string {
		var s string
		_ = world.Do(func(ns.NetNS) error { s = fetch(addr); return nil })
		return s
	}
	return []row{
		{"app uid 1000 -> " + inetV4 + ":80", "redirected to proxy 15001 (orig " + inetV4 + ":80)", dial(1000, inetV4+":80")},
		{"app uid 1000 -> [" + inetV6 + "]:80", "redirected to proxy 15001 (orig [" + inetV6 + "]:80)", dial(1000, "["+inetV6+"]:80")},
		{"proxy uid 1337 -> " + inetV4 + ":80", "direct", dial(1337, inetV4+":80")},
		{"app uid 1000 -> excluded " + excludedV4 + ":80", "direct", dial(1000, excludedV4+":80")},
		{"app uid 1000 -> 127.0.0.1:8080", "direct to app", dial(1000, "127.0.0.1:8080")},
		{"world -> pod " + podV4 + ":8080", "redirected to inbound 15006 (orig " + podV4 + ":8080)", inbound(podV4 + ":8080")},
		{"world -> pod " + podV4 + ":15021 (excluded)", "direct to app", inbound(podV4 + ":15021")},
	}, nil
}

func newNS(cl *cleanup) (ns.NetNS, error) {
	n, err := testutils.NewNS()
	if err != nil {
		return nil, fmt.Errorf("could not create a network namespace: %w", err)
	}
	cl.add(func() { n.Close(); _ = testutils.UnmountNS(n) })
	err = n.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	return n, err
}

// wire joins pod and world with a veth pair, puts the "internet" addresses
// on the world's loopback and routes the pod's default through the world.
// Neither namespace has any link to the machine's real network.
func wire(pod, world ns.NetNS) error {
	return world.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "world0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(pod.Fd()))}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		if err := setup("world0", []string{worldV4 + "/24", worldV6 + "/64"}, nil); err != nil {
			return err
		}
		if err := setup("lo", []string{inetV4 + "/32", inetV6 + "/128", excludedV4 + "/32"}, nil); err != nil {
			return err
		}
		return pod.Do(func(ns.NetNS) error {
			return setup("eth0", []string{podV4 + "/24", podV6 + "/64"}, []string{worldV4, worldV6})
		})
	})
}

func setup(link string, addrs, gateways []string) error {
	l, err := netlink.LinkByName(link)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		addr, err := netlink.ParseAddr(a)
		if err != nil {
			return err
		}
		addr.Flags = unix.IFA_F_NODAD
		if err := netlink.AddrAdd(l, addr); err != nil {
			return fmt.Errorf("add %s to %s: %w", a, link, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return err
	}
	for _, g := range gateways {
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.ParseIP(g)}); err != nil {
			return fmt.Errorf("default route via %s: %w", g, err)
		}
	}
	return nil
}

// serve listens in n (the socket stays in n after Do returns) and answers
// each connection with tag and, for redirected connections, the original
// destination read with SO_ORIGINAL_DST.
func serve(n ns.NetNS, addr, tag string) (func(), error) {
	var l net.Listener
	err := n.Do(func(ns.NetNS) (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				msg := tag
				if strings.HasPrefix(tag, "redirected") {
					msg += " (orig " + origDst(c.(*net.TCPConn)) + ")"
				}
				_ = c.SetDeadline(time.Now().Add(2 * time.Second))
				fmt.Fprintln(c, msg)
			}()
		}
	}()
	return func() { l.Close() }, nil
}

// origDst reads the pre-NAT destination of a redirected connection.
func origDst(c *net.TCPConn) string {
	ap, err := sockopt.OriginalDst(c)
	if err != nil {
		return "? " + err.Error()
	}
	return ap.String()
}

func fetch(addr string) string {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "error: " + err.Error()
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "error: " + err.Error()
	}
	return strings.TrimSpace(line)
}

func client(addr string) int {
	fmt.Println(fetch(addr))
	return 0
}

// runClient runs this binary's client mode as uid (and gid = uid) inside
// the pod, so the owner match sees a real process of that identity.
func runClient(ctx context.Context, pod ns.NetNS, self string, uid uint32, addr string) (string, error) {
	var out []byte
	err := pod.Do(func(ns.NetNS) error {
		// The child inherits the namespace of this locked thread.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		cmd := exec.CommandContext(cctx, self, "client", addr)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		var err error
		out, err = cmd.Output()
		return err
	})
	return strings.TrimSpace(string(out)), err
}

// worldExecutable copies this binary to a world-readable temporary
// directory, so that clients running as an unprivileged UID can execute it
// (go run builds into a 0700 directory).
func worldExecutable() (string, error) {
	src, err := os.Executable()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "egress-demo-")
	if err != nil {
		return "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return "", err
	}
	dst := filepath.Join(dir, "egress-demo")
	return dst, os.WriteFile(dst, data, 0o755)
}
