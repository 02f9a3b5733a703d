// Package rules is the pod layer's engine: the capture model (Config,
// Ruleset), its parsers and option registry, Build, Trace, the
// iptables-save renderer and the backends that program a network
// namespace.
//
// Platforms. The model, the parsers, Build, Trace and the iptables
// renderer are plain Go and build and test on any OS (`make lint`
// type-checks them, tests included, for darwin and windows). Everything
// that talks to a kernel is Linux-only and lives in _linux.go files: the
// nftables renderer and backend (google/nftables needs Linux constants),
// the iptables backends, Probe and RemoveAll. Elsewhere NewBackend and
// Detect return an error wrapping errors.ErrUnsupported.
package rules
