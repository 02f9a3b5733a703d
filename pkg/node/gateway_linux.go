package node

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// Gateway is one exempt (host-side interface, address) pair. ContainerID
// is stored as the element's comment, so DEL without a prevResult and GC
// can find the entries of a container.
type Gateway struct {
	Iface       string
	IP          netip.Addr
	ContainerID string
}

func (g Gateway) String() string {
	return fmt.Sprintf("%s . %s (container %s)", g.Iface, g.IP, shortID(g.ContainerID))
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// ErrNotApplied says the node tables are missing: gateway updates need
// `egress-node apply` (or the installer) to have run first.
var ErrNotApplied = errors.New("node rules are not applied (table inet " + Table + " is missing); run egress-node apply first")

// AddGateways exempts gateways: one netlink batch adding each pair to the
// gateway sets of both tables. Cost does not depend on how many gateways
// or rules exist.
func AddGateways(gws ...Gateway) error {
	if len(gws) == 0 {
		return nil
	}
	for _, g := range gws {
		if g.Iface == "" || len(g.Iface) >= ifNameSize || !g.IP.IsValid() || g.IP.Zone() != "" {
			return fmt.Errorf("invalid gateway %q / %v: need a host interface name and an IP address", g.Iface, g.IP)
		}
	}
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		for _, g := range gws {
			s := gatewaySet(t, g.IP.Is6())
			if err := c.SetAddElements(s, []nftables.SetElement{{Key: gatewayKey(g.Iface, g.IP.Unmap()), Comment: g.ContainerID}}); err != nil {
				return err
			}
		}
	}
	if err := c.Flush(); err != nil {
		if isNotFound(err) {
			return ErrNotApplied
		}
		return fmt.Errorf("could not add gateways: %w", err)
	}
	return nil
}

// ListGateways returns the gateways of the inet table.
func ListGateways() ([]Gateway, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	return listGateways(c, inetTable)
}

func listGateways(c *nftables.Conn, t *nftables.Table) ([]Gateway, error) {
	var out []Gateway
	for _, v6 := range []bool{false, true} {
		s, err := c.GetSetByName(t, gatewaySet(t, v6).Name)
		if err != nil {
			if isNotFound(err) {
				return nil, ErrNotApplied
			}
			return nil, fmt.Errorf("could not look up gateway set: %w", err)
		}
		els, err := c.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("could not list gateway set %s: %w", s.Name, err)
		}
		for _, e := range els {
			if len(e.Key) < ifNameSize {
				continue
			}
			name := strings.TrimRight(string(e.Key[:ifNameSize]), "\x00")
			ip, ok := netip.AddrFromSlice(e.Key[ifNameSize:])
			if !ok {
				continue
			}
			out = append(out, Gateway{Iface: name, IP: ip, ContainerID: e.Comment})
		}
	}
	return out, nil
}

// RemoveGateways deletes every gateway entry for which match returns true,
// from both tables, in one batch, and returns what it removed. It
// succeeds when nothing matches and when the tables are absent.
//
// Another remover (a second DEL of the same container, GC, an ADD
// dropping stale entries) may delete a listed entry first: the kernel
// then refuses the whole batch (ENOENT) and nothing of it happened, so
// the entries are listed again and the batch retried.
func RemoveGateways(match func(Gateway) bool) ([]Gateway, error) {
	const attempts = 10
	var err error
	for range attempts {
		var removed []Gateway
		removed, err = removeGatewaysOnce(match)
		if err == nil || !isNotFound(err) {
			return removed, err
		}
	}
	return nil, fmt.Errorf("could not remove gateways: entries kept changing under %d attempts: %w", attempts, err)
}

func removeGatewaysOnce(match func(Gateway) bool) ([]Gateway, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer c.CloseLasting()
	var removed []Gateway
	for _, t := range []*nftables.Table{inetTable, bridgeTable} {
		gws, err := listGateways(c, t)
		if errors.Is(err, ErrNotApplied) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, g := range gws {
			if !match(g) {
				continue
			}
			if err := c.SetDeleteElements(gatewaySet(t, g.IP.Is6()), []nftables.SetElement{{Key: gatewayKey(g.Iface, g.IP)}}); err != nil {
				return nil, err
			}
			if t == inetTable {
				removed = append(removed, g)
			}
		}
	}
	if err := c.Flush(); err != nil {
		return nil, fmt.Errorf("could not remove gateways: %w", err)
	}
	return removed, nil
}

func isNotFound(err error) bool {
	return errors.Is(err, unix.ENOENT) || strings.Contains(err.Error(), "no such file or directory")
}
