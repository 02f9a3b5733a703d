package cni

import (
	"errors"
	"fmt"
	"os"

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

// ErrNoNodeConfig is BootApply's error when the host holds no copy of
// the node config: a node the agent has not yet run on.
var ErrNoNodeConfig = errors.New("no node config copy")

// BootApply applies the node rules from the host's copy of the node
// config at path, unless they are in place, under the same lock as the
// ADDs (so it may race them). It is `egress-cni boot-apply PATH`, which
// the boot unit (install/systemd) runs before the network comes up, so
// that a rebooted node forwards nothing unjudged: the first ADD would
// come only after the kubelet, and pods on other nodes do not need one
// to leave through this node's NodePorts or overlay. It reports whether
// it applied them; without a copy it returns an error wrapping
// ErrNoNodeConfig and applies nothing.
func BootApply(path string) (bool, error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("%s: %w", path, ErrNoNodeConfig)
	}
	return (&Plugin{}).applyNodeRules(path)
}
