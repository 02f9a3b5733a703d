package nstest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nscore"
)

const defaultDialWait = nscore.DefaultClientTimeout

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
// When the binary runs as a Dial child (nscore.RunChild) it performs the
// dial and exits without running any test. Otherwise it runs the tests
// and removes the world-executable copy of the test binary that Dial
// makes.
func Main(m *testing.M) {
	nscore.RunChild()
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
// The process is the test binary re-executed (see Main, and
// nscore.RunClient), copied once to a world-readable directory so that
// an unprivileged UID can exec it. Because the kernel records the
// UID/GID of the socket's owner, the owner matches of the capture rules
// (meta skuid / -m owner) see exactly uid and gid.
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
	out, err := nscore.RunClient(context.Background(), exe, n, nscore.Client{
		UID: uid, GID: gid, Groups: cfg.groups,
		Network: network, Addr: addr, Source: cfg.source, Timeout: cfg.timeout,
		Env: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
	})
	var ce *nscore.ClientError
	switch {
	case errors.As(err, &ce) && ce.Killed:
		return "", &DialError{Kind: "timeout", Msg: fmt.Sprintf("client %s %s killed after %s", network, addr, cfg.timeout+3*time.Second)}
	case errors.As(err, &ce):
		return "", &DialError{Kind: ce.Kind, Msg: ce.Msg}
	case err != nil:
		t.Fatal(err)
	}
	return strings.TrimSuffix(out, "\n"), nil
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
		exePath, exeDir, exeErr = nscore.CopyExecutable("nstest-exe-", "nstest-client")
	})
	return exePath, exeErr
}
