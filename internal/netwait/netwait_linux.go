// Package netwait waits for links to be usable. It depends on nothing of
// ours, so the test harness and the demo can both use it.
package netwait

import (
	"fmt"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// LinkReady waits until the link (in the calling thread's namespace)
// has carrier and a usable IPv6 link-local address. A veth's carrier
// comes up asynchronously, and only then does IPv6 configure the link:
// before that, the first IPv6 connection would stall on neighbour
// discovery. The test harness (internal/nstest) uses it too.
func LinkReady(name string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		link, err := netlinksafe.LinkByName(name)
		if err != nil {
			return fmt.Errorf("could not find %s: %w", name, err)
		}
		if link.Attrs().OperState == netlink.OperUp {
			addrs, err := netlinksafe.AddrList(link, netlink.FAMILY_V6)
			if err != nil {
				return fmt.Errorf("could not list addresses of %s: %w", name, err)
			}
			for _, a := range addrs {
				if a.IP.IsLinkLocalUnicast() && a.Flags&unix.IFA_F_TENTATIVE == 0 {
					return nil
				}
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("link %s not ready after 5s (operstate %s)", name, link.Attrs().OperState)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
