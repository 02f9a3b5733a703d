package rules

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// BackendName names a backend. The same names are used in flags, config
// files, logs and docs.
type BackendName string

const (
	BackendAuto           BackendName = "auto"
	BackendNFTables       BackendName = "nftables"
	BackendIPTablesNFT    BackendName = "iptables-nft"
	BackendIPTablesLegacy BackendName = "iptables-legacy"
)

// BackendNames lists the accepted names, auto first.
var BackendNames = []BackendName{BackendAuto, BackendNFTables, BackendIPTablesNFT, BackendIPTablesLegacy}

// ParseBackendName parses a backend name.
func ParseBackendName(field, s string) (BackendName, error) {
	for _, n := range BackendNames {
		if strings.TrimSpace(s) == string(n) {
			return n, nil
		}
	}
	names := make([]string, len(BackendNames))
	for i, n := range BackendNames {
		names[i] = string(n)
	}
	return "", fieldErr(field, s, "must be one of "+strings.Join(names, ", "))
}

// BackendOptions tunes backend construction. The zero value is fine.
type BackendOptions struct {
	// LockWait bounds how long the iptables-legacy flavour waits for the
	// xtables lock (iptables-restore --wait). Zero means 5 seconds.
	LockWait time.Duration
}

// Backend programs a Ruleset into the network namespace of the calling
// OS thread. Callers that target another namespace run it inside
// netns.Do. Every method is safe to call on a namespace that holds none
// of our rules.
//
// ctx bounds the work. The iptables backends run their save and restore
// binaries under it: cancelling kills the binary, and since a restore
// commits only at its COMMIT line a killed one changes nothing; Apply
// still rolls back a family it already wrote. The nftables backend
// checks ctx before it sends its one batch; a batch once sent completes
// (the kernel applies it whole or not at all).
type Backend interface {
	// Name is the backend's name, never BackendAuto.
	Name() BackendName
	// Render returns the ruleset in the backend's own syntax (nft -f
	// syntax, or iptables-save format), for dry runs and golden tests.
	Render(rs *Ruleset) (string, error)
	// Apply makes the namespace hold exactly rs: atomically, and
	// idempotently. Rules we wrote before are replaced, never
	// duplicated; rules we do not own are left alone.
	Apply(ctx context.Context, rs *Ruleset) error
	// Check compares the live state with rs. It returns a *DriftError
	// naming what is missing or extra, or another error if the state
	// could not be read.
	Check(ctx context.Context, rs *Ruleset) error
	// Remove deletes everything we own and nothing else. It succeeds
	// when there is nothing to remove.
	Remove(ctx context.Context) error
}

// unknownBackend is the error for a backend name we do not know.
func unknownBackend(n BackendName) error {
	return fmt.Errorf("unknown backend %q", n)
}
