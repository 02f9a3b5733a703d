package install

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// DefaultNetNSDir is where container runtimes pin pod network namespaces
// (containerd and CRI-O: /var/run/netns/cni-…), seen from the installer's
// pod through a hostPath mount.
const DefaultNetNSDir = "/host/run/netns"

// Unenforceable is an interface in a pod's network namespace whose
// traffic does not cross the node's IP stack, so the node rules never see
// it: a macvlan, ipvlan or VLAN on a device of another namespace (Multus
// secondary networks), or a physical device moved into the pod (SR-IOV
// VFs, host-device).
type Unenforceable struct {
	NetNS string // path of the pod's namespace
	Iface string
	Kind  string // netlink kind, "device" for a physical one
}

func (u Unenforceable) String() string {
	return fmt.Sprintf("%s in %s (%s)", u.Iface, u.NetNS, u.Kind)
}

// bypassKinds are link kinds whose frames go straight to their lower
// device when that device is in another namespace.
var bypassKinds = []string{"macvlan", "macvtap", "ipvlan", "ipvtap", "vlan"}

// ScanAttachments enters every network namespace pinned in dir (other
// than the host's own, hostNS) and lists its interfaces that bypass the
// host's IP stack. A namespace that vanishes while it is scanned (a pod
// torn down) is skipped. It reads only; nothing is changed.
func ScanAttachments(dir, hostNS string) ([]Unenforceable, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("could not list pod network namespaces in %s: %w", dir, err)
	}
	host, err := nsInode(hostNS)
	if err != nil {
		return nil, err
	}
	var out []Unenforceable
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		if ino, err := nsInode(path); err != nil || ino == host {
			continue
		}
		n, err := ns.GetNS(path)
		if err != nil {
			continue // not a namespace (or gone)
		}
		var found []Unenforceable
		err = n.Do(func(ns.NetNS) error {
			links, err := netlinksafe.LinkList()
			if err != nil {
				return err
			}
			for _, l := range links {
				a := l.Attrs()
				kind := l.Type()
				switch {
				case a.RawFlags&unix.IFF_LOOPBACK != 0:
				case kind == "device":
					found = append(found, Unenforceable{NetNS: path, Iface: a.Name, Kind: kind})
				case slices.Contains(bypassKinds, kind) && a.NetNsID >= 0:
					// The lower device is in another namespace.
					found = append(found, Unenforceable{NetNS: path, Iface: a.Name, Kind: kind})
				}
			}
			return nil
		})
		n.Close()
		if err != nil {
			// Entering takes CAP_SYS_ADMIN: without it every namespace
			// would be skipped and the scan would find nothing, silently.
			if ok, cerr := hasSysAdmin(); cerr == nil && !ok {
				return nil, fmt.Errorf("could not enter pod network namespace %s: %w (entering another network namespace takes CAP_SYS_ADMIN, which this process lacks)", path, err)
			}
			continue
		}
		out = append(out, found...)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out, nil
}

// hasSysAdmin reports whether CAP_SYS_ADMIN is in the process's
// effective set.
func hasSysAdmin() (bool, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false, err
	}
	return data[unix.CAP_SYS_ADMIN/32].Effective&(1<<(unix.CAP_SYS_ADMIN%32)) != 0, nil
}

// nsInode identifies a network namespace (the current one for "").
func nsInode(path string) (uint64, error) {
	if path == "" {
		path = "/proc/thread-self/ns/net"
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("could not stat network namespace %s: %w", path, err)
	}
	return st.Ino, nil
}

// scanAttachments runs ScanAttachments for Run: it logs each attachment
// once when it appears, and the count at every change.
// egress_cni_attachment_scan_up says whether the last scan ran: the
// unenforceable count is the last full scan's, and a disabled or failing
// scan must not read as "none found".
func (in *Installer) scanAttachments() {
	if in.opts.NetNSDir == "" {
		in.scanUp.Store(false)
		return
	}
	found, err := ScanAttachments(in.opts.NetNSDir, in.opts.NetNS)
	if err != nil {
		in.scanUp.Store(false)
		in.log.Warn("could not scan pods for host-bypassing attachments", "error", err)
		return
	}
	in.scanUp.Store(true)
	seen := map[string]bool{}
	for _, u := range found {
		seen[u.String()] = true
		if !in.bypassing[u.String()] {
			in.log.Warn("pod has an interface that bypasses the node's IP stack: its traffic is outside egress enforcement",
				"netns", u.NetNS, "iface", u.Iface, "kind", u.Kind)
		}
	}
	if len(seen) != len(in.bypassing) {
		in.log.Info("pods with host-bypassing attachments", "unenforceable", len(seen))
	}
	in.bypassing = seen
	in.unenforceable.Store(int64(len(seen)))
}

// Unenforceable is how many host-bypassing attachments the last scan
// found.
func (in *Installer) Unenforceable() int { return int(in.unenforceable.Load()) }
