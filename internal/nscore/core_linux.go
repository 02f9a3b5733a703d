// Package nscore is the one namespace harness of egress-cni's tests, demo
// and bench: network namespaces (with loopback up), veth links, routes,
// per-namespace sysctls, commands run inside a namespace, servers
// (accept loops, an echo server, listeners owned by a chosen UID), the
// relay of the stand-in proxies, and the client child (this program
// re-executed, dialing as a given UID/GID).
//
// Every function returns an error; nothing here knows about testing.TB.
// internal/nstest wraps it for tests, internal/sim builds the simulated
// cluster on top of it. Every object that must be removed again is
// registered on a Cleanups stack when it is made.
//
// nscore must not import pkg/rules or pkg/node (directly or not): the
// internal tests of pkg/rules use internal/nstest, which wraps it.
//
// Everything lives in namespaces made here, addressed by the callers
// from documentation ranges only; the root namespace's links, routes,
// sysctls and firewall are never touched.
package nscore

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
	"github.com/containernetworking/plugins/pkg/testutils"
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

// NewNS creates a fresh, bind-mounted, anonymous network namespace (the
// CNI plugins' testutils) with its loopback up. The returned remove
// closes and unmounts it; it reports what failed.
func NewNS() (n ns.NetNS, remove func() error, err error) {
	n, err = testutils.NewNS()
	if err != nil {
		return nil, nil, fmt.Errorf("could not create network namespace: %w", err)
	}
	remove = func() error {
		var errs []string
		if err := n.Close(); err != nil {
			errs = append(errs, fmt.Sprintf("could not close network namespace %s: %v", n.Path(), err))
		}
		if err := testutils.UnmountNS(n); err != nil {
			errs = append(errs, fmt.Sprintf("could not unmount network namespace %s: %v", n.Path(), err))
		}
		if errs != nil {
			return fmt.Errorf("%s", strings.Join(errs, "; "))
		}
		return nil
	}
	if err := LoUp(n); err != nil {
		_ = remove()
		return nil, nil, fmt.Errorf("could not set up namespace %s: %w", n.Path(), err)
	}
	return n, remove, nil
}

// NewNamedNS creates the named network namespace name (with `ip netns
// add`, so it is listed by `ip netns list`) with its loopback up; cl
// deletes it.
func NewNamedNS(cl *Cleanups, name string) (ns.NetNS, error) {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	n, err := ns.GetNS(filepath.Join(netnsDir, name))
	if err != nil {
		_ = exec.Command("ip", "netns", "delete", name).Run()
		return nil, fmt.Errorf("could not open network namespace %s: %w", name, err)
	}
	cl.Push(func() {
		_ = n.Close()
		_ = exec.Command("ip", "netns", "delete", name).Run()
	})
	if err := LoUp(n); err != nil {
		return nil, fmt.Errorf("could not bring lo up in %s: %w", name, err)
	}
	return n, nil
}

// netnsDir is where `ip netns` keeps its namespaces.
const netnsDir = "/run/netns"

// LoUp brings the loopback of n up.
func LoUp(n ns.NetNS) error {
	return n.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("could not find lo: %w", err)
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("could not bring lo up: %w", err)
		}
		return nil
	})
}

// LinkEnd is one end of a veth pair made by Link.
type LinkEnd struct {
	NS    ns.NetNS
	Name  string
	Addrs []netip.Prefix
}

// Link joins two namespaces with a veth pair, created inside a.NS with
// its peer placed straight into b.NS (it never exists in the root
// namespace). Both ends get their addresses (IPv6 without DAD) and are up
// and ready (carrier, link-local address) on return. The pair dies with
// its namespaces.
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
		if err := e.NS.Do(func(ns.NetNS) error {
			_, err := SetupLink(e.Name, e.Addrs...)
			return err
		}); err != nil {
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
		return fmt.Errorf("could not add route %s via %s in %s: %w", dst, gw, n.Path(), err)
	}
	return nil
}

// Sysctl sets a per-namespace sysctl ("net.ipv4.ip_forward" or
// "net/ipv4/ip_forward") in n. Keys outside net.* are refused: they are
// not per namespace, so a caller cannot change the machine.
func Sysctl(n ns.NetNS, key, value string) error {
	path := strings.ReplaceAll(key, ".", "/")
	if !strings.HasPrefix(path, "net/") {
		return fmt.Errorf("sysctl %s is not per network namespace", key)
	}
	return n.Do(func(ns.NetNS) error { return WriteSysctl("/proc/sys/"+path, value) })
}

// Exec runs a command inside n (the process inherits it) and returns its
// standard output; standard error goes into the error.
func Exec(n ns.NetNS, name string, args ...string) (string, error) {
	return ExecStdin(n, "", name, args...)
}

// ExecStdin is Exec with stdin.
func ExecStdin(n ns.NetNS, stdin, name string, args ...string) (string, error) {
	var out []byte
	var stderr LimitedBuffer
	err := n.Do(func(ns.NetNS) error {
		cmd := exec.Command(name, args...)
		cmd.Stdin = strings.NewReader(stdin)
		cmd.Stderr = &stderr
		var err error
		out, err = cmd.Output()
		return err
	})
	if err != nil {
		return string(out), fmt.Errorf("%s %q in %s: %w: %s", name, args, n.Path(), err, strings.TrimSpace(string(stderr.Bytes())))
	}
	return string(out), nil
}

// SetupLink turns DAD off, adds the addresses and brings the link up,
// inside the link's namespace (call it from a thread in there).
func SetupLink(name string, addrs ...netip.Prefix) (netlink.Link, error) {
	// accept_dad=0 before the link goes up also covers the link-local
	// address, which nodad on our own addresses does not.
	if err := WriteSysctl("/proc/sys/net/ipv6/conf/"+name+"/accept_dad", "0"); err != nil {
		return nil, err
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("could not find %s: %w", name, err)
	}
	for _, p := range addrs {
		if err := AddrAdd(link, p); err != nil {
			return nil, err
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("could not bring %s up: %w", name, err)
	}
	return link, nil
}

// AddrAdd adds p to link (IPv6 with nodad), from a thread in the link's
// namespace.
func AddrAdd(link netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := netlink.AddrAdd(link, a); err != nil {
		return fmt.Errorf("could not add %s to %s: %w", p, link.Attrs().Name, err)
	}
	return nil
}

// WaitLinkReady is netwait.LinkReady: carrier and a usable link-local
// address.
func WaitLinkReady(name string) error { return netwait.LinkReady(name) }

// WriteSysctl writes a /proc/sys/net file; from a thread inside a
// namespace, /proc/sys/net is that namespace's.
func WriteSysctl(path, value string) error {
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("could not set %s=%s: %w", path, value, err)
	}
	return nil
}

// LimitedBuffer keeps the first Max bytes written to it (64 KiB when Max
// is 0) and drops the rest.
type LimitedBuffer struct {
	Max int
	b   []byte
}

func (l *LimitedBuffer) Write(p []byte) (int, error) {
	limit := l.Max
	if limit == 0 {
		limit = 64 << 10
	}
	if room := limit - len(l.b); room > 0 {
		l.b = append(l.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

// Bytes is what was kept.
func (l *LimitedBuffer) Bytes() []byte { return l.b }
