package initcmd

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// Istio's injector (istio master, injection-template.yaml) renders
// these argvs for the istio-init container: pilot-agent's subcommand
// word, the capture flags, the log level, and per setting the optional
// flags. Each variant is written out as rendered.
var (
	argvDefault = []string{"istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
		"-i", "*", "-x", "", "-b", "*", "-d", "15090,15021", "--log_output_level=default:info"}
	// With traffic.sidecar.istio.io/{include,exclude}{Outbound{IPRanges,Ports},InboundPorts}
	// and excludeInterfaces annotations, and status.sidecar.istio.io/port.
	argvAnnotated = []string{"istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
		"-i", "10.0.0.0/8,172.16.0.0/12", "-x", "10.96.0.0/16", "-b", "8080,9090", "-d", "15090,15021,15020",
		"-q", "8443", "-o", "3306,5432", "-c", "eth1", "--log_output_level=default:info"}
	argvJSON = append(slices.Clone(argvDefault), "--log_as_json")
	// With Istio CNI (values.pilot.cni.enabled): validation only.
	argvCNI = append(slices.Clone(argvDefault), "--run-validation", "--skip-rule-apply")
)

func noEnv(string) (string, bool) { return "", false }

func envOf(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func mustParse(t *testing.T, args []string, env map[string]string) *Invocation {
	t.Helper()
	inv, err := ParseEnv(args, envOf(env), io.Discard)
	if err != nil {
		t.Fatalf("%q: %v", args, err)
	}
	return inv
}

func pr(ps ...uint16) []rules.PortRange {
	out := make([]rules.PortRange, len(ps))
	for i, p := range ps {
		out[i] = rules.PortRange{From: p, To: p}
	}
	return out
}

var prefixCmp = cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })

func TestInjectorArgvDefaultPod(t *testing.T) {
	inv := mustParse(t, argvDefault, nil)
	want := rules.DefaultConfig()
	want.InboundExcludePorts = pr(15090, 15021)
	// istio-iptables' default; the CNI plugin's (DefaultConfig) is to
	// capture DNS to every address, having no resolv.conf to read.
	want.CaptureAllDNS = false
	if d := cmp.Diff(want, inv.Config, prefixCmp); d != "" {
		t.Errorf("config (-want +got):\n%s", d)
	}
	if inv.Action != ActionApply || inv.Validate || inv.SkipRuleApply || inv.Backend != rules.BackendAuto {
		t.Errorf("invocation %+v", inv)
	}
	if inv.Log.Level != slog.LevelInfo || inv.Log.JSON || inv.Log.Off {
		t.Errorf("log options %+v", inv.Log)
	}
	// The subcommand word is optional.
	inv2 := mustParse(t, argvDefault[1:], nil)
	if d := cmp.Diff(inv.Config, inv2.Config, prefixCmp); d != "" {
		t.Errorf("without the istio-iptables word (-with +without):\n%s", d)
	}
}

func TestInjectorArgvAnnotated(t *testing.T) {
	inv := mustParse(t, argvAnnotated, nil)
	c := inv.Config
	if c.OutboundIncludeAll || len(c.OutboundIncludeCIDRs) != 2 || c.OutboundIncludeCIDRs[1] != netip.MustParsePrefix("172.16.0.0/12") {
		t.Errorf("include CIDRs: all=%v %v", c.OutboundIncludeAll, c.OutboundIncludeCIDRs)
	}
	if len(c.OutboundExcludeCIDRs) != 1 || c.OutboundExcludeCIDRs[0] != netip.MustParsePrefix("10.96.0.0/16") {
		t.Errorf("exclude CIDRs %v", c.OutboundExcludeCIDRs)
	}
	for name, got := range map[string][]rules.PortRange{"-b": c.InboundIncludePorts, "-d": c.InboundExcludePorts, "-q": c.OutboundIncludePorts, "-o": c.OutboundExcludePorts} {
		want := map[string][]rules.PortRange{"-b": pr(8080, 9090), "-d": pr(15090, 15021, 15020), "-q": pr(8443), "-o": pr(3306, 5432)}[name]
		if !slices.Equal(got, want) {
			t.Errorf("%s = %v, want %v (the order given)", name, got, want)
		}
	}
	if c.InboundIncludeAll || !slices.Equal(c.ExcludeInterfaces, []string{"eth1"}) {
		t.Errorf("inbound all=%v, -c %v", c.InboundIncludeAll, c.ExcludeInterfaces)
	}
	if _, err := rules.Build(c); err != nil {
		t.Errorf("Build: %v", err)
	}
}

