package install

import (
	"fmt"

	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// ApplyNodeRules loads Options.NodeConfig (re-read every time, so a
// ConfigMap update takes effect at the next resync) and applies the node
// rules for its role in Options.NetNS. No NodeConfig: nothing to do.
func (in *Installer) ApplyNodeRules() error {
	if in.opts.NodeConfig == "" {
		return nil
	}
	cfg, err := node.Load(in.opts.NodeConfig)
	if err != nil {
		return err
	}
	if err := netns.Do(in.opts.NetNS, func() error { return node.Apply(cfg) }); err != nil {
		return fmt.Errorf("could not apply %s node rules: %w", cfg.Role, err)
	}
	in.log.Info("applied node rules", "role", cfg.Role, "config", in.opts.NodeConfig)
	return nil
}

// CheckNodeRules compares the live node rules with the config and, on
// drift, logs it and applies them again.
func (in *Installer) CheckNodeRules() error {
	if in.opts.NodeConfig == "" {
		return nil
	}
	cfg, err := node.Load(in.opts.NodeConfig)
	if err != nil {
		return err
	}
	drift := netns.Do(in.opts.NetNS, func() error { return node.Check(cfg) })
	if drift == nil {
		return nil
	}
	in.log.Warn("node rules drifted; applying them again", "drift", drift)
	return in.ApplyNodeRules()
}

// RemoveNodeRules deletes our node tables in Options.NetNS, nothing else.
func (in *Installer) RemoveNodeRules() error {
	if err := netns.Do(in.opts.NetNS, node.Remove); err != nil {
		return fmt.Errorf("could not remove node rules: %w", err)
	}
	return nil
}
