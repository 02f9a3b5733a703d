// Package nstest is the testing.TB face of internal/nscore, the harness
// for privileged tests that need real
// network namespaces and real traffic: a pod namespace wired to a "world"
// namespace by a veth pair, TCP/UDP servers that report where a connection
// landed (including the pre-NAT destination, SO_ORIGINAL_DST), clients
// that run as a given UID/GID, and ruleset dumps for before/after
// comparisons.
//
// Every object is created inside namespaces the harness makes itself and
// is torn down in t.Cleanup, also when the test fails. Only documentation
// address ranges are used (192.0.2.0/24, 203.0.113.0/24, 198.51.100.0/24,
// 2001:db8::/32), and nothing gets a route to the machine's real network;
// the root namespace's links, routes and firewall are never touched.
//
// A test package that uses Dial must route its TestMain through Main:
//
//	func TestMain(m *testing.M) { nstest.Main(m) }
//
// because Dial runs its clients as a re-executed copy of the test binary.
//
// Tests that use this package should call RequirePrivileged first: it
// skips without root, unless EGRESS_CNI_REQUIRE_PRIVILEGED=1 (set in CI)
// turns the skip into a failure so that a misconfigured CI job cannot go
// green by skipping everything.
package nstest

import (
	"fmt"
	"os"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nscore"
)

// RequirePrivilegedEnv names the environment variable that turns the skip
// of RequirePrivileged into a failure when set to "1".
const RequirePrivilegedEnv = "EGRESS_CNI_REQUIRE_PRIVILEGED"

// RequirePrivileged skips the test unless it runs as root with the tools
// the harness needs (ip is not needed; nft and the iptables binaries are
// checked by the dump helpers themselves). With
// EGRESS_CNI_REQUIRE_PRIVILEGED=1 it fails instead of skipping.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	msg := fmt.Sprintf("requires root: creates network namespaces and firewall rules (euid %d)", os.Geteuid())
	if os.Getenv(RequirePrivilegedEnv) == "1" {
		t.Fatalf("%s, and %s=1", msg, RequirePrivilegedEnv)
	}
	t.Skip(msg)
}

// NewNS creates a fresh, bind-mounted network namespace with its loopback
// up. It is closed and unmounted in t.Cleanup. Register servers and other
// users of the namespace after calling NewNS, so that (cleanups run last
// in, first out) they stop before the namespace goes.
func NewNS(t testing.TB) ns.NetNS {
	t.Helper()
	n, remove, err := nscore.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := remove(); err != nil {
			t.Error(err)
		}
	})
	return n
}

// Exec runs a command inside the namespace (the process inherits it) and
// returns its standard output. Standard error goes into the error. Use it
// for nft/iptables tampering in tests; never point it at the root
// namespace.
func Exec(n ns.NetNS, name string, args ...string) (string, error) {
	return nscore.Exec(n, name, args...)
}

// MustExec is Exec that fails the test on error.
func MustExec(t testing.TB, n ns.NetNS, name string, args ...string) string {
	t.Helper()
	out, err := Exec(n, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