func TestInjectorArgvJSONLogs(t *testing.T) {
	inv := mustParse(t, argvJSON, nil)
	if !inv.Log.JSON {
		t.Fatal("--log_as_json not set")
	}
	// A dry run logs to stderr, one JSON object a line.
	var stdout, stderr bytes.Buffer
	code := Run(context.Background(), append(slices.Clone(argvJSON), "--dry-run", "--backend", "iptables-nft"), &stdout, &stderr)
	if code != ExitOK {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	for _, l := range lines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil || m["msg"] == nil || m["level"] != "INFO" {
			t.Errorf("not a JSON log line: %q (%v)", l, err)
		}
	}
	if !strings.Contains(stdout.String(), "-A ISTIO_OUTPUT") {
		t.Errorf("dry run printed no rules:\n%s", stdout.String())
	}
}

func TestInjectorArgvCNIForm(t *testing.T) {
	inv := mustParse(t, argvCNI, nil)
	if !inv.Validate || !inv.SkipRuleApply || inv.Action != ActionApply {
		t.Errorf("invocation %+v", inv)
	}
	if inv.ProbePort != 15002 || inv.ProbeTimeout != 5*time.Second {
		t.Errorf("probe %d within %s, want Istio's 15002 within 5s", inv.ProbePort, inv.ProbeTimeout)
	}
	inv = mustParse(t, append(slices.Clone(argvCNI), "--iptables-probe-port", "16002", "--probe-timeout", "2s"), nil)
	if inv.ProbePort != 16002 || inv.ProbeTimeout != 2*time.Second {
		t.Errorf("probe %d within %s", inv.ProbePort, inv.ProbeTimeout)
	}
}

func TestOptionalInjectorFlags(t *testing.T) {
	for _, tc := range []struct {
		extra   []string
		backend rules.BackendName
		check   func(*Invocation) bool
	}{
		{[]string{"--force-apply"}, rules.BackendAuto, func(i *Invocation) bool { return i.ForceApply }},
		{[]string{"--native-nftables"}, rules.BackendNFTables, nil},
		{[]string{"--force-iptables-binary", "legacy"}, rules.BackendIPTablesLegacy, nil},
		{[]string{"--force-iptables-binary=nft"}, rules.BackendIPTablesNFT, nil},
		// istio-iptables: native nftables wins over the iptables binary.
		{[]string{"--force-iptables-binary", "legacy", "--native-nftables"}, rules.BackendNFTables, nil},
		{[]string{"--reconcile", "--cni-mode"}, rules.BackendAuto, func(i *Invocation) bool { return i.Reconcile && i.CNIMode }},
		{[]string{"--log_caller=default", "--log_stacktrace_level=default:error", "--log_target=stdout", "--log_target", "stderr", "--vklog=9"},
			rules.BackendAuto, func(i *Invocation) bool {
				return i.Log.Caller && slices.Equal(i.Log.Targets, []string{"stdout", "stderr"})
			}},
		{[]string{"--log_output_level=default:debug,ads:warn"}, rules.BackendAuto, func(i *Invocation) bool { return i.Log.Level == slog.LevelDebug }},
		{[]string{"--log_output_level=all:none"}, rules.BackendAuto, func(i *Invocation) bool { return i.Log.Off }},
		{[]string{"-e", "16008", "-t", "1338", "-r", "134", "--dual-stack", "--capture-all-dns"}, rules.BackendAuto, func(i *Invocation) bool {
			return i.Config.InboundTunnelPort == 16008 && i.Config.TProxyMark == 1338 && i.Config.TProxyRouteTable == 134 && i.Config.CaptureAllDNS
		}},
		{[]string{"--network-namespace", "/var/run/netns/x"}, rules.BackendAuto, func(i *Invocation) bool { return i.NetNS == "/var/run/netns/x" }},
		{[]string{"--envoy-port=16001", "--inbound-capture-port", "16006"}, rules.BackendAuto, func(i *Invocation) bool {
			return i.Config.ProxyPort == 16001 && i.Config.InboundPort == 16006
		}},
	} {
		inv, err := ParseEnv(append(slices.Clone(argvDefault), tc.extra...), noEnv, io.Discard)
		if err != nil {
			t.Errorf("%q: %v", tc.extra, err)
			continue
		}
		if inv.Backend != tc.backend {
			t.Errorf("%q: backend %s, want %s", tc.extra, inv.Backend, tc.backend)
		}
		if tc.check != nil && !tc.check(inv) {
			t.Errorf("%q: %+v", tc.extra, inv)
		}
	}
}

