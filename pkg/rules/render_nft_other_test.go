//go:build !linux

package rules

import "testing"

// checkNFTRendering: the nftables renderer is Linux-only (see the package
// documentation), so off Linux FuzzConfig checks the iptables rendering
// alone.
func checkNFTRendering(*testing.T, *Ruleset) {}
