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
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nscore"
)

// Addresses (nscore.WirePod's, and an excluded one on the world's
// loopback too): documentation ranges only.
var (
	podV4          = nscore.PodIPv4.String()
	inetV4, inetV6 = nscore.InternetIPv4.String(), nscore.InternetIPv6.String()
	excludedV4     = "198.51.100.10"
)

func runCaptureBackends(ctx context.Context, initBin string) (bool, error) {
	cl := &nscore.Cleanups{}
	defer cl.Run()

	initBin, err := filepath.Abs(initBin)
	if err != nil {
		return false, err
	}
	if _, err := os.Stat(initBin); err != nil {
		return false, fmt.Errorf("egress-init binary: %w (run `make build`)", err)
	}
	// A copy any UID can execute (go run builds into a 0700 directory).
	self, dir, err := nscore.CopyExecutable("egress-demo-", "egress-demo")
	if dir != "" {
		cl.Push(func() { os.RemoveAll(dir) })
	}
	if err != nil {
		return false, err
	}

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
	cl := &nscore.Cleanups{}
	defer cl.Run()
	pod, err := newNS(cl)
	if err != nil {
		return nil, err
	}
	world, err := newNS(cl)
	if err != nil {
		return nil, err
	}
	if err := wire(pod, world); err != nil {
		return nil, fmt.Errorf("could not wire the namespaces: %w", err)
	}
	// Servers: in the pod, the sidecar stand-in (15001, 15006) and an app
	// on 8080 and 15021; in the world, the "internet" echo.
	srv := &nscore.Servers{}
	cl.Push(srv.Close)
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
		if err := serve(srv, l.n, l.addr, l.tag); err != nil {
			return nil, err
		}
	}
	args := []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", excludedV4 + "/32",
		"-b", "*", "-d", "15090,15021,15020", "--backend", backend, "--netns", pod.Path()}
	cmd := exec.CommandContext(ctx, initBin, args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("egress-init %s: %w: %s", strings.Join(args, " "), err, out)
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

func newNS(cl *nscore.Cleanups) (ns.NetNS, error) {
	n, remove, err := nscore.NewNS()
	if err != nil {
		return nil, err
	}
	cl.Push(func() { _ = remove() })
	return n, nil
}

// wire joins pod and world with a veth pair (nscore.WirePod), puts the
// "internet" addresses and the excluded one on the world's loopback and
// routes the pod's default through the world. Neither namespace has any
// link to the machine's real network.
func wire(pod, world ns.NetNS) error {
	return nscore.WirePod(pod, world, nscore.PodLink{
		IfName: "eth0", WorldIfName: "world0", WorldLoopback: []netip.Addr{netip.MustParseAddr(excludedV4)},
	})
}

// serve listens in n (the socket stays in n after Do returns) and answers
// each connection with tag and, for redirected connections, the original
// destination read with SO_ORIGINAL_DST; srv stops it.
func serve(srv *nscore.Servers, n ns.NetNS, addr, tag string) error {
	l, err := nscore.Listen(n, "tcp", addr, nil)
	if err != nil {
		return err
	}
	srv.Serve(l, 2*time.Second, func(c net.Conn) {
		msg := tag
		if strings.HasPrefix(tag, "redirected") {
			msg += " (orig " + origDst(c.(*net.TCPConn)) + ")"
		}
		fmt.Fprintln(c, msg)
	})
	return nil
}

// origDst reads the pre-NAT destination of a redirected connection.
func origDst(c *net.TCPConn) string {
	ap, err := nscore.OriginalDst(c)
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

// runClient runs a client child (nscore.RunClient: this binary
// re-executed) as uid (and gid = uid) inside the pod, so the owner match
// sees a real process of that identity; it reads one line.
func runClient(ctx context.Context, pod ns.NetNS, self string, uid uint32, addr string) (string, error) {
	out, err := nscore.RunClient(ctx, self, pod, nscore.Client{UID: uid, GID: uid, Network: "tcp", Addr: addr, Timeout: 2 * time.Second})
	var ce *nscore.ClientError
	if errors.As(err, &ce) && !ce.Killed {
		return "error: " + ce.Msg, nil
	}
	return strings.TrimSpace(out), err
}
