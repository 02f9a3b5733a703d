package install

import (
	"fmt"
	"strconv"

	"github.com/egress-cni/egress-cni/pkg/cni"
)

// DefaultEntry is our conflist entry when no plugin config file is given.
// NormalizeEntry adds the pod-annotations capability to it.
const DefaultEntry = `{"type":"egress-cni"}`

// NormalizeEntry checks a plugin entry (the ConfigMap's plugin.json) and
// returns it compact, in its own key order, with "type" set to
// egress-cni and the capability io.kubernetes.cri.pod-annotations
// declared: without it containerd and CRI-O send no annotations and the
// plugin fails closed. The entry is validated by the plugin's own parser,
// so a typo fails the installer, not every pod.
func NormalizeEntry(b []byte) ([]byte, error) {
	c, err := compactJSON(b)
	if err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	doc, err := parseDocument(c)
	if err != nil {
		return nil, err
	}
	switch t, ok := doc.get("type"); {
	case !ok:
		c = splice(c, span{1, 1}, []byte(`"type":`+strconv.Quote(cni.PluginType)+sep(doc.members)))
	case string(doc.raw(t)) != strconv.Quote(cni.PluginType):
		return nil, fmt.Errorf(`"type" is %s, want %q`, doc.raw(t), cni.PluginType)
	}
	if doc, err = parseDocument(c); err != nil {
		return nil, err
	}
	capKey := strconv.Quote(cni.PodAnnotationsCapability)
	if cs, ok := doc.get("capabilities"); !ok {
		c = appendMember(c, doc.members, span{0, len(c)}, `"capabilities":{`+capKey+`:true}`)
	} else {
		ms, err := objectMembers(c, cs)
		if err != nil {
			return nil, fmt.Errorf(`"capabilities": %w`, err)
		}
		found := false
		for _, m := range ms {
			if m.key == cni.PodAnnotationsCapability {
				found = true
				if string(doc.raw(m.val)) != "true" {
					c = splice(c, m.val, []byte("true"))
				}
			}
		}
		if !found {
			c = appendMember(c, ms, cs, capKey+`:true`)
		}
	}
	if _, err := cni.ParseConfig(c); err != nil {
		return nil, fmt.Errorf("rejected by the %s plugin: %w", cni.PluginType, err)
	}
	return c, nil
}

func sep(ms []member) string {
	if len(ms) > 0 {
		return ","
	}
	return ""
}

// appendMember adds kv as the last member of the compact object spanning
// obj, whose members are ms.
func appendMember(c []byte, ms []member, obj span, kv string) []byte {
	if len(ms) == 0 {
		// "{}" compact: insert after '{'.
		return splice(c, span{obj.start + 1, obj.start + 1}, []byte(kv))
	}
	end := ms[len(ms)-1].val.end
	return splice(c, span{end, end}, []byte(","+kv))
}
