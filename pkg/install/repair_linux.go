package install

import (
	"context"
	"time"

	"github.com/google/nftables"

	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// watchNodeRules subscribes to nftables changes in the node rules'
// namespace and signals on the returned channel whenever a transaction
// deleted something of ours (a table, chain, rule, set or object of
// egress_cni_node): `nft flush table`, `nft delete table`, a firewall
// service reloading, `nft flush ruleset`. Per-pod element changes (the
// plugin's ADD and DEL) do not signal. The subscription is renewed after
// an error (a monitor socket overflow loses events, so that signals
// too). It returns nil without a node config.
func (in *Installer) watchNodeRules(ctx context.Context) <-chan struct{} {
	if in.opts.NodeConfig == "" {
		return nil
	}
	sig := make(chan struct{}, 1)
	notify := func() {
		select {
		case sig <- struct{}{}:
		default:
		}
	}
	go func() {
		for ctx.Err() == nil {
			events, mon, err := in.subscribe()
			if err != nil {
				in.log.Warn("could not watch the node rules (the resync still checks them)", "error", err)
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
				continue
			}
			in.watching.Store(true)
			func() {
				defer mon.Close()
				for {
					select {
					case <-ctx.Done():
						return
					case batch, ok := <-events:
						if !ok {
							notify() // events may have been lost
							return
						}
						if touchesOurs(batch) {
							notify()
						}
					}
				}
			}()
			in.watching.Store(false)
		}
	}()
	return sig
}

func (in *Installer) subscribe() (chan *nftables.MonitorEvents, *nftables.Monitor, error) {
	var events chan *nftables.MonitorEvents
	// Every message, filtered in touchesOurs: with an action filter
	// google/nftables v0.3.0 also drops the NEWGEN message that ends a
	// transaction, and a generational monitor then never delivers.
	mon := nftables.NewMonitor(nftables.WithMonitorEventBuffer(64))
	err := netns.Do(in.opts.NetNS, func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		// The monitor's socket is made here, in the node rules'
		// namespace, and stays there.
		events, err = c.AddGenerationalMonitor(mon)
		return err
	})
	return events, mon, err
}

// touchesOurs: the batch deleted a table, chain, rule, set or object of
// ours, or reported an error.
func touchesOurs(b *nftables.MonitorEvents) bool {
	if b.GeneratedBy != nil && b.GeneratedBy.Type == nftables.MonitorEventTypeOOB {
		return true
	}
	for _, e := range b.Changes {
		switch e.Type {
		case nftables.MonitorEventTypeDelTable, nftables.MonitorEventTypeDelChain, nftables.MonitorEventTypeDelRule,
			nftables.MonitorEventTypeDelSet, nftables.MonitorEventTypeDelObj, nftables.MonitorEventTypeOOB:
		default:
			continue
		}
		var t *nftables.Table
		switch d := e.Data.(type) {
		case *nftables.Table:
			t = d
		case *nftables.Chain:
			t = d.Table
		case *nftables.Rule:
			t = d.Table
		case *nftables.Set:
			t = d.Table
		case nftables.Obj:
			if c, ok := d.(*nftables.CounterObj); ok {
				t = c.Table
			}
		case []nftables.SetElement:
			continue
		}
		if e.Type == nftables.MonitorEventTypeOOB || (t != nil && t.Name == node.Table) {
			return true
		}
	}
	return false
}

// repairNodeRules checks the node rules and applies them again on drift,
// logging and counting each repair with how long it took from the first
// signal.
func (in *Installer) repairNodeRules(reason string, since time.Time) {
	if in.opts.NodeConfig == "" {
		return
	}
	cfg, err := node.Load(in.opts.NodeConfig)
	if err != nil {
		in.log.Error("node rules", "error", err)
		return
	}
	drift := netns.Do(in.opts.NetNS, func() error { return node.Check(cfg) })
	if drift == nil {
		return
	}
	if err := in.ApplyNodeRules(); err != nil {
		in.log.Error("could not repair the node rules", "reason", reason, "drift", drift, "error", err)
		return
	}
	n := in.repairs.Add(1)
	in.log.Warn("repaired the node rules", "reason", reason, "drift", drift, "took", time.Since(since), "repairs", n)
}

// Repairs is how many times Run found the node rules changed and applied
// them again.
func (in *Installer) Repairs() int64 { return in.repairs.Load() }

// Watching says whether Run's nftables monitor is subscribed.
func (in *Installer) Watching() bool { return in.watching.Load() }
