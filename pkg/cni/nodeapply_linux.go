package cni

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"github.com/egress-cni/egress-cni/internal/flock"
	"github.com/egress-cni/egress-cni/pkg/node"
	"golang.org/x/sys/unix"
)

// applyNodeRules applies the node rules from the config at path unless
// they are in place, under an exclusive lock on path+".lock", so that
// many ADDs racing at boot apply them once: the first takes the lock and
// applies, the others find them in place. It reports whether this call
// applied them. The lock file lives next to the config, on the host
// (see internal/flock).
func (p *Plugin) applyNodeRules(path string) (bool, error) {
	if p.NodeRules != nil {
		return p.NodeRules(path)
	}
	l, err := flock.Acquire(path + ".lock")
	if err != nil {
		return false, fmt.Errorf("node rules lock: %w", err)
	}
	defer l.Release()
	if _, err := node.IsEgressNode(); err == nil {
		return false, nil // another ADD applied them meanwhile
	} else if !errors.Is(err, node.ErrNotApplied) {
		return false, err
	}
	cfg, err := loadNodeCopy(path)
	if err != nil {
		return false, err
	}
	if err := node.Apply(cfg); err != nil {
		return false, err
	}
	return true, nil
}

// ErrNoNodeConfig is BootApply's error when the host holds no copy of
// the node config: a node the agent has not yet run on.
var ErrNoNodeConfig = errors.New("no node config copy")

// loadNodeCopy reads the host's copy of the node config, refusing one
// that someone other than root could have written or swapped: the copy
// decides what the node allows at the next boot (the fifth and sixth
// red-team passes: a pod with a writable hostPath over /var/lib; a
// symlinked directory pointing into a container image's files, which
// are root's). Every directory from / down to the copy must be root's and
// not writable by group or others (a sticky one excepted), the directory
// and the file must not be symbolic links, and the file must be a
// regular file of root's, writable by root only, with one link. The
// directory is opened without following a link, the file is opened
// relative to it the same way, and the checks and the read use those
// descriptors, so nothing can be swapped in between. Root on the node
// (or in a container without a user namespace, with a hostPath) can
// still write it: that is node compromise, out of scope.
func loadNodeCopy(path string) (*node.Config, error) {
	path = filepath.Clean(path)
	dir, base := filepath.Split(path)
	dir = filepath.Clean(dir)
	for d := filepath.Dir(dir); ; d = filepath.Dir(d) {
		st, err := os.Lstat(d)
		if err != nil {
			return nil, err
		}
		if err := rootOnly(d, st, true); err != nil {
			return nil, err
		}
		if d == "/" || d == "." {
			break
		}
	}
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("node config copy: could not open %s (a symbolic link is refused): %w", dir, err)
	}
	defer unix.Close(dfd)
	var dst unix.Stat_t
	if err := unix.Fstat(dfd, &dst); err != nil {
		return nil, err
	}
	if err := rootOnlyStat(dir, &dst, false); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(dfd, base, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ELOOP) {
		return nil, fmt.Errorf("node config copy: %s is a symbolic link: it must be a file of root's", path)
	}
	if err != nil {
		return nil, fmt.Errorf("node config copy: %w", &os.PathError{Op: "open", Path: path, Err: err})
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Nlink != 1 {
		return nil, fmt.Errorf("node config copy: %s must be a regular file with one link", path)
	}
	if err := rootOnlyStat(path, &st, false); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("could not read node config: %w", err)
	}
	cfg, err := node.Parse(b)
	if err != nil {
		return nil, fmt.Errorf("node config %s: %w", path, err)
	}
	return cfg, nil
}

// rootOnly refuses a file or directory (st from Lstat) that is a
// symbolic link, is not root's, or that group or others may write; with
// sticky, a world-writable sticky directory (/tmp) passes.
func rootOnly(path string, st os.FileInfo, sticky bool) error {
	if st.Mode()&os.ModeSymlink != 0 {
		return fmt.Errorf("node config copy: %s is a symbolic link", path)
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("node config copy: cannot read the owner of %s", path)
	}
	var u unix.Stat_t
	u.Uid, u.Mode = sys.Uid, sys.Mode
	return rootOnlyStat(path, &u, sticky)
}

func rootOnlyStat(path string, st *unix.Stat_t, sticky bool) error {
	writable := st.Mode&0o022 != 0
	if sticky && st.Mode&unix.S_ISVTX != 0 {
		writable = false
	}
	if st.Uid != 0 || writable {
		return fmt.Errorf("node config copy: %s has mode %o, owner %d: it must be root's and writable by root only", path, st.Mode&0o7777, st.Uid)
	}
	return nil
}

// BootApply is `egress-cni boot-apply PATH`, which the boot unit
// (install/systemd) runs before the network comes up, so that a rebooted
// node forwards nothing unjudged: the first ADD would come only after the
// kubelet, and pods on other nodes need none to leave through this
// node's NodePorts or overlay. Under the ADDs' lock it applies the node
// rules from the host's copy at path, whatever tables of ours it finds
// (a restored snapshot of an older ruleset is replaced, not taken for
// ours), and drops every pod and gateway registration: none survives a
// reboot. When the copy is missing, refused or fails, it applies
// ApplyFailClosed instead (the node then forwards nothing until the
// agent or an ADD applies the rules) and returns the error, which wraps
// ErrNoNodeConfig for a missing copy. It is for boot: run at any other
// time it drops the running pods' registrations too.
func BootApply(path string) error {
	err := bootApply(path)
	if err == nil {
		return nil
	}
	if ferr := node.ApplyFailClosed(); ferr != nil {
		return errors.Join(err, fmt.Errorf("and the fail-closed table could not be applied either: %w", ferr))
	}
	return fmt.Errorf("%w; applied the fail-closed table: this node forwards nothing until the egress-cni agent applies its rules", err)
}

func bootApply(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s: %w", path, ErrNoNodeConfig)
	}
	cfg, err := loadNodeCopy(path)
	if err != nil {
		return err
	}
	l, err := flock.Acquire(path + ".lock")
	if err != nil {
		return fmt.Errorf("node rules lock: %w", err)
	}
	defer l.Release()
	if err := node.Apply(cfg); err != nil {
		return err
	}
	if _, err := node.UnregisterPods(func(string) bool { return true }); err != nil {
		return fmt.Errorf("could not drop the registrations from before the boot: %w", err)
	}
	return nil
}
