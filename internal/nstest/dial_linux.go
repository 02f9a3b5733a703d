package nstest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/sockopt"
)

// Environment of a Dial child process. childEnv selects child mode in Main.
const (
	childEnv        = "NSTEST_CHILD"
	childNetwork    = "NSTEST_NETWORK"
	childAddr       = "NSTEST_ADDR"
	childSource     = "NSTEST_SOURCE"
	childTimeout    = "NSTEST_TIMEOUT"
	childModeDial   = "dial"
	childErrPrefix  = "nstest-dial-error "
	defaultDialWait = 2 * time.Second
)

var (
	mainCalled bool

	exeOnce sync.Once
	exePath string
	exeDir  string
	exeErr  error
)

// Main is the TestMain of a package that uses Dial:
//
//	func TestMain(m *testing.M) { nstest.Main(m) }
//
// When the binary runs as a Dial child it performs the dial and exits
// without running any test. Otherwise it runs the tests and removes the
// world-executable copy of the test binary that Dial makes.
func Main(m *testing.M) {
	if os.Getenv(childEnv) == childModeDial {
		os.Exit(runDialChild())
	}
	mainCalled = true
	code := m.Run()
	if exeDir != "" {
		_ = os.RemoveAll(exeDir)
	}
	os.Exit(code)
}

// DialOption tunes Dial.
type DialOption func(*dialConfig)

type dialConfig struct {
	source  string
	timeout time.Duration
	groups  []uint32
}

// WithSource binds the client socket to ip (an address, no port) before
// connecting. IP_FREEBIND and, when the client has CAP_NET_ADMIN (UID 0),
// IP_TRANSPARENT are set (or their IPv6 twins), so a root client can send
// from an address the namespace does not own: that is how spoofing tests
// forge a source. An unprivileged client gets a *DialError of kind
// "unreachable" for a foreign source, as the kernel refuses to route it.
func WithSource(ip string) DialOption { return func(c *dialConfig) { c.source = ip } }

// WithTimeout bounds the connect and the read (default 2s). The child is
// killed if it has not exited 3s after that.
func WithTimeout(d time.Duration) DialOption { return func(c *dialConfig) { c.timeout = d } }

// WithGroups sets the client's supplementary groups (default none).
func WithGroups(gids ...uint32) DialOption { return func(c *dialConfig) { c.groups = gids } }

// DialError is a failed Dial. Kind classifies the failure as the child
// saw it, so tests can tell a REJECT/closed port from a silent DROP.
type DialError struct {
	// Kind is one of "refused", "timeout", "unreachable", "other".
	Kind string
	Msg  string
}

func (e *DialError) Error() string { return fmt.Sprintf("dial failed (%s): %s", e.Kind, e.Msg) }

// Dial runs a real client process inside the namespace as uid:gid, which
// connects to addr over network ("tcp", "tcp4", "tcp6", "udp", "udp4",
// "udp6"), reads one line and returns it without the newline. For UDP it
// sends one datagram first. A failed connect or read returns a
// *DialError; Dial never blocks longer than the timeout plus 3 seconds.
//
// The process is the test binary re-executed (see Main), copied once to
// a world-readable directory so that an unprivileged UID can exec it.
// Because the kernel records the UID/GID of the socket's owner, the
// owner matches of the capture rules (meta skuid / -m owner) see exactly
// uid and gid.
func Dial(t testing.TB, n ns.NetNS, uid, gid uint32, network, addr string, opts ...DialOption) (string, error) {
	t.Helper()
	if !mainCalled {
		t.Fatal("nstest.Dial needs the package's TestMain to call nstest.Main(m)")
	}
	cfg := dialConfig{timeout: defaultDialWait}
	for _, o := range opts {
		o(&cfg)
	}
	exe, err := childExe()
	if err != nil {
		t.Fatalf("could not prepare the client binary: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout+3*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe)
	cmd.Dir = "/"
	cmd.Env = []string{
		childEnv + "=" + childModeDial,
		childNetwork + "=" + network,
		childAddr + "=" + addr,
		childSource + "=" + cfg.source,
		childTimeout + "=" + cfg.timeout.String(),
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	}
	groups := cfg.groups
	if groups == nil {
		groups = []uint32{}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: groups},
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	// Start from a thread inside the namespace: the child inherits it.
	if err := n.Do(func(ns.NetNS) error { return cmd.Start() }); err != nil {
		t.Fatalf("could not start client as %d:%d in %s: %v", uid, gid, n.Path(), err)
	}
	werr := cmd.Wait()
	if ctx.Err() != nil {
		return "", &DialError{Kind: "timeout", Msg: fmt.Sprintf("client %s %s killed after %s", network, addr, cfg.timeout+3*time.Second)}
	}
	if werr != nil {
		msg := strings.TrimSpace(stderr.String())
		if rest, ok := strings.CutPrefix(msg, childErrPrefix); ok {
			kind, m, _ := strings.Cut(rest, " ")
			return "", &DialError{Kind: kind, Msg: m}
		}
		return "", &DialError{Kind: "other", Msg: fmt.Sprintf("client exited: %v: %s", werr, msg)}
	}
	return strings.TrimSuffix(stdout.String(), "\n"), nil
}

// MustDial is Dial that fails the test on error.
func MustDial(t testing.TB, n ns.NetNS, uid, gid uint32, network, addr string, opts ...DialOption) string {
	t.Helper()
	r, err := Dial(t, n, uid, gid, network, addr, opts...)
	if err != nil {
		t.Fatalf("dial %s %s as %d:%d: %v", network, addr, uid, gid, err)
	}
	return r
}

// childExe copies the running test binary, once per process, into a new
// 0755 directory: go test keeps it in a 0700 directory that other UIDs
// cannot enter.
func childExe() (string, error) {
	exeOnce.Do(func() {
		self, err := os.Executable()
		if err != nil {
			exeErr = err
			return
		}
		dir, err := os.MkdirTemp("", "nstest-exe-")
		if err != nil {
			exeErr = err
			return
		}
		exeDir = dir
		if err := os.Chmod(dir, 0o755); err != nil {
			exeErr = err
			return
		}
		src, err := os.Open(self)
		if err != nil {
			exeErr = err
			return
		}
		defer src.Close()
		p := filepath.Join(dir, "nstest-client")
		dst, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
		if err != nil {
			exeErr = err
			return
		}
		if _, err := io.Copy(dst, src); err != nil {
			dst.Close()
			exeErr = err
			return
		}
		if err := dst.Close(); err != nil {
			exeErr = err
			return
		}
		exePath = p
	})
	return exePath, exeErr
}

// runDialChild is the client side of Dial. It prints the reply on stdout,
// or "nstest-dial-error <kind> <message>" on stderr and exits 1.
func runDialChild() int {
	network, addr := os.Getenv(childNetwork), os.Getenv(childAddr)
	timeout, err := time.ParseDuration(os.Getenv(childTimeout))
	if err != nil {
		timeout = defaultDialWait
	}
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "%s%s %v\n", childErrPrefix, classify(err), err)
		return 1
	}
	out, err := sockopt.Exchange(network, addr, os.Getenv(childSource), timeout, false)
	if err != nil {
		return fail(err)
	}
	os.Stdout.Write(out)
	return 0
}

func classify(err error) string { return sockopt.Classify(err) }
