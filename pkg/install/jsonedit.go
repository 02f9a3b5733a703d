package install

// Byte-preserving JSON editing. The installer never decodes a CNI config
// into a map and marshals it back: that would reorder keys, reformat
// numbers and drop the primary CNI's layout. Instead it scans the document
// for the byte spans of the top-level members and of the elements of the
// "plugins" array, and splices: inserting our entry adds ",<ws><entry>"
// after the last element, removing it cuts exactly that back out. So an
// uninstall after an install gives back the original bytes, and every
// other plugin is byte-equal throughout.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// span is a half-open byte range [start, end) of a JSON value.
type span struct{ start, end int }

// member is one key/value pair of a JSON object, with byte spans.
type member struct {
	key string
	val span
}

func isWS(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

func skipWS(b []byte, i int) int {
	for i < len(b) && isWS(b[i]) {
		i++
	}
	return i
}

// valueEnd returns the end offset of the JSON value starting at b[i].
func valueEnd(b []byte, i int) (int, error) {
	dec := json.NewDecoder(bytes.NewReader(b[i:]))
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		return 0, err
	}
	return i + int(dec.InputOffset()), nil
}

// objectMembers scans the object whose value spans s in b.
func objectMembers(b []byte, s span) ([]member, error) {
	i := skipWS(b, s.start)
	if i >= s.end || b[i] != '{' {
		return nil, errors.New("not a JSON object")
	}
	i = skipWS(b, i+1)
	var ms []member
	if i < s.end && b[i] == '}' {
		return ms, nil
	}
	for {
		if i >= s.end || b[i] != '"' {
			return nil, fmt.Errorf("expected a key at offset %d", i)
		}
		kend, err := valueEnd(b, i)
		if err != nil {
			return nil, err
		}
		var key string
		if err := json.Unmarshal(b[i:kend], &key); err != nil {
			return nil, err
		}
		i = skipWS(b, kend)
		if i >= s.end || b[i] != ':' {
			return nil, fmt.Errorf("expected ':' at offset %d", i)
		}
		i = skipWS(b, i+1)
		vend, err := valueEnd(b, i)
		if err != nil {
			return nil, err
		}
		ms = append(ms, member{key: key, val: span{i, vend}})
		i = skipWS(b, vend)
		if i < s.end && b[i] == ',' {
			i = skipWS(b, i+1)
			continue
		}
		if i < s.end && b[i] == '}' {
			return ms, nil
		}
		return nil, fmt.Errorf("expected ',' or '}' at offset %d", i)
	}
}

// arrayElements scans the array whose value spans s in b.
func arrayElements(b []byte, s span) ([]span, error) {
	i := skipWS(b, s.start)
	if i >= s.end || b[i] != '[' {
		return nil, errors.New("not a JSON array")
	}
	i = skipWS(b, i+1)
	var es []span
	if i < s.end && b[i] == ']' {
		return es, nil
	}
	for {
		end, err := valueEnd(b, i)
		if err != nil {
			return nil, err
		}
		es = append(es, span{i, end})
		i = skipWS(b, end)
		if i < s.end && b[i] == ',' {
			i = skipWS(b, i+1)
			continue
		}
		if i < s.end && b[i] == ']' {
			return es, nil
		}
		return nil, fmt.Errorf("expected ',' or ']' at offset %d", i)
	}
}

// document is a parsed top-level JSON object.
type document struct {
	b       []byte
	members []member
}

// parseDocument checks that b is exactly one JSON object (with optional
// surrounding whitespace) and indexes its members. Duplicate keys are
// refused: which one a runtime honours is up to its decoder.
func parseDocument(b []byte) (*document, error) {
	if !json.Valid(b) {
		var v any
		err := json.Unmarshal(b, &v)
		if err == nil {
			err = errors.New("invalid JSON")
		}
		return nil, err
	}
	start := skipWS(b, 0)
	if start >= len(b) || b[start] != '{' {
		return nil, errors.New("not a JSON object")
	}
	ms, err := objectMembers(b, span{start, len(b)})
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, m := range ms {
		if seen[m.key] {
			return nil, fmt.Errorf("duplicate key %q", m.key)
		}
		seen[m.key] = true
	}
	return &document{b: b, members: ms}, nil
}

func (d *document) get(key string) (span, bool) {
	for _, m := range d.members {
		if m.key == key {
			return m.val, true
		}
	}
	return span{}, false
}

