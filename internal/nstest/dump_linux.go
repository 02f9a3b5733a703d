package nstest

import (
	"regexp"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
)

// Flavours of IPTSave, named like the rules package's backends.
const (
	FlavourNFT    = "iptables-nft"
	FlavourLegacy = "iptables-legacy"
)

var (
	nftCounters = regexp.MustCompile(`packets \d+ bytes \d+`)
	iptCounters = regexp.MustCompile(`\[\d+:\d+\]`)
)

// NFTDump returns `nft list ruleset` run inside the namespace, with
// counter values zeroed so that dumps taken around traffic compare equal.
// It includes iptables-nft's tables. For tests only: it needs the nft
// binary, which production code must not.
func NFTDump(t testing.TB, n ns.NetNS) string {
	t.Helper()
	out := MustExec(t, n, "nft", "list", "ruleset")
	return nftCounters.ReplaceAllString(out, "packets 0 bytes 0")
}

// IPTSave returns iptables-save followed by ip6tables-save of the given
// flavour (FlavourNFT or FlavourLegacy) run inside the namespace, without
// the "# Generated/Completed" comment lines and with counters zeroed. The
// two families are introduced by "## ipv4" and "## ipv6" lines.
//
// Listing the legacy tables does not load any, so IPTSave(FlavourLegacy)
// of a namespace nobody used with iptables-legacy is empty per family.
func IPTSave(t testing.TB, n ns.NetNS, flavour string) string {
	t.Helper()
	var v4, v6 string
	switch flavour {
	case FlavourNFT:
		v4, v6 = "iptables-nft-save", "ip6tables-nft-save"
	case FlavourLegacy:
		v4, v6 = "iptables-legacy-save", "ip6tables-legacy-save"
	default:
		t.Fatalf("IPTSave: unknown flavour %q", flavour)
	}
	var b strings.Builder
	for _, c := range []struct{ fam, cmd string }{{"ipv4", v4}, {"ipv6", v6}} {
		b.WriteString("## " + c.fam + "\n")
		for _, l := range strings.Split(MustExec(t, n, c.cmd), "\n") {
			if l == "" || strings.HasPrefix(l, "#") {
				continue
			}
			b.WriteString(iptCounters.ReplaceAllString(l, "[0:0]") + "\n")
		}
	}
	return b.String()
}

// DumpAll is the whole firewall state of the namespace as all three
// tools see it: NFTDump, then IPTSave of both flavours. Compare it before
// and after an operation to prove nothing else changed.
func DumpAll(t testing.TB, n ns.NetNS) string {
	t.Helper()
	return "### nft list ruleset\n" + NFTDump(t, n) +
		"### " + FlavourNFT + "\n" + IPTSave(t, n, FlavourNFT) +
		"### " + FlavourLegacy + "\n" + IPTSave(t, n, FlavourLegacy)
}
