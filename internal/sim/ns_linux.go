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
// Unlike internal/nstest (the same techniques for tests, tied to
// testing.TB), every function here returns an error.
package sim

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/netwait"
)

// Cleanups holds cleanup functions and runs them last in, first out.
type Cleanups struct {
	mu  sync.Mutex
	fns []func()
}

// Push registers f to run at Run.
func (s *Cleanups) Push(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fns = append(s.fns, f)
}

// Run runs every registered function, newest first, once.
func (s *Cleanups) Run() {
	s.mu.Lock()
	fns := s.fns
	s.fns = nil
	s.mu.Unlock()
	for i := len(fns) - 1; i >= 0; i-- {
		fns[i]()
	}
}

// NamePrefix starts the name of every namespace this process makes
// (egress-sim-<pid>-), so that `ip netns list` shows whose they are.
var NamePrefix = fmt.Sprintf("egress-sim-%d-", os.Getpid())

// NewNS creates the named network namespace NamePrefix+name (with `ip
// netns add`, so it is listed by `ip netns list`) with its loopback up;
// cl deletes it.
func NewNS(cl *Cleanups, name string) (ns.NetNS, error) {
	full := NamePrefix + name
	if out, err := exec.Command("ip", "netns", "add", full).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %w: %s", full, err, strings.TrimSpace(string(out)))
	}
	n, err := ns.GetNS(filepath.Join(netnsDir, full))
	if err != nil {
		_ = exec.Command("ip", "netns", "delete", full).Run()
		return nil, fmt.Errorf("could not open network namespace %s: %w", full, err)
	}
	cl.Push(func() {
		_ = n.Close()
		_ = exec.Command("ip", "netns", "delete", full).Run()
	})
	err = n.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	if err != nil {
		return nil, fmt.Errorf("could not bring lo up in %s: %w", full, err)
	}
	return n, nil
}

// netnsDir is where `ip netns` keeps its namespaces.
const netnsDir = "/run/netns"

// LinkEnd is one end of a veth pair made by Link.
type LinkEnd struct {
	NS    ns.NetNS
	Name  string
	Addrs []netip.Prefix
}

// Link joins two namespaces with a veth pair, created inside a.NS with
// its peer placed straight into b.NS (it never exists in the root
// namespace). Both ends get their addresses (IPv6 without DAD) and are up
// and ready on return. The pair dies with its namespaces.
func Link(a, b LinkEnd) error {
	err := a.NS.Do(func(ns.NetNS) error {
		return netlink.LinkAdd(&netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: a.Name},
			PeerName:      b.Name,
			PeerNamespace: netlink.NsFd(int(b.NS.Fd())),
		})
	})
	if err != nil {
		return fmt.Errorf("could not create veth %s/%s: %w", a.Name, b.Name, err)
	}
	for _, e := range []LinkEnd{a, b} {
		if err := e.NS.Do(func(ns.NetNS) error { return setupLink(e.Name, e.Addrs...) }); err != nil {
			return err
		}
	}
	for _, e := range []LinkEnd{a, b} {
		if err := e.NS.Do(func(ns.NetNS) error { return WaitLinkReady(e.Name) }); err != nil {
			return err
		}
	}
	return nil
}

// Route adds a route to dst (0.0.0.0/0 and ::/0 included) via gw in n.
func Route(n ns.NetNS, dst netip.Prefix, gw netip.Addr) error {
	err := n.Do(func(ns.NetNS) error {
		return netlink.RouteAdd(&netlink.Route{
			Dst: &net.IPNet{IP: net.IP(dst.Masked().Addr().AsSlice()), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())},
			Gw:  net.IP(gw.AsSlice()),
		})
	})
	if err != nil {
		return fmt.Errorf("could not add route %s via %s: %w", dst, gw, err)
	}
	return nil
}

// Sysctl sets a per-namespace sysctl ("net.ipv4.ip_forward") in n. Keys
// outside net.* are refused: they are not per namespace.
func Sysctl(n ns.NetNS, key, value string) error {
	path := strings.ReplaceAll(key, ".", "/")
	if !strings.HasPrefix(path, "net/") {
		return fmt.Errorf("sysctl %s is not per network namespace", key)
	}
	return n.Do(func(ns.NetNS) error { return writeSysctl("/proc/sys/"+path, value) })
}

// Exec runs a command inside n and returns its standard output; standard
// error goes into the error.
func Exec(n ns.NetNS, name string, args ...string) (string, error) {
	return execStdin(n, "", name, args...)
}

// execStdin is Exec with stdin.
func execStdin(n ns.NetNS, stdin, name string, args ...string) (string, error) {
	var out []byte
	var stderr strings.Builder
	err := n.Do(func(ns.NetNS) error {
		cmd := exec.Command(name, args...)
		cmd.Stdin = strings.NewReader(stdin)
		cmd.Stderr = &stderr
		var err error
		out, err = cmd.Output()
		return err
	})
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// setupLink turns DAD off, adds the addresses and brings the link up,
// inside the link's namespace.
func setupLink(name string, addrs ...netip.Prefix) error {
	// accept_dad=0 before the link goes up also covers the link-local
	// address.
	if err := writeSysctl("/proc/sys/net/ipv6/conf/"+name+"/accept_dad", "0"); err != nil {
		return err
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("could not find %s: %w", name, err)
	}
	for _, p := range addrs {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(link, a); err != nil {
			return fmt.Errorf("could not add %s to %s: %w", p, name, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("could not bring %s up: %w", name, err)
	}
	return nil
}

// WaitLinkReady is netwait.LinkReady, kept for the demo's callers.
func WaitLinkReady(name string) error { return netwait.LinkReady(name) }

// writeSysctl writes a /proc/sys/net file; from a thread inside a
// namespace, /proc/sys/net is that namespace's.
func writeSysctl(path, value string) error {
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("could not set %s=%s: %w", path, value, err)
	}
	return nil
}
