package sim

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
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nscore"
)

// Processes that must run as a given UID (clients, the sidecar) are this
// program re-executed: clients are nscore's client child, the sidecar is
// started with childEnv set. RunChild, called first thing in main, serves
// both modes.
const (
	childEnv      = "EGRESS_SIM_CHILD"
	childGateway  = "EGRESS_SIM_GATEWAY"
	childCluster  = "EGRESS_SIM_CLUSTER"
	childListen   = "EGRESS_SIM_LISTEN"
	modeSidecar   = "sidecar"
	relayLifetime = 3 * time.Second
)

// RunChild runs the child mode this process was started in, if any, and
// exits; it returns at once in an ordinary run. Call it first in main.
func RunChild() {
	nscore.RunChild()
	if os.Getenv(childEnv) == modeSidecar {
		os.Exit(runSidecarChild())
	}
}

// Executable copies the running program into a new 0755 directory, so
// that processes running as an unprivileged UID can execute it whatever
// the permissions of its own directory; cl removes the copy.
func Executable(cl *Cleanups) (string, error) {
	p, dir, err := nscore.CopyExecutable("egress-sim-exe-", "")
	if dir != "" {
		cl.Push(func() { _ = os.RemoveAll(dir) })
	}
	return p, err
}

// Reply is what a client saw: the lines each hop wrote on the way.
//
//	sidecar uid=1337 orig=203.0.113.10:8080   (the sidecar accepted a redirected connection)
//	gateway pod=198.51.100.66                   (the egress gateway forwarded it)
//	echo src=192.0.2.6:41234 dst=203.0.113.10:8080   (the server; src is who it saw)
type Reply struct {
	Lines []string
	// Sidecar is the original destination the sidecar read
	// (SO_ORIGINAL_DST); invalid if no sidecar was on the path.
	Sidecar netip.AddrPort
	// SidecarUID is the UID the sidecar ran as.
	SidecarUID string
	// Gateway is the gateway pod that forwarded the connection.
	Gateway netip.Addr
	// Src is the source address the echo server saw.
	Src netip.Addr
}

func parseReply(out string) Reply {
	var r Reply
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if l == "" {
			continue
		}
		r.Lines = append(r.Lines, l)
		f := strings.Fields(l)
		kv := map[string]string{}
		for _, x := range f[1:] {
			k, v, _ := strings.Cut(x, "=")
			kv[k] = v
		}
		switch f[0] {
		case "sidecar":
			r.Sidecar, _ = netip.ParseAddrPort(kv["orig"])
			r.SidecarUID = kv["uid"]
		case "gateway":
			r.Gateway, _ = netip.ParseAddr(kv["pod"])
		case "echo":
			if ap, err := netip.ParseAddrPort(kv["src"]); err == nil {
				r.Src = ap.Addr().Unmap()
			}
		}
	}
	return r
}

// DialError is a failed Dial, classified as the client saw it: "refused",
// "timeout", "unreachable" or "other".
type DialError struct{ Kind, Msg string }

func (e *DialError) Error() string { return fmt.Sprintf("%s: %s", e.Kind, e.Msg) }

// Dial runs a client process (exe, from Executable) inside n as uid:gid
// (no supplementary groups), which connects to addr over network (tcp4,
// tcp6, udp4, udp6) and reads until the far end closes or timeout. For
// UDP it sends one datagram and reads one. A non-empty source binds the
// socket to that address with IP_FREEBIND and IP_TRANSPARENT, so a root
// client can forge a source address the pod does not own.
func Dial(ctx context.Context, exe string, n ns.NetNS, uid uint32, network, addr, source string, timeout time.Duration) (Reply, error) {
	out, err := nscore.RunClient(ctx, exe, n, nscore.Client{
		UID: uid, GID: uid, Network: network, Addr: addr, Source: source, Timeout: timeout, ReadAll: true,
	})
	var ce *nscore.ClientError
	switch {
	case errors.As(err, &ce) && ce.Killed:
		return Reply{}, &DialError{Kind: "timeout", Msg: "client killed"}
	case errors.As(err, &ce):
		return Reply{}, &DialError{Kind: ce.Kind, Msg: ce.Msg}
	case err != nil:
		return Reply{}, err
	}
	return parseReply(out), nil
}

// ServeEcho listens on TCP and UDP at each address inside n and answers
// every connection or datagram with "echo src=<client> dst=<local>"; cl
// stops it.
func ServeEcho(cl *Cleanups, n ns.NetNS, addrs ...netip.AddrPort) error {
	s := &nscore.Servers{}
	cl.Push(s.Close)
	for _, a := range addrs {
		fam := "4"
		if a.Addr().Is6() {
			fam = "6"
		}
		l, err := nscore.Listen(n, "tcp"+fam, a.String(), nil)
		if err != nil {
			return fmt.Errorf("echo server on %s: %w", a, err)
		}
		s.Serve(l, relayLifetime, func(c net.Conn) {
			fmt.Fprintf(c, "echo src=%s dst=%s\n", c.RemoteAddr(), c.LocalAddr())
		})
		pc, err := nscore.ListenUDP(n, "udp"+fam, a.String(), nil)
		if err == nil {
			err = s.ServeUDPEcho(pc, func(from, _ netip.AddrPort) string {
				return fmt.Sprintf("echo src=%s dst=%s\n", from, a)
			})
		}
		if err != nil {
			return fmt.Errorf("echo server on %s: %w", a, err)
		}
	}
	return nil
}

