package rules

import (
	"errors"
	"fmt"
	"net"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// AddIPv6Passthrough puts ::6/128 on the calling thread's namespace's lo,
// as istio-iptables does when it programs IPv6: the proxy uses ::6 as the
// source of its inbound passthrough connections (as 127.0.0.6 for IPv4,
// which lo's 127.0.0.0/8 already covers), which the rules exempt, and the
// validation probe dials it. It is idempotent. egress-init and the CNI
// plugin (for a pod with an IPv6 address) call it after Apply.
func AddIPv6Passthrough() error {
	lo, err := netlinksafe.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("could not find lo: %w", err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("::6"), Mask: net.CIDRMask(128, 128)}}
	if err := netlink.AddrAdd(lo, addr); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("could not add ::6/128 to lo: %w", err)
	}
	return nil
}

// RemoveIPv6Passthrough takes ::6/128 off lo again, succeeding when it is
// not there. The CNI plugin's DEL calls it: the reference loopback
// plugin refuses a lo that holds a non-loopback address, so an ADD into
// the same namespace after DEL would fail on it.
func RemoveIPv6Passthrough() error {
	lo, err := netlinksafe.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("could not find lo: %w", err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("::6"), Mask: net.CIDRMask(128, 128)}}
	if err := netlink.AddrDel(lo, addr); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("could not remove ::6/128 from lo: %w", err)
	}
	return nil
}
