package rules

import (
	"strconv"
	"strings"
	"testing"
)

// The fuzz targets cover every parser of outside input in this package.
// The property: never panic; either a *FieldError that names the field
// (and a value that occurs in the input), or a Config whose Ruleset passes
// the model check and renders in both backends' syntaxes.

func checkFieldError(t *testing.T, field, input string, err error) {
	t.Helper()
	fe, ok := AsFieldError(err)
	if !ok {
		t.Fatalf("error is not a FieldError: %v", err)
	}
	if fe.Field != field {
		t.Fatalf("error names field %q, want %q: %v", fe.Field, field, err)
	}
	if !strings.Contains(input, strings.TrimSpace(fe.Value)) {
		t.Fatalf("error value %q does not occur in the input %q", fe.Value, input)
	}
}

func FuzzParseCIDRList(f *testing.F) {
	for _, s := range []string{"", "*", "10.0.0.0/8", "10.0.0.0/33", "2001:db8::/32,192.0.2.1", "a,,b", " 10.1.2.3/8 , ::1", "::ffff:1.2.3.4/120", "fe80::1%eth0/64", "1.2.3.4/-1", "0.0.0.0/0,::/0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		all, ps, err := ParseCIDRList("f", s)
		if err != nil {
			checkFieldError(t, "f", s, err)
			return
		}
		if all && len(ps) > 0 {
			t.Fatal("'*' with prefixes")
		}
		for _, p := range ps {
			if !p.IsValid() || p != p.Masked() {
				t.Fatalf("invalid or unmasked prefix %v from %q", p, s)
			}
			// Round trip: a parsed prefix parses to itself.
			_, again, err := ParseCIDRList("f", p.String())
			if err != nil || len(again) != 1 || again[0] != p {
				t.Fatalf("round trip of %v: %v %v", p, again, err)
			}
		}
	})
}

func FuzzParsePortList(f *testing.F) {
	for _, s := range []string{"", "*", "80", "70000", "1-65535", "9000-8000", "80,,443", "8000:8080", "-1", "0"} {
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, s string, allowAll bool) {
		all, ps, err := ParsePortList("f", s, allowAll)
		if err != nil {
			checkFieldError(t, "f", s, err)
			return
		}
		if all && !allowAll {
			t.Fatal("'*' accepted where not allowed")
		}
		for _, p := range ps {
			if p.From == 0 || p.To < p.From {
				t.Fatalf("bad range %v from %q", p, s)
			}
		}
	})
}

func FuzzParseIDList(f *testing.F) {
	for _, s := range []string{"1337", "0", "4294967295", "-1", "abc", "1337,1338", "1,,2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ids, err := ParseIDList("f", s)
		if err != nil {
			checkFieldError(t, "f", s, err)
			return
		}
		for _, id := range ids {
			if id == 4294967295 {
				t.Fatal("(uid_t)-1 accepted")
			}
		}
	})
}

// FuzzConfig drives every option at once through ApplyOptions and Build.
func FuzzConfig(f *testing.F) {
	f.Add("15001", "15006", "1337", "1337", "REDIRECT", "*", "", "*", "15090,15021,15020", "", "", "", "dual", false)
	f.Add("15001", "15006", "1337", "", "REDIRECT", "203.0.113.0/25", "203.0.113.64/26", "8080,9000-9001", "", "8443", "3306", "eth1", "ipv4", true)
	f.Add("0", "15006", "x", "1337", "TPROXY", "10.0.0.0/33", "", "*", "", "", "", "", "ipv6", false)
	f.Fuzz(func(t *testing.T, proxyPort, inPort, uid, gid, mode, incl, excl, inIncl, inExcl, outIncl, outExcl, ifaces, fams string, dns bool) {
		cfg := DefaultConfig()
		err := cfg.ApplyOptions(OptionText{
			FieldProxyPort: proxyPort, FieldInboundPort: inPort, FieldProxyUID: uid, FieldProxyGID: gid, FieldMode: mode,
			FieldOutboundIncludeCIDRs: incl, FieldOutboundExcludeCIDRs: excl, FieldInboundIncludePorts: inIncl,
			FieldInboundExcludePorts: inExcl, FieldOutboundIncludePorts: outIncl, FieldOutboundExcludePorts: outExcl,
			FieldExcludeInterfaces: ifaces, FieldFamilies: fams, FieldRedirectDNS: strconv.FormatBool(dns),
		})
		if err != nil {
			if _, ok := AsFieldError(err); !ok {
				t.Fatalf("ApplyOptions: not a FieldError: %v", err)
			}
			return
		}
		rs, err := Build(cfg)
		if err != nil {
			if _, ok := AsFieldError(err); !ok {
				t.Fatalf("Build: not a FieldError: %v", err)
			}
			return
		}
		if err := rs.Validate(); err != nil {
			t.Fatalf("Build produced an invalid model: %v", err)
		}
		checkNFTRendering(t, rs)
		if _, err := renderIPTables(rs); err != nil {
			t.Fatalf("iptables rendering: %v", err)
		}
	})
}