// ServeForwarder stands in for an egress gateway inside the gateway pod's
// namespace n: on TCP port it reads a destination line ("ip:port\n", what
// the sidecar stand-in sends), answers "gateway pod=<podIP>", connects to
// the destination from the pod and relays. cl stops it.
func ServeForwarder(cl *Cleanups, n ns.NetNS, podIP netip.Addr, port uint16) error {
	s := &nscore.Servers{}
	cl.Push(s.Close)
	l, err := nscore.Listen(n, "tcp", fmt.Sprintf(":%d", port), nil)
	if err != nil {
		return fmt.Errorf("gateway forwarder on %d: %w", port, err)
	}
	s.Serve(l, relayLifetime, func(c net.Conn) {
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return
		}
		dst, err := netip.ParseAddrPort(strings.TrimSpace(line))
		if err != nil {
			fmt.Fprintf(c, "gateway pod=%s error=bad-destination\n", podIP)
			return
		}
		fmt.Fprintf(c, "gateway pod=%s\n", podIP)
		up, err := nscore.DialIn(n, "tcp", dst.String(), 2*time.Second)
		if err != nil {
			fmt.Fprintf(c, "gateway error=%q\n", err)
			return
		}
		nscore.Relay(c, up, relayLifetime)
	})
	return nil
}

// Sidecar is a running sidecar stand-in process.
type Sidecar struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

// StartSidecar starts the sidecar stand-in (exe re-executed) inside the
// pod's namespace n as uid:uid, like Envoy: it listens on port (IPv4 and
// IPv6), reads each redirected connection's original destination, writes
// "sidecar uid=<uid> orig=<dst>", and connects onwards as its own UID
// (which the pod's capture rules let through): directly for
// destinations inside cluster, else to the egress gateway's forwarder,
// to which it names the destination. It returns once the sidecar
// listens; cl stops it (it also exits when this process dies, as its
// stdin closes).
func StartSidecar(ctx context.Context, cl *Cleanups, exe string, n ns.NetNS, uid uint32, port uint16, gateway netip.AddrPort, cluster []netip.Prefix) (*Sidecar, error) {
	var cidrs []string
	for _, p := range cluster {
		cidrs = append(cidrs, p.String())
	}
	cmd := exec.Command(exe)
	cmd.Dir = "/"
	cmd.Env = []string{
		childEnv + "=" + modeSidecar,
		childListen + "=" + fmt.Sprint(port),
		childGateway + "=" + gateway.String(),
		childCluster + "=" + strings.Join(cidrs, ","),
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid, Groups: []uint32{}}}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := n.Do(func(ns.NetNS) error { return cmd.Start() }); err != nil {
		return nil, fmt.Errorf("could not start the sidecar: %w", err)
	}
	sc := &Sidecar{cmd: cmd, stdin: stdin}
	cl.Push(sc.stop)
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = fmt.Errorf("unexpected %q", line)
		}
		ready <- err
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case err := <-ready:
		if err != nil {
			return nil, fmt.Errorf("sidecar did not start: %w: %s", err, strings.TrimSpace(stderr.String()))
		}
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(5 * time.Second):
		return nil, errors.New("sidecar did not start within 5s")
	}
	return sc, nil
}

// PID is the sidecar process's ID.
func (s *Sidecar) PID() int { return s.cmd.Process.Pid }

func (s *Sidecar) stop() {
	_ = s.stdin.Close()
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
}

func runSidecarChild() int {
	gateway, err := netip.ParseAddrPort(os.Getenv(childGateway))
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidecar: bad gateway:", err)
		return 2
	}
	var cluster []netip.Prefix
	for _, c := range strings.Split(os.Getenv(childCluster), ",") {
		if p, err := netip.ParsePrefix(c); err == nil {
			cluster = append(cluster, p)
		}
	}
	port := os.Getenv(childListen)
	s := &nscore.Servers{}
	for _, a := range []string{"0.0.0.0:" + port, "[::]:" + port} {
		network := "tcp4"
		if strings.HasPrefix(a, "[") {
			network = "tcp6"
		}
		l, err := net.Listen(network, a)
		if err != nil {
			fmt.Fprintln(os.Stderr, "sidecar:", err)
			return 1
		}
		s.Serve(l, relayLifetime, func(c net.Conn) {
			orig, err := nscore.OriginalDst(c.(*net.TCPConn))
			if err != nil {
				fmt.Fprintf(c, "sidecar uid=%d error=%q\n", os.Getuid(), err)
				return
			}
			fmt.Fprintf(c, "sidecar uid=%d orig=%s\n", os.Getuid(), orig)
			direct := false
			for _, p := range cluster {
				if p.Contains(orig.Addr()) {
					direct = true
				}
			}
			target := gateway.String()
			if direct {
				target = orig.String()
			}
			up, err := net.DialTimeout("tcp", target, 2*time.Second)
			if err != nil {
				fmt.Fprintf(c, "sidecar error=%q\n", err)
				return
			}
			if !direct {
				if _, err := fmt.Fprintf(up, "%s\n", orig); err != nil {
					up.Close()
					return
				}
			}
			nscore.Relay(c, up, relayLifetime)
		})
	}
	fmt.Println("ready")
	// The parent holds our stdin: EOF means it is gone.
	_, _ = io.Copy(io.Discard, os.Stdin)
	s.Close()
	return 0
}
