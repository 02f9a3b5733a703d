package rules

import (
	"errors"
	"fmt"
	"strings"
)

// Field names used in errors. They are istio-iptables' long flag names, so
// that an error from egress-init reads like the flag the user typed. The
// CNI plugin re-labels them with its own config keys and annotation names.
const (
	FieldProxyPort            = "envoy-port"
	FieldInboundPort          = "inbound-capture-port"
	FieldInboundTunnelPort    = "inbound-tunnel-port"
	FieldProxyUID             = "proxy-uid"
	FieldProxyGID             = "proxy-gid"
	FieldMode                 = "istio-inbound-interception-mode"
	FieldOutboundIncludeCIDRs = "istio-service-cidr"
	FieldOutboundExcludeCIDRs = "istio-service-exclude-cidr"
	FieldInboundIncludePorts  = "istio-inbound-ports"
	FieldInboundExcludePorts  = "istio-local-exclude-ports"
	FieldOutboundIncludePorts = "istio-outbound-ports"
	FieldOutboundExcludePorts = "istio-local-outbound-ports-exclude"
	FieldExcludeInterfaces    = "istio-exclude-interfaces"
	FieldDNSPort              = "dns-port"
	FieldFamilies             = "families"

	FieldTProxyMark               = "istio-inbound-tproxy-mark"
	FieldTProxyRouteTable         = "istio-inbound-tproxy-route-table"
	FieldRerouteVirtualInterfaces = "kube-virt-interfaces"
	FieldRedirectDNS              = "redirect-dns"
	FieldCaptureAllDNS            = "capture-all-dns"
	FieldDropInvalid              = "drop-invalid"
	FieldDualStack                = "dual-stack"
)

// FieldError is a configuration value that was rejected. Every parser and
// Validate return one, so callers can map it to their own field names and
// error codes.
type FieldError struct {
	Field  string // the field as the caller knows it
	Value  string // the offending value, verbatim
	Reason string
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("invalid %s %q: %s", e.Field, e.Value, e.Reason)
}

func fieldErr(field, value, reason string) *FieldError {
	return &FieldError{Field: field, Value: value, Reason: reason}
}

// AsFieldError returns the FieldError in err's chain, if any.
func AsFieldError(err error) (*FieldError, bool) {
	var fe *FieldError
	ok := errors.As(err, &fe)
	return fe, ok
}

// Relabel returns err with its field name mapped through names (for
// example from "istio-service-exclude-cidr" to the annotation
// "traffic.sidecar.istio.io/excludeOutboundIPRanges"). Other errors are
// returned unchanged.
func Relabel(err error, names map[string]string) error {
	fe, ok := AsFieldError(err)
	if !ok {
		return err
	}
	if n, ok := names[fe.Field]; ok {
		return &FieldError{Field: n, Value: fe.Value, Reason: fe.Reason}
	}
	return err
}

// DriftError reports how the live ruleset differs from the desired one.
// Each entry is a rule, chain or set element in the backend's own syntax.
type DriftError struct {
	Backend string
	Missing []string // desired but not present
	Extra   []string // present in what we own, but not desired
}

func (e *DriftError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s ruleset drift: %d missing, %d extra", e.Backend, len(e.Missing), len(e.Extra))
	const maxShown = 20
	show := func(kind string, items []string) {
		for i, s := range items {
			if i == maxShown {
				fmt.Fprintf(&b, "; ... %d more %s", len(items)-maxShown, kind)
				return
			}
			fmt.Fprintf(&b, "; %s: %s", kind, s)
		}
	}
	show("missing", e.Missing)
	show("extra", e.Extra)
	return b.String()
}

// IsDrift reports whether err says the live state differs from the
// desired state (as opposed to failing to read it).
func IsDrift(err error) bool {
	var d *DriftError
	return errors.As(err, &d)
}

// diffLines compares two ordered lists of rendered lines and returns what
// is missing from have and what is extra in it. Order matters for rules,
// so a line that exists but at the wrong position counts as both.
func diffLines(backend string, want, have []string) error {
	if slicesEqual(want, have) {
		return nil
	}
	d := &DriftError{Backend: backend}
	count := map[string]int{}
	for _, h := range have {
		count[h]++
	}
	for _, w := range want {
		if count[w] > 0 {
			count[w]--
			continue
		}
		d.Missing = append(d.Missing, w)
	}
	count = map[string]int{}
	for _, w := range want {
		count[w]++
	}
	for _, h := range have {
		if count[h] > 0 {
			count[h]--
			continue
		}
		d.Extra = append(d.Extra, h)
	}
	if len(d.Missing) == 0 && len(d.Extra) == 0 {
		d.Missing = []string{"rule order differs from the desired order"}
	}
	return d
}

func slicesEqual(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// MissingBinaryError says a backend needs a program that is not
// installed. Only the iptables backends run programs.
type MissingBinaryError struct {
	Binary  string // e.g. iptables-legacy-restore
	Package string // the Debian package that ships it
}

func (e *MissingBinaryError) Error() string {
	return fmt.Sprintf("%s not found in PATH: install the %q package, or use --backend nftables, which needs no binary", e.Binary, e.Package)
}

// IsBinaryMissing reports whether err says a required program is missing.
func IsBinaryMissing(err error) bool {
	var e *MissingBinaryError
	return errors.As(err, &e)
}

// DiffLines compares the desired and the live state, each as ordered
// lines in a backend's own syntax, and returns nil or a *DriftError.
func DiffLines(backend string, want, have []string) error { return diffLines(backend, want, have) }
