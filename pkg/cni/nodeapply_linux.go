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
// that someone other than root could have written: the copy decides what
// the node allows at the next boot (the fifth red-team pass: a pod with a
// writable hostPath over /var/lib). The file must not be a symlink, and
// it and its directory must be root's and writable by root only. It is
// opened without following a link and checked and read through the same
// descriptor, so nothing can be swapped in between.
func loadNodeCopy(path string) (*node.Config, error) {
	dir := filepath.Dir(path)
	dst, err := os.Lstat(dir)
	if err != nil {
		return nil, err
	}
	if err := rootOnly(dir, dst); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("node config copy: %s is a symbolic link: it must be a file of root's", path)
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("node config copy: %s is not a regular file", path)
	}
	if err := rootOnly(path, st); err != nil {
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

// rootOnly refuses a file or directory that is a symbolic link, is not
// root's, or that group or others may write.
func rootOnly(path string, st os.FileInfo) error {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("node config copy: cannot read the owner of %s", path)
	}
	if st.Mode()&os.ModeSymlink != 0 || sys.Uid != 0 || st.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("node config copy: %s is %s, owner %d: it must be root's and writable by root only", path, st.Mode(), sys.Uid)
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