// With no flag and no environment, istio-iptables captures nothing
// (-i and -b empty); egress-init does the same.
func TestIstioIptablesDefaults(t *testing.T) {
	inv := mustParse(t, nil, nil)
	c := inv.Config
	if c.OutboundIncludeAll || len(c.OutboundIncludeCIDRs) > 0 || c.InboundIncludeAll || len(c.InboundIncludePorts) > 0 || len(c.InboundExcludePorts) > 0 {
		t.Errorf("defaults capture something: %+v", c)
	}
	if c.ProxyPort != 15001 || c.InboundPort != 15006 || c.InboundTunnelPort != 15008 || c.Mode != rules.ModeRedirect {
		t.Errorf("ports/mode %+v", c)
	}
	// -u empty: the UID of $ENVOY_USER (istio-proxy), else 1337; -g the same.
	if len(c.ProxyUIDs) != 1 || len(c.ProxyGIDs) != 1 || c.ProxyGIDs[0] != c.ProxyUIDs[0] {
		t.Errorf("uids %v gids %v", c.ProxyUIDs, c.ProxyGIDs)
	}
	inv = mustParse(t, nil, map[string]string{"ENVOY_USER": "root"})
	if inv.Config.ProxyUIDs[0] != 0 || inv.Config.ProxyGIDs[0] != 0 {
		t.Errorf("ENVOY_USER=root: uids %v gids %v", inv.Config.ProxyUIDs, inv.Config.ProxyGIDs)
	}
	inv = mustParse(t, nil, map[string]string{"ENVOY_USER": "no-such-user-here"})
	if inv.Config.ProxyUIDs[0] != 1337 {
		t.Errorf("unknown ENVOY_USER: uids %v, want 1337", inv.Config.ProxyUIDs)
	}
}

func TestEnvironmentPrecedence(t *testing.T) {
	// The env form of a flag, the flag over it.
	inv := mustParse(t, nil, map[string]string{"PROXY_UID": "1500", "ISTIO_SERVICE_CIDR": "*", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE": "25"})
	if inv.Config.ProxyUIDs[0] != 1500 || inv.Config.ProxyGIDs[0] != 1500 || !inv.Config.OutboundIncludeAll || !slices.Equal(inv.Config.OutboundExcludePorts, pr(25)) {
		t.Errorf("env: %+v", inv.Config)
	}
	inv = mustParse(t, []string{"-u", "1600"}, map[string]string{"PROXY_UID": "1500"})
	if inv.Config.ProxyUIDs[0] != 1600 {
		t.Errorf("flag must win over env: %v", inv.Config.ProxyUIDs)
	}
	// envoy-port has no environment variable in istio-iptables.
	inv = mustParse(t, nil, map[string]string{"ENVOY_PORT": "1"})
	if inv.Config.ProxyPort != 15001 {
		t.Errorf("ENVOY_PORT was read: %d", inv.Config.ProxyPort)
	}
	// The alias wins over the flag's own variable; the flag over both.
	inv = mustParse(t, nil, map[string]string{"REDIRECT_DNS": "false", "ISTIO_META_DNS_CAPTURE": "true"})
	if !inv.Config.RedirectDNS {
		t.Error("ISTIO_META_DNS_CAPTURE=true did not win over REDIRECT_DNS=false")
	}
	inv = mustParse(t, []string{"--redirect-dns=false"}, map[string]string{"ISTIO_META_DNS_CAPTURE": "true"})
	if inv.Config.RedirectDNS {
		t.Error("--redirect-dns=false did not win over the environment")
	}
	inv = mustParse(t, []string{"--run-validation"}, map[string]string{"SKIP_RULE_APPLY": "true", "PROBE_TIMEOUT": "1s", "NATIVE_NFTABLES": "true"})
	if !inv.SkipRuleApply || inv.ProbeTimeout != time.Second || inv.Backend != rules.BackendNFTables {
		t.Errorf("run options from env: %+v", inv)
	}
	// Names for -u and -g, looked up in the image.
	inv = mustParse(t, []string{"-u", "root", "-g", "root"}, nil)
	if inv.Config.ProxyUIDs[0] != 0 || inv.Config.ProxyGIDs[0] != 0 {
		t.Errorf("names: %v %v", inv.Config.ProxyUIDs, inv.Config.ProxyGIDs)
	}
}

func TestBadInputNamesFieldAndValue(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"-p", "70000"}, nil, `envoy-port "70000"`},
		{[]string{"-u", "no-such-user-here"}, nil, `proxy-uid "no-such-user-here"`},
		{nil, map[string]string{"INBOUND_TUNNEL_PORT": "x"}, `inbound-tunnel-port (from $INBOUND_TUNNEL_PORT) "x"`},
		{nil, map[string]string{"ISTIO_META_DNS_CAPTURE": "maybe"}, `redirect-dns (from $ISTIO_META_DNS_CAPTURE) "maybe"`},
		{[]string{"--probe-timeout", "soon"}, nil, `probe-timeout "soon"`},
		{[]string{"--iptables-probe-port", "0"}, nil, `iptables-probe-port "0"`},
		{[]string{"--force-iptables-binary", "ebpf"}, nil, `force-iptables-binary "ebpf"`},
		{[]string{"--backend", "iptables-legacy", "--native-nftables"}, nil, "native-nftables"},
		{[]string{"--log_output_level=default:loud"}, nil, `log_output_level "default:loud"`},
		{[]string{"--vklog=x"}, nil, `vklog "x"`},
		{[]string{"-k", "net1,bad/name"}, nil, `kube-virt-interfaces "bad/name"`},
		{[]string{"--drop-invalid=maybe"}, nil, "drop-invalid"}, // built now; only a bad value is an error
		{[]string{"--redirect-dns=perhaps"}, nil, "redirect-dns"},
		{[]string{"extra"}, nil, `unexpected argument "extra"`},
	} {
		args := append(slices.Clone(argvDefault), tc.args...)
		_, err := ParseEnv(args, envOf(tc.env), io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q %v: error %v, want one naming %q", tc.args, tc.env, err, tc.want)
		}
		var stderr bytes.Buffer
		if tc.env == nil {
			// --dry-run: should the parse wrongly succeed, nothing is
			// applied to the test's own (the host's) namespace.
			if code := Run(context.Background(), append(args, "--dry-run"), io.Discard, &stderr); code != ExitUsage {
				t.Errorf("%q: exit %d, want %d", tc.args, code, ExitUsage)
			}
		}
	}
}

