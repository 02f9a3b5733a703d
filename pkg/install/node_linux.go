package install

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

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
	// One read: the copy is written from the bytes that were parsed and
	// applied, never from a second read that a ConfigMap update could
	// have changed in between (found by the fifth red-team pass).
	b, err := os.ReadFile(in.opts.NodeConfig)
	if err != nil {
		return fmt.Errorf("could not read node config: %w", err)
	}
	cfg, err := node.Parse(b)
	if err != nil {
		return fmt.Errorf("node config %s: %w", in.opts.NodeConfig, err)
	}
	start := time.Now()
	if err := netns.Do(in.opts.NetNS, func() error { return node.Apply(cfg) }); err != nil {
		return fmt.Errorf("could not apply %s node rules: %w", cfg.Role, err)
	}
	in.applySeconds.Observe(time.Since(start).Seconds())
	in.log.Info("applied node rules", "role", cfg.Role, "config", in.opts.NodeConfig)
	return in.keepNodeConfigCopy(b)
}

// keepNodeConfigCopy writes b, the node config just applied (so the copy
// never holds one that fails to parse), to NodeConfigCopy, atomically,
// when it differs.
func (in *Installer) keepNodeConfigCopy(b []byte) error {
	if in.opts.NodeConfigCopy == "" {
		return nil
	}
	if cur, err := os.ReadFile(in.opts.NodeConfigCopy); err == nil && bytes.Equal(cur, b) {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(in.opts.NodeConfigCopy), 0o755); err != nil {
		return fmt.Errorf("could not create the node config copy's directory: %w", err)
	}
	if err := writeAtomic(in.opts.NodeConfigCopy, b, 0o644, nil, nil); err != nil {
		return fmt.Errorf("could not keep the node config copy for the plugin: %w", err)
	}
	in.log.Info("node config kept on the host for the plugin", "file", in.opts.NodeConfigCopy)
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

// RemoveNodeRules deletes the plugin's node config copy (so that no ADD
// applies the rules again), then our node tables in Options.NetNS, then
// the pod identity records in Options.StateDir, nothing else.
func (in *Installer) RemoveNodeRules() error {
	if in.opts.NodeConfigCopy != "" {
		if err := os.Remove(in.opts.NodeConfigCopy); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("could not remove the node config copy: %w", err)
		}
	}
	if err := netns.Do(in.opts.NetNS, node.Remove); err != nil {
		return fmt.Errorf("could not remove node rules: %w", err)
	}
	// The pods' identity records: no DEL removes them once our entry is
	// gone from the chain.
	if in.opts.StateDir != "" {
		if _, err := node.RemoveIdentities(in.opts.StateDir, func(string) bool { return true }); err != nil {
			return fmt.Errorf("could not remove the pod identity records: %w", err)
		}
	}
	return nil
}
