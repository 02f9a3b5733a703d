package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/egress-cni/egress-cni/pkg/cni"
)

// ConvertedFromKey is the top-level key the installer adds to a conflist
// it made out of a single-plugin .conf file. Its value is the .conf's
// base name; uninstall writes the original .conf back from the first
// plugin and removes the conflist. libcni and the runtimes ignore unknown
// top-level keys. Never rename: installed nodes carry it.
const ConvertedFromKey = "egressCNIConvertedFrom"

// pluginType reads the "type" of a plugin entry; "" when absent.
func pluginType(raw []byte) string {
	var p struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(raw, &p)
	return p.Type
}

// chain is a parsed conflist with the spans of its plugins.
type chain struct {
	doc     *document
	plugins span
	elems   []span
}

func parseChain(b []byte) (*chain, error) {
	doc, err := parseDocument(b)
	if err != nil {
		return nil, err
	}
	ps, ok := doc.get("plugins")
	if !ok {
		return nil, errors.New(`no "plugins" list`)
	}
	elems, err := arrayElements(b, ps)
	if err != nil {
		return nil, fmt.Errorf(`"plugins": %w`, err)
	}
	if len(elems) == 0 {
		return nil, errors.New(`empty "plugins" list`)
	}
	for i, e := range elems {
		if b[e.start] != '{' {
			return nil, fmt.Errorf(`"plugins"[%d] is not an object`, i)
		}
	}
	return &chain{doc: doc, plugins: ps, elems: elems}, nil
}

// ours lists the indexes of our entries.
func (c *chain) ours() []int {
	var is []int
	for i, e := range c.elems {
		if pluginType(c.doc.raw(e)) == cni.PluginType {
			is = append(is, i)
		}
	}
	return is
}

// foreign returns the index of an entry whose type is ours but which our
// plugin's parser rejects, or -1. The AWS VPC CNI ships a plugin of its
// own called egress-cni (its IPv6/IPv4 egress helper, "type":
// "egress-cni", installed as /opt/cni/bin/egress-cni), which shares our
// name; touching it, or the binary, would break that CNI.
func (c *chain) foreign() int {
	for _, i := range c.ours() {
		if _, err := cni.ParseConfig(c.doc.raw(c.elems[i])); err != nil {
			return i
		}
	}
	return -1
}

// ForeignEntryError says the chain holds another project's plugin that
// uses our type name. Nothing is changed: neither the config nor the
// binary of that name.
type ForeignEntryError struct {
	Index int
	Entry string
}

func (e *ForeignEntryError) Error() string {
	return fmt.Sprintf("plugins[%d] has type %q but is not an %s entry (our plugin rejects it; the AWS VPC CNI ships a different plugin of that name): "+
		"refusing to touch it or /opt/cni/bin/%s: %s", e.Index, cni.PluginType, cni.PluginType, cni.PluginType, e.Entry)
}

// hasEntry reports whether the chain ends with exactly our entry.
func (c *chain) hasEntry(entry []byte) bool {
	is := c.ours()
	if len(is) != 1 || is[0] != len(c.elems)-1 {
		return false
	}
	got, err := compactJSON(c.doc.raw(c.elems[is[0]]))
	return err == nil && bytes.Equal(got, entry)
}

// ensureEntry makes entry (compact JSON) the last plugin of the conflist
// b, exactly once. It returns b itself, unchanged, when that already
// holds; the action says what it did.
func ensureEntry(b, entry []byte) ([]byte, string, error) {
	c, err := parseChain(b)
	if err != nil {
		return nil, "", err
	}
	if i := c.foreign(); i >= 0 {
		return nil, "", &ForeignEntryError{Index: i, Entry: string(c.doc.raw(c.elems[i]))}
	}
	if c.hasEntry(entry) {
		return b, ActionNone, nil
	}
	is := c.ours()
	if len(is) == 1 && is[0] == len(c.elems)-1 {
		return replaceElement(b, c.elems, is[0], entry), ActionReplaced, nil
	}
	action := ActionInserted
	if len(is) > 0 {
		action = ActionMoved
	}
	b, err = removeOurEntries(b)
	if err != nil {
		return nil, "", err
	}
	c, err = parseChain(b)
	if err != nil {
		return nil, "", err
	}
	return appendElement(b, c.plugins, c.elems, entry), action, nil
}

