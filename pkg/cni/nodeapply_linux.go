package cni

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/pkg/node"
)

// applyNodeRules applies the node rules from the config at path unless
// they are in place, under an exclusive lock on path+".lock", so that
// many ADDs racing at boot apply them once: the first takes the lock and
// applies, the others find them in place. It reports whether this call
// applied them. The lock file lives next to the config, on the host,
// and is never removed (removing a lock file others wait on would let
// two holders in).
func (p *Plugin) applyNodeRules(path string) (bool, error) {
	if p.NodeRules != nil {
		return p.NodeRules(path)
	}
	f, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return false, fmt.Errorf("could not open the node rules lock: %w", err)
	}
	defer f.Close()
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return false, fmt.Errorf("could not lock %s: %w", f.Name(), err)
	}
	defer unix.Flock(int(f.Fd()), unix.LOCK_UN) //nolint:errcheck
	if _, err := node.IsEgressNode(); err == nil {
		return false, nil // another ADD applied them meanwhile
	} else if !errors.Is(err, node.ErrNotApplied) {
		return false, err
	}
	cfg, err := node.Load(path)
	if err != nil {
		return false, err
	}
	if err := node.Apply(cfg); err != nil {
		return false, err
	}
	return true, nil
}
