package nstest

import (
	"fmt"
	"regexp"
	"slices"
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

// iptablesTables are the tables iptables knows; only they are candidates
// for WithoutEmptyTables.
var iptablesTables = map[string]bool{"nat": true, "filter": true, "mangle": true, "raw": true, "security": true}

// WithoutEmptyTables drops, from a dump made by NFTDump, IPTSave or
// DumpAll, the iptables tables that hold no rule and no user chain: an
// iptables-save block of only built-in chains with policy ACCEPT, or an
// "ip"/"ip6" nft table of only empty base chains with policy accept.
//
// Such tables appear as a side effect of merely using iptables in a
// namespace (iptables-legacy registers a table when it is read,
// iptables-nft creates the base chains it touches) and stay after the
// last rule is gone. They match nothing, so comparisons that ask "did
// anything of ours, or anything that filters, change?" ignore them.
// Comparisons that must be exact use the raw dump.
func WithoutEmptyTables(dump string) string {
	lines := strings.Split(dump, "\n")
	var out []string
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		// iptables-save: "*nat" ... "COMMIT".
		if name, ok := strings.CutPrefix(l, "*"); ok && iptablesTables[name] {
			j, empty := i+1, true
			for ; j < len(lines) && lines[j] != "COMMIT"; j++ {
				if !strings.HasPrefix(lines[j], ":") || !strings.Contains(lines[j], " ACCEPT ") ||
					strings.HasPrefix(lines[j], ": ") {
					empty = false
				}
			}
			if empty && j < len(lines) {
				i = j
				continue
			}
		}
		// nft: "table ip nat {" ... "}" at column 0.
		if f := strings.Fields(l); len(f) == 4 && f[0] == "table" && (f[1] == "ip" || f[1] == "ip6") &&
			iptablesTables[f[2]] && f[3] == "{" {
			j, empty := i+1, true
			for ; j < len(lines) && lines[j] != "}"; j++ {
				s := strings.TrimSpace(lines[j])
				switch {
				case s == "", s == "}", strings.HasPrefix(s, "chain ") && strings.HasSuffix(s, "{"):
				case strings.HasPrefix(s, "type ") && strings.HasSuffix(s, "policy accept;"):
				default:
					empty = false
				}
			}
			if empty && j < len(lines) {
				i = j
				continue
			}
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

var chainLine = regexp.MustCompile(`(?m)^\s*chain (\S+) \{`)

// DeleteChains deletes every chain of table fam name in n, keeping its
// sets (with their elements) and objects: a control that runs traffic
// without a table's rules but keeps its state. (Flushing is not enough
// for a table whose chains have a drop policy.)
func DeleteChains(t testing.TB, n ns.NetNS, fam, table string) {
	t.Helper()
	out := MustExec(t, n, "nft", "list", "table", fam, table)
	// Every chain is flushed before any is deleted: a jump to a chain
	// holds it.
	var flush, del []string
	for _, m := range chainLine.FindAllStringSubmatch(out, -1) {
		flush = append(flush, fmt.Sprintf("flush chain %s %s %s", fam, table, m[1]))
		del = append(del, fmt.Sprintf("delete chain %s %s %s", fam, table, m[1]))
	}
	cmds := slices.Concat(flush, del)
	if len(cmds) > 0 {
		MustExec(t, n, "nft", strings.Join(cmds, "; "))
	}
}
