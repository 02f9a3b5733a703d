package rules

import (
	"fmt"

	"github.com/google/nftables"
)

// NewBackend returns the named backend. BackendAuto is resolved with
// Detect in the calling thread's network namespace, so call it inside
// netns.Do when the target is another namespace.
func NewBackend(name BackendName, opts BackendOptions) (Backend, error) {
	if name == BackendAuto || name == "" {
		d, err := Detect()
		if err != nil {
			return nil, err
		}
		name = d
	}
	switch name {
	case BackendNFTables:
		return newNFTBackend(), nil
	case BackendIPTablesNFT, BackendIPTablesLegacy:
		return newIPTBackend(name, opts), nil
	}
	return nil, unknownBackend(name)
}

// Detect resolves "auto" in the calling thread's network namespace. The
// rule is deterministic and reads only kernel state (no binary is run):
//
//  1. our nftables table exists: nftables (keep what we wrote);
//  2. legacy xtables are in use here (/proc/thread-self/net/ip_tables_names
//     or ip6_tables_names lists a table): iptables-legacy, because mixing
//     legacy and nft rules in one namespace is the field's classic
//     failure;
//  3. an ISTIO_OUTPUT chain exists in an iptables-nft table (rules of a
//     previous iptables-nft run, or of istio-iptables): iptables-nft;
//  4. otherwise: nftables.
//
// Once we have applied rules, rule 1 or 3 holds on every later run, so
// the choice never flips for a namespace.
func Detect() (BackendName, error) {
	conn, err := nftables.New()
	if err != nil {
		return "", fmt.Errorf("could not open nftables netlink socket: %w", err)
	}
	defer conn.CloseLasting()
	tables, err := conn.ListTables()
	if err != nil {
		return "", fmt.Errorf("could not list nftables tables: %w", err)
	}
	natTable := false
	for _, t := range tables {
		if t.Name == NFTTable {
			return BackendNFTables, nil
		}
		if t.Name == "nat" && (t.Family == nftables.TableFamilyIPv4 || t.Family == nftables.TableFamilyIPv6) {
			natTable = true
		}
	}
	if legacyInUse() {
		return BackendIPTablesLegacy, nil
	}
	if !natTable {
		// No iptables-nft nat table, so no ISTIO_OUTPUT chain either:
		// spare a fresh pod's ADD the chain listing.
		return BackendNFTables, nil
	}
	chains, err := conn.ListChains()
	if err != nil {
		return "", fmt.Errorf("could not list nftables chains: %w", err)
	}
	for _, c := range chains {
		if c.Name == ChainOutput && c.Table != nil && c.Table.Name == "nat" {
			return BackendIPTablesNFT, nil
		}
	}
	return BackendNFTables, nil
}
