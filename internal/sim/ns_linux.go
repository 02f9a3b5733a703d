// Package sim builds a small simulated Kubernetes cluster out of network
// namespaces, for cmd/egress-demo: an internet host, a router, an app node
// and an egress node, each node with its own CNI bin and config
// directories, pods created through the real CNI chain (libcni, run from
// a thread inside the node's namespace), and the processes that stand in
// for the mesh: a sidecar on 15001 and an egress gateway's forwarder.
//
// Everything it makes lives in namespaces it creates, addressed from the
// documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
// 2001:db8::/32); nothing has a route to the machine's real network, and
// the root namespace's links, routes, sysctls and firewall are never
// touched. Every object is registered on a Cleanups stack when it is made, so that
// Cleanups.Run removes it again, also after an error or a cancelled context.
//
// The namespace work itself (namespaces, links, routes, sysctls, servers,
// the client child) is internal/nscore's, which internal/nstest wraps for
// tests; every function here returns an error too.
package sim

import (
	"fmt"
	"net/netip"
	"os"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nscore"
)

// Cleanups holds cleanup functions and runs them last in, first out.
type Cleanups = nscore.Cleanups

// NamePrefix starts the name of every namespace this process makes
// (egress-sim-<pid>-), so that `ip netns list` shows whose they are.
var NamePrefix = fmt.Sprintf("egress-sim-%d-", os.Getpid())

// NewNS creates the named network namespace NamePrefix+name (with `ip
// netns add`, so it is listed by `ip netns list`) with its loopback up;
// cl deletes it.
func NewNS(cl *Cleanups, name string) (ns.NetNS, error) {
	return nscore.NewNamedNS(cl, NamePrefix+name)
}

// LinkEnd is one end of a veth pair made by Link.
type LinkEnd = nscore.LinkEnd

// Link joins two namespaces with a veth pair (nscore.Link): both ends
// get their addresses (IPv6 without DAD) and are up and ready on return.
func Link(a, b LinkEnd) error { return nscore.Link(a, b) }

// Route adds a route to dst (0.0.0.0/0 and ::/0 included) via gw in n.
func Route(n ns.NetNS, dst netip.Prefix, gw netip.Addr) error { return nscore.Route(n, dst, gw) }

// Sysctl sets a per-namespace sysctl ("net.ipv4.ip_forward") in n. Keys
// outside net.* are refused: they are not per namespace.
func Sysctl(n ns.NetNS, key, value string) error { return nscore.Sysctl(n, key, value) }

// Exec runs a command inside n and returns its standard output; standard
// error goes into the error.
func Exec(n ns.NetNS, name string, args ...string) (string, error) {
	return nscore.Exec(n, name, args...)
}

// execStdin is Exec with stdin.
func execStdin(n ns.NetNS, stdin, name string, args ...string) (string, error) {
	return nscore.ExecStdin(n, stdin, name, args...)
}

// WaitLinkReady is nscore.WaitLinkReady, kept for the demo's callers.
func WaitLinkReady(name string) error { return nscore.WaitLinkReady(name) }
