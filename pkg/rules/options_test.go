package rules

import (
	"strings"
	"testing"
)

// The registry's invariants: every row parses both its defaults, names
// are unique across flags, short flags, variables, annotations and
// config keys, and a flag's variable is Istio's: the flag name
// upper-cased with '-' as '_'.
func TestOptionRegistry(t *testing.T) {
	seen := map[string]string{}
	claim := func(kind, name, row string) {
		if name == "" {
			return
		}
		if prev, ok := seen[kind+" "+name]; ok {
			t.Errorf("%s %q is used by %s and %s", kind, name, prev, row)
		}
		seen[kind+" "+name] = row
	}
	for _, o := range CaptureOptions {
		if o.set == nil {
			t.Errorf("%s has no parser", o.Name)
			continue
		}
		for _, v := range []string{o.Default, o.PodDefault} {
			var c Config
			if err := o.set(&c, v); err != nil {
				t.Errorf("%s: default %q does not parse: %v", o.Name, v, err)
			}
		}
		if !o.NoFlag {
			claim("flag", o.Name, o.Name)
			claim("flag", o.Short, o.Name)
			for _, a := range o.Aliases {
				claim("flag", a, o.Name)
			}
			if o.Env != "" && o.Env != strings.ToUpper(strings.ReplaceAll(o.Name, "-", "_")) {
				t.Errorf("%s: env %s is not the flag name upper-cased", o.Name, o.Env)
			}
		} else if o.Env != o.Name {
			t.Errorf("%s: an environment-only option is named after its variable", o.Name)
		}
		claim("env", o.Env, o.Name)
		for _, e := range o.EnvAliases {
			claim("env", e, o.Name)
		}
		for _, a := range o.Annotations {
			claim("annotation", a, o.Name)
		}
		claim("config key", o.ConfigKey, o.Name)
	}
	// A bad value is an error naming the row.
	var c Config
	for _, o := range CaptureOptions {
		if err := o.set(&c, "\x00bad"); err == nil {
			continue // some rows (interface lists) reject differently; covered by the parser tests
		} else if fe, ok := AsFieldError(err); !ok || fe.Field != o.Name {
			t.Errorf("%s: error %v does not name the option", o.Name, err)
		}
	}
}
