package cni

import (
	"errors"
	"fmt"

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
	cfg, err := node.Load(path)
	if err != nil {
		return false, err
	}
	if err := node.Apply(cfg); err != nil {
		return false, err
	}
	return true, nil
}
