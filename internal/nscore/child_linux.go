package nscore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/sockopt"
)

// Clients that must run as a given UID/GID are this program re-executed
// with childEnv set; RunChild, called first thing in main (or TestMain),
// serves that mode.
const (
	childEnv       = "EGRESS_NS_CHILD"
	childNetwork   = "EGRESS_NS_NETWORK"
	childAddr      = "EGRESS_NS_ADDR"
	childSource    = "EGRESS_NS_SOURCE"
	childTimeout   = "EGRESS_NS_TIMEOUT"
	childReadAll   = "EGRESS_NS_READ_ALL"
	childModeDial  = "dial"
	childErrPrefix = "egress-ns-dial-error "
	// DefaultClientTimeout bounds a client's connect and read when the
	// caller gives none.
	DefaultClientTimeout = 2 * time.Second
	// clientGrace is how long after its timeout a client is killed.
	clientGrace = 3 * time.Second
)

// RunChild runs the client this process was started as, if it was, and
// exits; it returns at once in an ordinary run.
func RunChild() {
	if IsChild() {
		os.Exit(runDialChild())
	}
}

// IsChild reports whether this process was started as a client child.
func IsChild() bool { return os.Getenv(childEnv) == childModeDial }

// CopyExecutable copies the running program into a new 0755 directory
// made by os.MkdirTemp("", pattern), as name, so that processes running
// as an unprivileged UID can execute it whatever the permissions of its
// own directory (go test keeps its binary in a 0700 one). It returns the
// copy and the directory, for the caller to remove; dir is set as soon
// as it exists, also with an error.
func CopyExecutable(pattern, name string) (path, dir string, err error) {
	self, err := os.Executable()
	if err != nil {
		return "", "", err
	}
	if dir, err = os.MkdirTemp("", pattern); err != nil {
		return "", "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", dir, err
	}
	src, err := os.Open(self)
	if err != nil {
		return "", dir, err
	}
	defer src.Close()
	if name == "" {
		name = filepath.Base(self)
	}
	p := filepath.Join(dir, name)
	dst, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		return "", dir, err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return "", dir, err
	}
	return p, dir, dst.Close()
}

// Client is one exchange of a client child.
type Client struct {
	UID, GID uint32
	// Groups are the supplementary groups (nil: none).
	Groups []uint32
	// Network is tcp, tcp4, tcp6, udp, udp4 or udp6; Addr is host:port.
	Network, Addr string
	// Source, if set, binds the socket to that address with IP_FREEBIND
	// and IP_TRANSPARENT (or their IPv6 twins), so a root client can
	// forge a source address the namespace does not own.
	Source string
	// Timeout bounds the connect and the read (DefaultClientTimeout if
	// 0); the child is killed 3s after it.
	Timeout time.Duration
	// ReadAll reads until the far end closes or the timeout, instead of
	// one line.
	ReadAll bool
	// Env is added to the child's environment.
	Env []string
}

// ClientError is a failed client exchange, classified as the child saw
// it, so that a REJECT or closed port can be told from a silent DROP.
type ClientError struct {
	// Kind is one of "refused", "timeout", "unreachable", "other".
	Kind string
	Msg  string
	// Killed: the child did not exit in time and was killed (Kind is
	// "timeout", Msg empty).
	Killed bool
}

func (e *ClientError) Error() string { return fmt.Sprintf("dial failed (%s): %s", e.Kind, e.Msg) }

// RunClient runs c as a child process (exe, a CopyExecutable copy of
// this program, whose main or TestMain calls RunChild) inside n, and
// returns what it read. A failed exchange is a *ClientError; a failure
// to start the child, or ctx's cancellation, another error.
//
// Because the kernel records the UID/GID of the socket's owner, the
// owner matches of capture rules (meta skuid / -m owner) see exactly
// c.UID and c.GID.
func RunClient(ctx context.Context, exe string, n ns.NetNS, c Client) (string, error) {
	if c.Timeout == 0 {
		c.Timeout = DefaultClientTimeout
	}
	env := append([]string{
		childEnv + "=" + childModeDial,
		childNetwork + "=" + c.Network,
		childAddr + "=" + c.Addr,
		childSource + "=" + c.Source,
		childTimeout + "=" + c.Timeout.String(),
		childReadAll + "=" + strconv.FormatBool(c.ReadAll),
	}, c.Env...)
	return RunAs(ctx, exe, n, Child{UID: c.UID, GID: c.GID, Groups: c.Groups, Env: env, Limit: c.Timeout + clientGrace, ErrPrefix: childErrPrefix})
}

// Child is a child process run by RunAs.
type Child struct {
	UID, GID uint32
	// Groups are the supplementary groups (nil: none).
	Groups []uint32
	// Env is the child's whole environment.
	Env []string
	// Limit is how long the child may run before it is killed.
	Limit time.Duration
	// ErrPrefix starts the line "<ErrPrefix><kind> <message>" a child
	// writes on stderr before it exits non-zero for a failed exchange.
	ErrPrefix string
}

// RunAs runs exe (this program re-executed, in a child mode its Env
// selects) inside n as c.UID:c.GID and returns its standard output. A
// child that exits non-zero is a *ClientError: of the kind it named after
// c.ErrPrefix on stderr, else "other"; one killed at c.Limit is a
// *ClientError with Killed set. A failure to start it, or ctx's
// cancellation, is another error.
func RunAs(ctx context.Context, exe string, n ns.NetNS, c Child) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.Limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe)
	cmd.Dir = "/"
	cmd.Env = c.Env
	groups := c.Groups
	if groups == nil {
		groups = []uint32{}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: c.UID, Gid: c.GID, Groups: groups},
	}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// Started from a thread inside n, the child is in n.
	if err := n.Do(func(ns.NetNS) error { return cmd.Start() }); err != nil {
		return "", fmt.Errorf("could not start %s as %d:%d in %s: %w", exe, c.UID, c.GID, n.Path(), err)
	}
	werr := cmd.Wait()
	if ctx.Err() != nil {
		if err := context.Cause(ctx); errors.Is(err, context.Canceled) {
			return "", err
		}
		return "", &ClientError{Kind: "timeout", Killed: true}
	}
	if werr != nil {
		msg := strings.TrimSpace(stderr.String())
		if rest, ok := strings.CutPrefix(msg, c.ErrPrefix); ok && c.ErrPrefix != "" {
			kind, m, _ := strings.Cut(rest, " ")
			return "", &ClientError{Kind: kind, Msg: m}
		}
		return "", &ClientError{Kind: "other", Msg: fmt.Sprintf("client exited: %v: %s", werr, msg)}
	}
	return stdout.String(), nil
}

// runDialChild is the client side of RunClient. It prints what it read
// on stdout, or "<childErrPrefix><kind> <message>" on stderr and exits 1.
func runDialChild() int {
	network, addr := os.Getenv(childNetwork), os.Getenv(childAddr)
	timeout, err := time.ParseDuration(os.Getenv(childTimeout))
	if err != nil {
		timeout = DefaultClientTimeout
	}
	readAll, _ := strconv.ParseBool(os.Getenv(childReadAll))
	out, err := sockopt.Exchange(network, addr, os.Getenv(childSource), timeout, readAll)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s%s %v\n", childErrPrefix, sockopt.Classify(err), err)
		return 1
	}
	os.Stdout.Write(out)
	return 0
}
