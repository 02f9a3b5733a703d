package rules

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// The parsers below take outside input (flags, annotations, CNI config)
// and return typed values or a *FieldError naming the field and the value.
// They are strict: an empty item in a list ("a,,b" or a trailing comma) is
// an error, not something to skip. Spaces around items are allowed, since
// annotations are often written "10.0.0.0/8, 172.16.0.0/12".

// splitList splits a comma-separated list. "" is the empty list.
func splitList(field, s string) ([]string, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	parts := strings.Split(s, ",")
	for i, p := range parts {
		parts[i] = strings.TrimSpace(p)
		if parts[i] == "" {
			return nil, fieldErr(field, s, fmt.Sprintf("item %d of the list is empty", i+1))
		}
	}
	return parts, nil
}

// ParseCIDRList parses a list of CIDRs, or "*" for every address. A bare
// address is taken as a host route (/32 or /128). Host bits are cleared
// (10.1.2.3/8 means 10.0.0.0/8), as iptables and Istio do. The result is
// sorted and free of duplicates.
func ParseCIDRList(field, s string) (all bool, out []netip.Prefix, err error) {
	items, err := splitList(field, s)
	if err != nil {
		return false, nil, err
	}
	for _, it := range items {
		if it == "*" {
			if len(items) > 1 {
				return false, nil, fieldErr(field, s, "'*' must be the only item")
			}
			return true, nil, nil
		}
		p, err := parsePrefix(it)
		if err != nil {
			return false, nil, fieldErr(field, it, err.Error())
		}
		out = append(out, p)
	}
	return false, normalizePrefixes(out), nil
}

func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			addr, bits, _ := strings.Cut(s, "/")
			if a, aerr := netip.ParseAddr(addr); aerr == nil {
				if n, nerr := strconv.Atoi(bits); nerr != nil || n < 0 || n > a.BitLen() {
					return netip.Prefix{}, fmt.Errorf("prefix length %q is out of range 0-%d", bits, a.BitLen())
				}
				if a.Zone() != "" {
					return netip.Prefix{}, fmt.Errorf("zoned addresses are not allowed")
				}
			}
			return netip.Prefix{}, fmt.Errorf("not a CIDR: %w", err)
		}
		if p.Addr().Is4In6() {
			return netip.Prefix{}, fmt.Errorf("IPv4-mapped IPv6 prefixes are ambiguous; write the IPv4 CIDR")
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("not a CIDR or IP address")
	}
	if a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("zoned addresses are not allowed")
	}
	if a.Is4In6() {
		return netip.Prefix{}, fmt.Errorf("IPv4-mapped IPv6 addresses are ambiguous; write the IPv4 address")
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func normalizePrefixes(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(ps)
}

// ParsePort parses one port, 1-65535.
func ParsePort(field, s string) (uint16, error) {
	s = strings.TrimSpace(s)
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fieldErr(field, s, "not a port number")
	}
	if n < 1 || n > 65535 {
		return 0, fieldErr(field, s, "port must be between 1 and 65535")
	}
	return uint16(n), nil
}

// ParsePortList parses "80,443,8000-8080" (ranges with '-' or ':'),
// in the order given.
// allowAll permits "*" (every port), returned as all=true.
func ParsePortList(field, s string, allowAll bool) (all bool, out []PortRange, err error) {
	items, err := splitList(field, s)
	if err != nil {
		return false, nil, err
	}
	for _, it := range items {
		if it == "*" {
			if !allowAll {
				return false, nil, fieldErr(field, it, "'*' is not allowed here; list the ports")
			}
			if len(items) > 1 {
				return false, nil, fieldErr(field, s, "'*' must be the only item")
			}
			return true, nil, nil
		}
		lo, hi, isRange := strings.Cut(it, "-")
		if !isRange {
			lo, hi, isRange = strings.Cut(it, ":")
		}
		from, err := ParsePort(field, lo)
		if err != nil {
			return false, nil, err
		}
		to := from
		if isRange {
			if to, err = ParsePort(field, hi); err != nil {
				return false, nil, err
			}
			if to < from {
				return false, nil, fieldErr(field, it, "range end is below its start")
			}
		}
		out = append(out, PortRange{from, to})
	}
	// The user's order is kept, as istio-iptables keeps it (one rule per
	// port, in that order); only repeats are dropped.
	return false, dedup(out), nil
}

func dedup[T comparable](in []T) []T {
	out := in[:0]
	for _, v := range in {
		if !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	return out
}

// ParseIDList parses a list of UIDs or GIDs. Only numbers are accepted:
// names would need the image's /etc/passwd, which a CNI plugin on the
// host does not have.
func ParseIDList(field, s string) ([]uint32, error) {
	items, err := splitList(field, s)
	if err != nil {
		return nil, err
	}
	var out []uint32
	for _, it := range items {
		n, err := strconv.ParseUint(it, 10, 32)
		if err != nil || n == 4294967295 {
			return nil, fieldErr(field, it, "not a numeric ID between 0 and 4294967294")
		}
		if !slices.Contains(out, uint32(n)) {
			out = append(out, uint32(n))
		}
	}
	return out, nil
}

// ParseInterfaceList parses a list of interface names.
func ParseInterfaceList(field, s string) ([]string, error) {
	items, err := splitList(field, s)
	if err != nil {
		return nil, err
	}
	for _, it := range items {
		if err := validIfName(field, it); err != nil {
			return nil, err
		}
	}
	return slices.Compact(items), nil
}

// validIfName applies the kernel's dev_valid_name rules.
func validIfName(field, s string) error {
	if s == "" || len(s) > 15 {
		return fieldErr(field, s, "interface names are 1 to 15 bytes long")
	}
	if s == "." || s == ".." || strings.ContainsAny(s, "/: \t\n\"'") {
		return fieldErr(field, s, "not a valid interface name")
	}
	return nil
}

// ParseMode parses an interception mode (REDIRECT, TPROXY, NONE).
func ParseMode(field, s string) (Mode, error) {
	switch m := Mode(strings.ToUpper(strings.TrimSpace(s))); m {
	case ModeRedirect, ModeTPROXY, ModeNone:
		return m, nil
	}
	return "", fieldErr(field, s, "must be REDIRECT, TPROXY or NONE")
}

// ParseFamilies parses "ipv4", "ipv6" or "dual".
func ParseFamilies(field, s string) (Families, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "ipv4", "v4", "4":
		return IPv4Only, nil
	case "ipv6", "v6", "6":
		return IPv6Only, nil
	case "dual", "dual-stack", "":
		return DualStack, nil
	}
	return 0, fieldErr(field, s, "must be ipv4, ipv6 or dual")
}
