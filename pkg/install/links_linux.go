package install

import (
	"context"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// watchLinks follows the links of the node rules' namespace and signals
// the name of every link that went away or was renamed. A pod's
// registration names its host veth; a pod with CAP_NET_ADMIN in the
// initial user namespace can delete or rename another pod's veth through
// the node's netnsid and move a veth of its own in under that name (the
// red team's finding). Dropping the registration as soon as the name
// stops meaning the veth the plugin found at ADD leaves such a link
// unregistered. It returns nil without a node config.
func (in *Installer) watchLinks(ctx context.Context) <-chan string {
	if in.opts.NodeConfig == "" {
		return nil
	}
	gone := make(chan string, 64)
	go func() {
		for ctx.Err() == nil {
			if err := in.followLinks(ctx, gone); err != nil && ctx.Err() == nil {
				in.log.Warn("could not follow the node's links (registrations of vanished links are then kept until DEL or GC)", "error", err)
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
		}
	}()
	return gone
}

func (in *Installer) followLinks(ctx context.Context, gone chan<- string) error {
	updates := make(chan netlink.LinkUpdate, 256)
	done := make(chan struct{})
	defer close(done)
	errs := make(chan error, 1)
	err := netns.Do(in.opts.NetNS, func() error {
		return netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{
			ListExisting: true,
			ErrorCallback: func(err error) {
				select {
				case errs <- err:
				default:
				}
			},
		})
	})
	if err != nil {
		return err
	}
	names := map[int32]string{} // ifindex -> name
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errs:
			return err
		case u, ok := <-updates:
			if !ok {
				return nil
			}
			idx, name := u.Index, u.Attrs().Name
			prev, known := names[idx]
			switch {
			case u.Header.Type == unix.RTM_DELLINK:
				delete(names, idx)
				gone <- name
			case known && prev != name:
				names[idx] = name
				gone <- prev
			default:
				names[idx] = name
			}
		}
	}
}

// dropRegistrationsOf removes the registrations whose host interface was
// name.
func (in *Installer) dropRegistrationsOf(name string) {
	var removed []node.Pod
	err := netns.Do(in.opts.NetNS, func() error {
		pods, err := node.ListPods()
		if err != nil {
			return err
		}
		ids := map[string]bool{}
		for _, p := range pods {
			if p.Port == name || (p.Routed() && p.L3 == name) {
				ids[p.ContainerID] = true
			}
		}
		if len(ids) == 0 {
			return nil
		}
		removed, err = node.UnregisterPods(func(id string) bool { return ids[id] })
		return err
	})
	if err != nil {
		in.log.Warn("could not drop the registration of a vanished link", "link", name, "error", err)
		return
	}
	for _, p := range removed {
		in.log.Warn("a pod's host interface went away or was renamed: its registration is removed", "link", name, "pod", p.String())
	}
}
