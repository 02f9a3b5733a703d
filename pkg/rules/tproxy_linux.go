package rules

import (
	"errors"
	"fmt"
	"net"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TPROXY mode's policy route, as istio-iptables writes it:
//
//	ip rule add fwmark <mark> lookup <table>
//	ip route add local default dev lo table <table>
//
// per family, through netlink, in the calling thread's namespace
// (egress-init's target, the CNI plugin's pod). Marked
// packets (the inbound connections the mangle rules hand to the proxy's
// transparent socket) are delivered locally by it.

func tproxyFamilies(fs Families) []int {
	var out []int
	if fs.HasV4() {
		out = append(out, unix.AF_INET)
	}
	if fs.HasV6() {
		out = append(out, unix.AF_INET6)
	}
	return out
}

func defaultRoute(fam int) *net.IPNet {
	if fam == unix.AF_INET6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

// ourRules are the policy rules of family fam with the mark and table.
func ourRules(fam int, r *TProxyRoute) ([]netlink.Rule, error) {
	all, err := netlinksafe.RuleListFiltered(fam, &netlink.Rule{Table: int(r.Table), Mark: r.Mark},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_MARK)
	if err != nil {
		return nil, fmt.Errorf("could not list policy rules: %w", err)
	}
	return all, nil
}

// ApplyTProxyRoute writes the policy rule and route, idempotently.
func ApplyTProxyRoute(r *TProxyRoute, fs Families) error {
	lo, err := netlinksafe.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("could not find lo: %w", err)
	}
	for _, fam := range tproxyFamilies(fs) {
		have, err := ourRules(fam, r)
		if err != nil {
			return err
		}
		if len(have) == 0 {
			rule := netlink.NewRule()
			rule.Family, rule.Table, rule.Mark = fam, int(r.Table), r.Mark
			if err := netlink.RuleAdd(rule); err != nil {
				return fmt.Errorf("could not add policy rule fwmark %d lookup %d: %w", r.Mark, r.Table, err)
			}
		}
		route := &netlink.Route{Family: fam, Dst: defaultRoute(fam), Scope: netlink.SCOPE_HOST, Type: unix.RTN_LOCAL,
			Table: int(r.Table), LinkIndex: lo.Attrs().Index}
		if err := netlink.RouteReplace(route); err != nil {
			return fmt.Errorf("could not add route local default dev lo table %d: %w", r.Table, err)
		}
	}
	return nil
}

// RemoveTProxyRoute deletes the policy rules with the mark and table and
// the local default route of the table, in both families.
func RemoveTProxyRoute(r *TProxyRoute) error {
	var errs []error
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		have, err := ourRules(fam, r)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for i := range have {
			if err := netlink.RuleDel(&have[i]); err != nil {
				errs = append(errs, fmt.Errorf("could not delete policy rule: %w", err))
			}
		}
		route := &netlink.Route{Family: fam, Dst: defaultRoute(fam), Table: int(r.Table), Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}
		if err := netlink.RouteDel(route); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			// Absent when TPROXY was never used: nothing to do.
			errs = append(errs, fmt.Errorf("could not delete the route of table %d: %w", r.Table, err))
		}
	}
	return errors.Join(errs...)
}

// CheckTProxyRoute reports a missing policy rule or route as drift.
func CheckTProxyRoute(r *TProxyRoute, fs Families) error {
	drift := &DriftError{Backend: "ip rule/route"}
	for _, fam := range tproxyFamilies(fs) {
		name := "ipv4"
		if fam == unix.AF_INET6 {
			name = "ipv6"
		}
		have, err := ourRules(fam, r)
		if err != nil {
			return err
		}
		if len(have) == 0 {
			drift.Missing = append(drift.Missing, fmt.Sprintf("%s: rule fwmark %d lookup %d", name, r.Mark, r.Table))
		}
		routes, err := netlinksafe.RouteListFiltered(fam, &netlink.Route{Table: int(r.Table)}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return fmt.Errorf("could not list the routes of table %d: %w", r.Table, err)
		}
		found := false
		for _, rt := range routes {
			if rt.Type == unix.RTN_LOCAL && (rt.Dst == nil || rt.Dst.IP.IsUnspecified()) {
				found = true
			}
		}
		if !found {
			drift.Missing = append(drift.Missing, fmt.Sprintf("%s: route local default dev lo table %d", name, r.Table))
		}
	}
	if len(drift.Missing) > 0 {
		return drift
	}
	return nil
}