func (d *document) raw(s span) []byte { return d.b[s.start:s.end] }

// lineIndent returns the whitespace that starts the line holding offset i,
// when only whitespace precedes i on that line; "" otherwise.
func lineIndent(b []byte, i int) (string, bool) {
	j := i
	for j > 0 && (b[j-1] == ' ' || b[j-1] == '\t') {
		j--
	}
	if j == 0 || b[j-1] == '\n' {
		return string(b[j:i]), true
	}
	return "", false
}

// indentUnit guesses the document's indentation step from the first
// nested line: the indentation of the first member of v relative to v's
// own line. Two spaces when it cannot tell.
func indentUnit(b []byte, v span) string {
	outer, ok := lineIndent(b, v.start)
	if !ok {
		return "  "
	}
	i := skipWS(b, v.start+1)
	inner, ok := lineIndent(b, i)
	if ok && len(inner) > len(outer) && strings.HasPrefix(inner, outer) {
		return inner[len(outer):]
	}
	return "  "
}

// format renders a compact JSON value for insertion at a place whose line
// starts with prefix: indented with unit when the surroundings are
// multi-line, compact when they are not.
func format(compact []byte, multiline bool, prefix, unit string) []byte {
	if !multiline {
		return compact
	}
	var out bytes.Buffer
	if err := json.Indent(&out, compact, prefix, unit); err != nil {
		return compact
	}
	return out.Bytes()
}

// compactJSON returns the compact form of a JSON value.
func compactJSON(b []byte) ([]byte, error) {
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// splice returns b with [s.start, s.end) replaced by repl.
func splice(b []byte, s span, repl []byte) []byte {
	out := make([]byte, 0, len(b)-(s.end-s.start)+len(repl))
	out = append(out, b[:s.start]...)
	out = append(out, repl...)
	return append(out, b[s.end:]...)
}

// appendElement inserts compact as the last element of the non-empty
// array arr, formatted like the element before it.
func appendElement(b []byte, arr span, elems []span, compact []byte) []byte {
	last := elems[len(elems)-1]
	// The separator before the new element copies the one before the
	// last element (or the space after '[' for a single element).
	var sep []byte
	if len(elems) > 1 {
		prev := elems[len(elems)-2]
		i := skipWS(b, prev.end)
		sep = b[i+1 : last.start] // after the comma
	} else {
		sep = b[skipWS(b, arr.start)+1 : last.start]
	}
	multiline := bytes.ContainsRune(sep, '\n')
	prefix, _ := lineIndent(b, last.start)
	unit := indentUnit(b, last)
	ins := []byte{','}
	ins = append(ins, sep...)
	ins = append(ins, format(compact, multiline, prefix, unit)...)
	return splice(b, span{last.end, last.end}, ins)
}

// removeElement cuts element i out of the array, with the separator that
// joins it to its neighbour, so that appendElement followed by
// removeElement is the identity.
func removeElement(b []byte, elems []span, i int) []byte {
	switch {
	case i > 0:
		return splice(b, span{elems[i-1].end, elems[i].end}, nil)
	case len(elems) > 1:
		return splice(b, span{elems[0].start, elems[1].start}, nil)
	default:
		return splice(b, elems[0], nil)
	}
}

// replaceElement replaces element i with compact, formatted for its place.
func replaceElement(b []byte, elems []span, i int, compact []byte) []byte {
	e := elems[i]
	prefix, ok := lineIndent(b, e.start)
	multiline := ok && bytes.ContainsRune(b[e.start:e.end], '\n')
	return splice(b, e, format(compact, multiline, prefix, indentUnit(b, e)))
}

// indentLines adds prefix after every newline of a JSON text. JSON strings
// cannot hold a raw newline, so this only touches whitespace between
// tokens, and unindentLines undoes it exactly.
func indentLines(b []byte, prefix string) []byte {
	return bytes.ReplaceAll(b, []byte("\n"), []byte("\n"+prefix))
}

// unindentLines removes prefix after every newline; ok is false when some
// line lacks it (then b is returned re-indented by json.Indent instead).
func unindentLines(b []byte, prefix string) ([]byte, bool) {
	lines := bytes.Split(b, []byte("\n"))
	for i := 1; i < len(lines); i++ {
		if !bytes.HasPrefix(lines[i], []byte(prefix)) {
			return b, false
		}
		lines[i] = lines[i][len(prefix):]
	}
	return bytes.Join(lines, []byte("\n")), true
}