// removeOurEntries removes every entry of ours. A conflist that held nothing
// but ours is an error: removing it would leave an invalid file.
func removeOurEntries(b []byte) ([]byte, error) {
	for {
		c, err := parseChain(b)
		if err != nil {
			return nil, err
		}
		if i := c.foreign(); i >= 0 {
			return nil, &ForeignEntryError{Index: i, Entry: string(c.doc.raw(c.elems[i]))}
		}
		is := c.ours()
		if len(is) == 0 {
			return b, nil
		}
		if len(c.elems) == 1 {
			return nil, fmt.Errorf("the chain holds only %s; refusing to leave an empty plugin list", cni.PluginType)
		}
		b = removeElement(b, c.elems, is[0])
	}
}

// embedIndent is added to every line of a .conf embedded as the first
// plugin of the conflist that replaces it.
const embedIndent = "    "

// convertConf turns the single-plugin config conf (from file name) into a
// conflist whose plugins are conf itself, byte for byte apart from
// indentation, and entry. name and cniVersion are copied to the top
// level, which libcni requires; they stay in the plugin too (libcni
// overwrites them there anyway), so the original can be written back.
func convertConf(conf []byte, name string, entry []byte) ([]byte, error) {
	doc, err := parseDocument(conf)
	if err != nil {
		return nil, err
	}
	if pluginType(conf) == "" {
		return nil, errors.New(`no "type": not a plugin config`)
	}
	if _, ok := doc.get("plugins"); ok {
		return nil, errors.New(`has a "plugins" list but is not a .conflist`)
	}
	if pluginType(conf) == cni.PluginType {
		return nil, fmt.Errorf("its plugin type is %s itself; a chained plugin cannot be the only one", cni.PluginType)
	}
	nameSpan, ok := doc.get("name")
	if !ok {
		return nil, errors.New(`no "name": a conflist needs one`)
	}
	var b bytes.Buffer
	b.WriteString("{\n")
	if v, ok := doc.get("cniVersion"); ok {
		fmt.Fprintf(&b, "  \"cniVersion\": %s,\n", doc.raw(v))
	}
	fmt.Fprintf(&b, "  \"name\": %s,\n", doc.raw(nameSpan))
	from, _ := json.Marshal(name)
	fmt.Fprintf(&b, "  %q: %s,\n", ConvertedFromKey, from)
	b.WriteString("  \"plugins\": [\n" + embedIndent)
	b.Write(indentLines(bytes.TrimSpace(conf), embedIndent))
	b.WriteString(",\n" + embedIndent)
	b.Write(format(entry, true, embedIndent, "  "))
	b.WriteString("\n  ]\n}\n")
	return b.Bytes(), nil
}

// restoreConf is the inverse of convertConf for a conflist without our
// entry: it returns the .conf file name and its original bytes, or ok
// false when b was not made by convertConf (or was changed since so that
// it no longer holds exactly one plugin).
func restoreConf(b []byte) (name string, conf []byte, ok bool, err error) {
	c, err := parseChain(b)
	if err != nil {
		return "", nil, false, err
	}
	v, has := c.doc.get(ConvertedFromKey)
	if !has {
		return "", nil, false, nil
	}
	if err := json.Unmarshal(c.doc.raw(v), &name); err != nil || !validConfName(name) {
		return "", nil, false, fmt.Errorf("%s: %s is not a config file name", ConvertedFromKey, c.doc.raw(v))
	}
	if len(c.elems) != 1 {
		return "", nil, false, nil
	}
	conf, exact := unindentLines(c.doc.raw(c.elems[0]), embedIndent)
	if !exact {
		var out bytes.Buffer
		if err := json.Indent(&out, conf, "", "  "); err == nil {
			conf = out.Bytes()
		}
	}
	return name, append(conf, '\n'), true, nil
}

// validConfName accepts a plain file name with a single-plugin config
// extension, nothing with a directory part.
func validConfName(n string) bool {
	if n == "" || n != filepath.Base(n) || strings.HasPrefix(n, ".") {
		return false
	}
	ext := filepath.Ext(n)
	return ext == ".conf" || ext == ".json"
}
