package rules

import (
	"fmt"
	"slices"
	"strings"
)

// The iptables-save parsers and the iptables-restore input writers:
// plain text, so they build and test on any OS (the backend that runs
// the binaries is ipt_linux.go).

// tablesLines is the lines of every table, those of tables other than
// nat prefixed with "<table>: ".
func tablesLines(ts []*iptTable) []string {
	var out []string
	for _, t := range ts {
		for _, l := range t.lines() {
			if t.table() != "nat" {
				l = t.table() + ": " + l
			}
			out = append(out, l)
		}
	}
	return out
}

// iptApplyInput is the restore input that replaces have with want.
func iptApplyInput(want, have *iptTable) string {
	var b strings.Builder
	b.WriteString("*" + want.table() + "\n")
	// Under --noflush, declaring a chain creates it or flushes it.
	chains := slices.Clone(want.Chains)
	var stale []string
	for _, c := range have.Chains {
		if !slices.Contains(chains, c) {
			stale = append(stale, c)
		}
	}
	for _, c := range append(chains, stale...) {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, l := range have.Entry {
		b.WriteString(deleteLine(l))
	}
	for _, c := range stale {
		fmt.Fprintf(&b, "-X %s\n", c)
	}
	for _, l := range want.Entry {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	for _, l := range want.Rules {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// iptRemoveInput is the restore input that deletes everything in have,
// or "" when have is empty.
func iptRemoveInput(have *iptTable) string {
	if have.empty() {
		return ""
	}
	var b strings.Builder
	b.WriteString("*" + have.table() + "\n")
	for _, c := range have.Chains {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, l := range have.Entry {
		b.WriteString(deleteLine(l))
	}
	for _, c := range have.Chains {
		fmt.Fprintf(&b, "-X %s\n", c)
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// deleteLine turns a saved "-A CHAIN spec" into "-D CHAIN spec\n". The
// spec that iptables-save prints is one restore accepts back.
func deleteLine(l string) string {
	return "-D" + strings.TrimPrefix(l, "-A") + "\n"
}

// parseIPTSave extracts what we own in the nat table from iptables-save
// output: our chain declarations, our chains' rules, and our entry rules
// in PREROUTING and OUTPUT. The result is in iptTable's canonical order,
// whatever order the flavour prints chains in.
func parseIPTSave(out string, f Family) *iptTable { return parseIPTSaveTable(out, f, "nat") }

// parseIPTSaveAll is parseIPTSave for every table we write (iptTables
// order).
func parseIPTSaveAll(out string, f Family) []*iptTable {
	ts := make([]*iptTable, 0, len(iptTables))
	for _, tb := range iptTables {
		ts = append(ts, parseIPTSaveTable(out, f, tb))
	}
	return ts
}

func parseIPTSaveTable(out string, f Family, table string) *iptTable {
	t := &iptTable{Family: f}
	if table != "nat" {
		t.Table = table
	}
	rules := map[string][]string{}
	entry := map[string][]string{}
	in := false
	for _, l := range strings.Split(out, "\n") {
		l = strings.TrimRight(l, " \r")
		switch {
		case strings.HasPrefix(l, "*"):
			in = l == "*"+table
		case !in:
		case strings.HasPrefix(l, ":"):
			name, _, _ := strings.Cut(l[1:], " ")
			if isIPTChainIn(table, name) && !slices.Contains(t.Chains, name) {
				t.Chains = append(t.Chains, name)
			}
		case strings.HasPrefix(l, "-A "):
			chain, _, _ := strings.Cut(l[3:], " ")
			switch {
			case isIPTChainIn(table, chain):
				rules[chain] = append(rules[chain], l)
			case slices.Contains(iptBuiltins, chain) && isOurEntryIn(table, l):
				entry[chain] = append(entry[chain], l)
			}
		}
	}
	slices.Sort(t.Chains)
	for _, c := range iptBuiltins {
		t.Entry = append(t.Entry, entry[c]...)
	}
	for _, c := range t.Chains {
		t.Rules = append(t.Rules, rules[c]...)
	}
	return t
}

// isOurEntry reports whether a saved rule in a built-in chain is ours:
// it carries our comment, or it jumps (or goes) to one of our chains.
func isOurEntry(l string) bool { return isOurEntryIn("nat", l) }

func isOurEntryIn(table, l string) bool {
	fields := iptFields(l)
	for i := 0; i+1 < len(fields); i++ {
		switch fields[i] {
		case "--comment":
			if fields[i+1] == Comment {
				return true
			}
		case "-j", "-g":
			if isIPTChainIn(table, fields[i+1]) {
				return true
			}
		}
	}
	return false
}

// iptFields splits a saved rule into its words as iptables-restore
// reads them: a double-quoted word (iptables-save quotes a comment with
// spaces, "like this", and escapes quotes inside it as \") is one
// word, without its quotes. So a foreign comment that merely starts
// with our name, or holds "-j ISTIO_OUTPUT", is not taken for ours.
func iptFields(l string) []string {
	var out []string
	var w strings.Builder
	inWord, quoted := false, false
	for i := 0; i < len(l); i++ {
		c := l[i]
		switch {
		case quoted && c == '\\' && i+1 < len(l) && (l[i+1] == '"' || l[i+1] == '\\'):
			i++
			w.WriteByte(l[i])
		case c == '"':
			quoted, inWord = !quoted, true
		case !quoted && (c == ' ' || c == '\t'):
			if inWord {
				out = append(out, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		out = append(out, w.String())
	}
	return out
}