// --redirect-dns without --capture-all-dns captures DNS to the pod's
// nameservers only; with none, DNS capture is off (istio-iptables).
func TestRedirectDNSNameservers(t *testing.T) {
	dir := t.TempDir()
	old := resolvConf
	t.Cleanup(func() { resolvConf = old })
	resolvConf = dir + "/resolv.conf"
	write := func(s string) {
		if err := os.WriteFile(resolvConf, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\noptions ndots:5\n")
	inv := mustParse(t, append(slices.Clone(argvDefault), "--redirect-dns"), nil)
	want := []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00::a")}
	if !slices.Equal(inv.Config.DNSServers, want) {
		t.Errorf("nameservers %v, want %v", inv.Config.DNSServers, want)
	}
	rs, err := rules.Build(inv.Config)
	if err != nil {
		t.Fatal(err)
	}
	to := func(dst string) rules.Packet {
		return rules.Packet{Hook: "output", OIF: "eth0", Src: netip.MustParseAddr("192.0.2.2"), Dst: netip.MustParseAddr(dst), Proto: rules.ProtoUDP, DPort: 53, UID: 1000, GID: 1000}
	}
	if p, _ := rs.Trace(to("10.96.0.10")); p != 15053 {
		t.Errorf("DNS to the nameserver: redirected to %d, want 15053", p)
	}
	if p, _ := rs.Trace(to("192.0.2.53")); p != 0 {
		t.Errorf("DNS to another server: redirected to %d, want none (only --capture-all-dns captures it)", p)
	}
	inv = mustParse(t, append(slices.Clone(argvDefault), "--redirect-dns", "--capture-all-dns"), nil)
	rs, _ = rules.Build(inv.Config)
	if p, _ := rs.Trace(to("192.0.2.53")); p != 15053 {
		t.Errorf("--capture-all-dns: DNS to any server redirected to %d, want 15053", p)
	}
	write("search x\n")
	inv = mustParse(t, append(slices.Clone(argvDefault), "--redirect-dns"), nil)
	rs, _ = rules.Build(inv.Config)
	if p, _ := rs.Trace(to("10.96.0.10")); p != 0 {
		t.Errorf("no nameserver: DNS redirected to %d, want DNS capture off", p)
	}
	os.Remove(resolvConf)
	if _, err := ParseEnv(append(slices.Clone(argvDefault), "--redirect-dns"), noEnv, io.Discard); err == nil || !strings.Contains(err.Error(), "redirect-dns") {
		t.Errorf("unreadable resolv.conf: %v", err)
	}
}
