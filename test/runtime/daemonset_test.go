//go:build linux

package runtime_test

// The DaemonSet's container, run for real: the image `make image` builds
// (install/image), imported into containerd, and the installer run from
// it through the CRI exactly as the app DaemonSet declares it (command,
// args, env, mounts, securityContext, readiness probe), translated from
// install/kubernetes/daemonset.yaml as the kubelet would.
//
// The host is simulated: containerd runs in a network namespace of ours,
// and every hostPath of the manifest is a directory under the test's
// work dir (never the machine's /opt/cni or /etc/cni), which is also
// containerd's CNI bin and config dir.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/egress-cni/egress-cni/install/image"
	"github.com/egress-cni/egress-cni/internal/nstest"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// The simulated internet: a namespace behind the node's uplink.
const (
	uplinkNodeIP = "203.0.113.1"
	uplinkPrefix = 24
)

// simHost is the simulated node's filesystem: root stands for the host's
// "/", a shared mount so that the pods' network namespace mounts made
// after the installer started reach it (mountPropagation HostToContainer).
type simHost struct {
	root string
	// netns is where this containerd pins pod network namespaces: the
	// hostPath /run/netns maps here.
	netns string
}

// path is the simulated host's path for a host path of the manifest.
func (h simHost) path(p string) string {
	if p == "/run/netns" {
		return h.netns
	}
	return filepath.Join(h.root, p)
}

// newSimHost makes root a shared bind mount of itself (unmounted by the
// work dir's cleanup) with the directories a node has (/var/log).
func newSimHost(t *testing.T, root string) simHost {
	t.Helper()
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(root, root, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind mount %s: %v", root, err)
	}
	if err := unix.Mount("", root, "", unix.MS_SHARED, ""); err != nil {
		t.Fatalf("make %s shared: %v", root, err)
	}
	for _, d := range []string{"var/log", "opt/cni/bin", "etc/cni/net.d"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return simHost{root: root}
}

// readManifest decodes a file of install/kubernetes strictly into v.
func readManifest(t *testing.T, name string, v any) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(moduleRoot(t), "install", "kubernetes", name))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(b, v); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

// installerPod is the CRI form of the DaemonSet's pod: its sandbox and
// its one container, as the kubelet would create them.
type installerPod struct {
	ds        *appsv1.DaemonSet
	container corev1.Container
	sandbox   map[string]any
	config    map[string]any
}

// criCaps are capabilities as the CRI takes them (the kubelet passes
// the manifest's names through; containerd adds CAP_).
func criCaps(l []corev1.Capability) []string {
	out := []string{}
	for _, c := range l {
		out = append(out, string(c))
	}
	return out
}

// newInstallerPod translates the DaemonSet's pod template. Volumes:
// hostPath → the simulated host's directory (created for
// DirectoryOrCreate, required for Directory), configMap → a directory of
// the ConfigMap's keys, written by writeConfigMap. Everything the
// translation does not know fails the test, so a new field in the
// manifest cannot be silently ignored here.
func newInstallerPod(t *testing.T, ds *appsv1.DaemonSet, host simHost, configDir, logDir string) *installerPod {
	t.Helper()
	spec := ds.Spec.Template.Spec
	if len(spec.Containers) != 1 || len(spec.InitContainers) != 0 {
		t.Fatalf("%s: %d containers, %d init containers; the test runs exactly one container", ds.Name, len(spec.Containers), len(spec.InitContainers))
	}
	c := spec.Containers[0]
	if !spec.HostNetwork || spec.HostPID || spec.HostIPC {
		t.Fatalf("%s: hostNetwork %v hostPID %v hostIPC %v: the test runs hostNetwork only", ds.Name, spec.HostNetwork, spec.HostPID, spec.HostIPC)
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	var mounts []map[string]any
	for _, m := range c.VolumeMounts {
		v, ok := volumes[m.Name]
		if !ok {
			t.Fatalf("%s: mount %s has no volume", ds.Name, m.Name)
		}
		if m.SubPath != "" || m.SubPathExpr != "" {
			t.Fatalf("%s: mount %s: subPath is not translated", ds.Name, m.Name)
		}
		var src string
		switch {
		case v.HostPath != nil:
			src = host.path(v.HostPath.Path)
			typ := corev1.HostPathUnset
			if v.HostPath.Type != nil {
				typ = *v.HostPath.Type
			}
			switch typ {
			case corev1.HostPathDirectoryOrCreate:
				if err := os.MkdirAll(src, 0o755); err != nil {
					t.Fatal(err)
				}
			case corev1.HostPathDirectory:
				if fi, err := os.Stat(src); err != nil || !fi.IsDir() {
					t.Fatalf("%s: hostPath %s (type Directory) is not a directory on the simulated host: %v", ds.Name, v.HostPath.Path, err)
				}
			default:
				t.Fatalf("%s: hostPath %s type %q is not translated", ds.Name, v.HostPath.Path, typ)
			}
		case v.ConfigMap != nil:
			src = configDir
		default:
			t.Fatalf("%s: volume %s is neither hostPath nor configMap", ds.Name, v.Name)
		}
		prop := 0 // PROPAGATION_PRIVATE
		if m.MountPropagation != nil {
			switch *m.MountPropagation {
			case corev1.MountPropagationNone:
			case corev1.MountPropagationHostToContainer:
				prop = 1
			case corev1.MountPropagationBidirectional:
				prop = 2
			}
		}
		mounts = append(mounts, map[string]any{
			"container_path": m.MountPath, "host_path": src, "readonly": m.ReadOnly, "propagation": prop,
		})
	}
	var envs []map[string]string
	env := map[string]string{}
	for _, e := range c.Env {
		v := e.Value
		switch {
		case e.ValueFrom == nil:
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName":
			// The kubelet resolves the downward API; our node's name.
			v = simNodeName
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP":
			// ... and the node's internal address.
			v = simNodeIP
		default:
			t.Fatalf("%s: env %s: valueFrom %+v is not translated", ds.Name, e.Name, e.ValueFrom)
		}
		envs = append(envs, map[string]string{"key": e.Name, "value": v})
		env[e.Name] = v
	}
	if len(c.EnvFrom) != 0 {
		t.Fatalf("%s: envFrom is not translated", ds.Name)
	}
	// The kubelet expands $(VAR) in args from the container's env.
	c.Args = slices.Clone(c.Args)
	for i, a := range c.Args {
		c.Args[i] = kubeVarRef.ReplaceAllStringFunc(a, func(ref string) string {
			v, ok := env[ref[2:len(ref)-1]]
			if !ok {
				t.Fatalf("%s: arg %q names %s, which is not in the container's env", ds.Name, a, ref)
			}
			return v
		})
	}

	sc := c.SecurityContext
	if sc == nil {
		t.Fatalf("%s: no securityContext", ds.Name)
	}
	if spec.SecurityContext != nil && (spec.SecurityContext.SeccompProfile != nil || spec.SecurityContext.RunAsUser != nil) {
		t.Fatalf("%s: the pod-level securityContext is not translated; set it on the container", ds.Name)
	}
	lsc := map[string]any{
		"namespace_options": map[string]any{"network": 2}, // NODE: hostNetwork
		"privileged":        sc.Privileged != nil && *sc.Privileged,
		"readonly_rootfs":   sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem,
		// The kubelet sets no_new_privs unless allowPrivilegeEscalation
		// is true or unset (its default is true).
		"no_new_privs": sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation,
	}
	if sc.Capabilities != nil {
		lsc["capabilities"] = map[string]any{
			"add_capabilities":  criCaps(sc.Capabilities.Add),
			"drop_capabilities": criCaps(sc.Capabilities.Drop),
		}
	}
	if sc.RunAsUser != nil {
		lsc["run_as_user"] = map[string]any{"value": *sc.RunAsUser}
	}
	if sc.RunAsGroup != nil {
		lsc["run_as_group"] = map[string]any{"value": *sc.RunAsGroup}
	}
	if sp := sc.SeccompProfile; sp != nil {
		switch sp.Type {
		case corev1.SeccompProfileTypeRuntimeDefault:
			// Both forms, as the kubelet sends them.
			lsc["seccomp"] = map[string]any{"profile_type": 0}
			lsc["seccomp_profile_path"] = "runtime/default"
		case corev1.SeccompProfileTypeUnconfined:
			lsc["seccomp"] = map[string]any{"profile_type": 1}
			lsc["seccomp_profile_path"] = "unconfined"
		default:
			t.Fatalf("%s: seccompProfile %s is not translated", ds.Name, sp.Type)
		}
	} else {
		// The kubelet's default: unconfined.
		lsc["seccomp"] = map[string]any{"profile_type": 1}
	}
	if sc.SELinuxOptions != nil || sc.WindowsOptions != nil || sc.ProcMount != nil || sc.AppArmorProfile != nil {
		t.Fatalf("%s: securityContext fields the test does not translate: %+v", ds.Name, sc)
	}

	uid := "uid-" + ds.Name
	p := &installerPod{ds: ds, container: c}
	p.sandbox = map[string]any{
		"metadata":      map[string]any{"name": ds.Name + "-sim", "namespace": ds.Namespace, "uid": uid, "attempt": 0},
		"log_directory": logDir,
		"labels":        ds.Spec.Template.Labels,
		"annotations":   ds.Spec.Template.Annotations,
		"linux": map[string]any{
			"cgroup_parent":    "",
			"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}},
		},
	}
	p.config = map[string]any{
		"metadata": map[string]any{"name": c.Name, "attempt": 0},
		"image":    map[string]any{"image": c.Image},
		"command":  c.Command,
		"args":     c.Args,
		"envs":     envs,
		"mounts":   mounts,
		"log_path": c.Name + ".log",
		"linux":    map[string]any{"security_context": lsc},
	}
	return p
}

// withCaps returns a copy of the container config with capabilities.add
// replaced.
func (p *installerPod) withCaps(add []string) map[string]any {
	b, _ := json.Marshal(p.config)
	var cfg map[string]any
	_ = json.Unmarshal(b, &cfg)
	cfg["linux"].(map[string]any)["security_context"].(map[string]any)["capabilities"].(map[string]any)["add_capabilities"] = add
	return cfg
}

// withArgs returns a copy of the container config with args appended and
// a new attempt number.
func (p *installerPod) withArgs(attempt int, extra ...string) map[string]any {
	b, _ := json.Marshal(p.config)
	var cfg map[string]any
	_ = json.Unmarshal(b, &cfg)
	cfg["args"] = append(slices.Clone(p.container.Args), extra...)
	cfg["metadata"].(map[string]any)["attempt"] = attempt
	cfg["log_path"] = fmt.Sprintf("%s-%d.log", p.container.Name, attempt)
	return cfg
}

// writeConfigMap writes the ConfigMap's keys into dir, as the kubelet's
// configMap volume shows them. The plugin runs on the host, outside the
// container, so the host paths in plugin.json (its log, the node config
// copy) become the simulated host's; the node configs get the test's pod
// subnet. Nothing else is changed.
// defaultStateDir is the plugin's default stateDir (node's, named here
// because tests shadow the package name).
const defaultStateDir = node.DefaultStateDir

// simNodeName and simNodeIP are the simulated node's name and internal
// address, for the downward API's spec.nodeName and status.hostIP. The
// address is on the node's lo (a cluster network nobody else is on).
const (
	simNodeName = "egress-cni-runtime-node"
	simNodeIP   = "192.0.2.11"
)

// kubeVarRef is a $(VAR) reference in a container's args.
var kubeVarRef = regexp.MustCompile(`\$\([A-Za-z_][A-Za-z0-9_]*\)`)

func writeConfigMap(t *testing.T, cm *corev1.ConfigMap, dir string, host simHost) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for k, v := range cm.Data {
		var m map[string]any
		if err := json.Unmarshal([]byte(v), &m); err != nil {
			t.Fatalf("ConfigMap key %s: %v", k, err)
		}
		switch {
		case k == "plugin.json":
			for _, f := range []string{"logFile", "nodeConfig"} {
				p, ok := m[f].(string)
				if !ok || !filepath.IsAbs(p) {
					t.Fatalf("plugin.json %s = %v, want a host path", f, m[f])
				}
				m[f] = host.path(p)
			}
			// The pod identity records (the plugin's stateDir, default
			// node.DefaultStateDir) go to the simulated host too, which
			// the installer reads through its -state-dir mount.
			sd, _ := m["stateDir"].(string)
			if sd == "" {
				sd = defaultStateDir
			}
			m["stateDir"] = host.path(sd)
		case strings.HasPrefix(k, "node-"):
			m["podCIDRs"] = []string{podSubnet}
			// The simulated node's uplink (egress role).
			if _, ok := m["uplink"]; ok {
				m["uplink"] = "uplink0"
			}
		}
		writeJSON(t, filepath.Join(dir, k), m)
	}
}

// TestDaemonSetContainer runs each DaemonSet's container: the app one on
// an app node, the egress one on an egress node, each with its own
// containerd and simulated host.
//
// The third run is the chart's least-privileged variant
// (attachmentScan=false: NET_ADMIN only, no privilege escalation),
// rendered with Helm's library.
func TestDaemonSetContainer(t *testing.T) {
	nstest.RequirePrivileged(t)
	for _, tc := range []struct{ file, role string }{{"daemonset.yaml", "app"}, {"daemonset-egress.yaml", "egress"}} {
		t.Run(tc.role, func(t *testing.T) {
			var ds appsv1.DaemonSet
			var cm corev1.ConfigMap
			readManifest(t, tc.file, &ds)
			readManifest(t, "configmap.yaml", &cm)
			runDaemonSet(t, &ds, &cm, tc.role)
		})
	}
	t.Run("app, chart attachmentScan=false", func(t *testing.T) {
		ds, cm := renderChart(t, map[string]any{"attachmentScan": false})
		runDaemonSet(t, ds["egress-cni"], cm, "app")
	})
}

// renderChart renders install/helm/egress-cni with the values, as `helm
// template` does, and returns its DaemonSets by name and its ConfigMap.
func renderChart(t *testing.T, vals map[string]any) (map[string]*appsv1.DaemonSet, *corev1.ConfigMap) {
	t.Helper()
	ch, err := loader.Load(filepath.Join(moduleRoot(t), "install", "helm", "egress-cni"))
	if err != nil {
		t.Fatal(err)
	}
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{Name: "egress-cni", Namespace: "kube-system", IsInstall: true}, chartutil.DefaultCapabilities)
	if err != nil {
		t.Fatal(err)
	}
	out, err := engine.Render(ch, rv)
	if err != nil {
		t.Fatal(err)
	}
	dss := map[string]*appsv1.DaemonSet{}
	var cm *corev1.ConfigMap
	for name, text := range out {
		for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(text, -1) {
			var tm struct{ Kind string }
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			switch tm.Kind {
			case "DaemonSet":
				var ds appsv1.DaemonSet
				if err := yaml.UnmarshalStrict([]byte(doc), &ds); err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				dss[ds.Name] = &ds
			case "ConfigMap":
				cm = &corev1.ConfigMap{}
				if err := yaml.UnmarshalStrict([]byte(doc), cm); err != nil {
					t.Fatalf("%s: %v", name, err)
				}
			}
		}
	}
	if cm == nil || len(dss) != 2 {
		t.Fatalf("chart rendered %d DaemonSets and ConfigMap %v", len(dss), cm != nil)
	}
	return dss, cm
}

func runDaemonSet(t *testing.T, dsIn *appsv1.DaemonSet, cmIn *corev1.ConfigMap, role string) {
	start := time.Now()
	dir, cgroupParent := prepareRuntime(t, "/egress-cni-ds-")

	ds, cm := *dsIn, *cmIn
	if args := ds.Spec.Template.Spec.Containers[0].Args; !slices.Contains(args, "-node-config=/etc/egress-cni/node-"+role+".json") {
		t.Fatalf("%s: args %v do not apply the %s node rules", ds.Name, args, role)
	}
	// The attachment scan is on when /run/netns is mounted.
	scan := slices.ContainsFunc(ds.Spec.Template.Spec.Volumes, func(v corev1.Volume) bool {
		return v.HostPath != nil && v.HostPath.Path == "/run/netns"
	})

	// The image, as `make image` builds it.
	imgDir := filepath.Join(dir, "image")
	if err := image.BuildBinaries(context.Background(), moduleRoot(t), filepath.Join(imgDir, "bin"), image.HostArch()); err != nil {
		t.Fatal(err)
	}
	img, err := image.Build(filepath.Join(imgDir, "bin"), image.HostArch())
	if err != nil {
		t.Fatal(err)
	}
	built, err := image.Write(img, image.DefaultRef, imgDir)
	if err != nil {
		t.Fatal(err)
	}
	if ds.Spec.Template.Spec.Containers[0].Image != built.Ref {
		t.Fatalf("the DaemonSet runs %s, the image is built as %s", ds.Spec.Template.Spec.Containers[0].Image, built.Ref)
	}

	host := newSimHost(t, filepath.Join(dir, "host"))
	paths := containerdPaths{State: host.path("/run/containerd"), CNIBin: host.path("/opt/cni/bin"), CNIConf: host.path("/etc/cni/net.d")}
	host.netns = paths.netnsDir()

	plugins := filepath.Join(dir, "plugins")
	if err := os.MkdirAll(plugins, 0o755); err != nil {
		t.Fatal(err)
	}
	crictlBin := buildCrictl(t)
	buildPlugins(t, plugins)
	reaper := filepath.Join(plugins, "reaper")
	buildReaper(t, reaper)
	pauseTar := filepath.Join(dir, "pause.tar")
	buildPauseImage(t, pauseTar)
	// The node's primary CNI: bridge, host-local and loopback in its bin
	// dir and a conflist of bridge alone. egress-cni comes from the image.
	for _, b := range []string{"bridge", "host-local", "loopback"} {
		copyFile(t, filepath.Join(plugins, b), filepath.Join(paths.CNIBin, b), 0o755)
	}
	primary := filepath.Join(paths.CNIConf, "10-bridge.conflist")
	writeJSON(t, primary, map[string]any{
		"cniVersion": "1.0.0",
		"name":       "bridge-net",
		"plugins": []any{map[string]any{
			"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
			"ipam": map[string]any{
				"type":    "host-local",
				"dataDir": filepath.Join(dir, "ipam"),
				"ranges":  [][]map[string]string{{{"subnet": podSubnet, "gateway": gatewayIP}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
			},
		}},
	})
	primaryBytes, err := os.ReadFile(primary)
	if err != nil {
		t.Fatal(err)
	}
	configDir := filepath.Join(dir, "configmap")
	writeConfigMap(t, &cm, configDir, host)
	pod := newInstallerPod(t, &ds, host, configDir, filepath.Join(dir, "logs"))
	pod.sandbox["linux"].(map[string]any)["cgroup_parent"] = cgroupParent
	t.Logf("built the image (%s, %.1f MiB), plugins, crictl in %s", built.Digest, float64(built.Size)/(1<<20), time.Since(start).Round(time.Millisecond))

	// The node and the internet behind its uplink.
	node := nstest.NewNS(t)
	inet := nstest.NewNS(t)
	nstest.Link(t,
		nstest.LinkEnd{NS: node, Name: "uplink0", Addrs: []netip.Prefix{netip.PrefixFrom(netip.MustParseAddr(uplinkNodeIP), uplinkPrefix)}},
		nstest.LinkEnd{NS: inet, Name: "eth0", Addrs: []netip.Prefix{netip.PrefixFrom(netip.MustParseAddr(internetIP), uplinkPrefix)}})
	nstest.Route(t, inet, netip.MustParsePrefix(podSubnet), netip.MustParseAddr(uplinkNodeIP))
	nstest.Sysctl(t, node, "net.ipv4.ip_forward", "1")
	nstest.ServeEcho(t, inet, ":"+echoPort)
	// The node's internal address (status.hostIP), on its lo.
	if err := node.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.AddrAdd(lo, &netlink.Addr{IPNet: netlink.NewIPNet(net.ParseIP(simNodeIP))})
	}); err != nil {
		t.Fatal(err)
	}

	c := startContainerdWith(t, dir, node.Path(), reaper, crictlBin, paths)
	for _, tarball := range []string{pauseTar, built.LayoutTar} {
		if out, err := c.ctr("images", "import", tarball); err != nil {
			t.Fatalf("ctr images import %s: %v\n%s", tarball, err, out)
		}
	}
	// containerd holds the image under the manifests' reference, with the
	// digest the build reported.
	if out, err := c.ctr("images", "ls"); err != nil || !regexp.MustCompile(`(?m)^`+regexp.QuoteMeta(built.Ref)+`\s+\S+\s+`+regexp.QuoteMeta(built.Digest.String())+`\s`).MatchString(out) {
		t.Fatalf("ctr images ls (%v) lacks %s at %s:\n%s", err, built.Ref, built.Digest, out)
	}
	t.Logf("containerd ready, images imported after %s", time.Since(start).Round(time.Millisecond))

	sandboxFile := filepath.Join(dir, "installer-pod.json")
	writeJSON(t, sandboxFile, pod.sandbox)
	out, err := c.crictl("runp", sandboxFile)
	if err != nil {
		t.Fatalf("crictl runp (the installer's pod): %v\n%s\n%s", err, out, c.logTail())
	}
	sandboxID := strings.TrimSpace(out)

	entryFile := func() (last map[string]any, n int) {
		var conf struct{ Plugins []map[string]any }
		b, err := os.ReadFile(primary)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &conf); err != nil {
			t.Fatalf("%s: %v", primary, err)
		}
		for _, p := range conf.Plugins {
			if p["type"] == "egress-cni" {
				n++
				last = p
			}
		}
		if n > 0 && conf.Plugins[len(conf.Plugins)-1]["type"] != "egress-cni" {
			t.Errorf("our entry is not last in %s:\n%s", primary, b)
		}
		return last, n
	}
	pluginBin := filepath.Join(paths.CNIBin, "egress-cni")
	readyFile := host.path("/run/egress-cni/ready")
	nodeCopy := host.path("/var/lib/egress-cni/node.json")

	// One capability less: the installer fails with its own error and
	// touches nothing (it applies the node rules first).
	t.Run("without NET_ADMIN", func(t *testing.T) {
		caps := criCaps(pod.container.SecurityContext.Capabilities.Add)
		less := slices.DeleteFunc(slices.Clone(caps), func(s string) bool { return s == "NET_ADMIN" })
		if len(less) == len(caps) {
			t.Fatalf("the manifest does not add NET_ADMIN (adds %v)", caps)
		}
		id := c.createContainer(sandboxID, pod.withCaps(less), pod.sandbox, "noadmin")
		code, logs := c.waitExit(id, 30*time.Second)
		if code == 0 {
			t.Errorf("exit code 0 without NET_ADMIN; log:\n%s", logs)
		}
		want := "could not apply " + role + " node rules"
		if !strings.Contains(logs, want) || !strings.Contains(logs, "operation not permitted") {
			t.Errorf("log lacks %q and operation not permitted:\n%s", want, logs)
		}
		t.Logf("installer without NET_ADMIN (exit %d): %s", code, lastLine(logs))
		if b, _ := os.ReadFile(primary); !bytes.Equal(b, primaryBytes) {
			t.Errorf("the conflist changed:\n%s", b)
		}
		for _, f := range []string{pluginBin, readyFile} {
			if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s exists (%v)", f, err)
			}
		}
		if out, err := c.crictl("rm", id); err != nil {
			t.Errorf("crictl rm: %v\n%s", err, out)
		}
	})

	// The manifest's container, exactly.
	id := c.createContainer(sandboxID, pod.config, pod.sandbox, "install")
	c.waitReady(id, pod.container, 30*time.Second)
	t.Logf("installer ready after %s", time.Since(start).Round(time.Millisecond))
	checkSecurity(t, c, id, pod.container.SecurityContext)
	checkMetricsEndpoint(t, node, ds.Spec.Template.Spec.Containers[0])

	if _, n := entryFile(); n != 1 {
		t.Errorf("%d egress-cni entries in the conflist, want 1", n)
	}
	want, _ := os.ReadFile(filepath.Join(imgDir, "bin", "egress-cni"))
	if got, err := os.ReadFile(pluginBin); err != nil || !bytes.Equal(got, want) || len(want) == 0 {
		t.Errorf("%s is not the image's plugin (%v)", pluginBin, err)
	}
	if fi, err := os.Stat(pluginBin); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("%s mode: %v %v", pluginBin, fi, err)
	}
	if _, err := os.Stat(nodeCopy); err != nil {
		t.Errorf("node config copy for the plugin: %v", err)
	}
	if _, err := os.Stat(readyFile); err != nil {
		t.Errorf("ready file: %v", err)
	}
	tables := nodeTables(t, node)
	for _, tb := range []string{"inet egress_cni_node", "bridge egress_cni_node"} {
		if !slices.Contains(tables, tb) {
			t.Errorf("node tables %v lack %s", tables, tb)
		}
	}

	// A pod created now goes through our entry: captured, registered with
	// the node rules, and held in: its direct traffic to the internet is
	// dropped at the node.
	c.waitCNIConf("egress-cni", 20*time.Second)
	pluginLog := host.path("/var/log/egress-cni.log")
	webID, webPath, webIP := c.runPod("web", podAnnotations, cgroupParent)
	add := onePluginRecord(t, pluginLog, "web", "ADD done")
	if add["decision"] != "captured" || add["containerID"] != webID {
		t.Errorf("ADD log %v, want the web pod captured", add)
	}
	// Its identity record, for the agent's drop audit, is on the
	// simulated host, where the installer's -state-dir mount reads it.
	if b, err := os.ReadFile(host.path(filepath.Join(defaultStateDir, "pods", webID+".json"))); err != nil {
		t.Errorf("no identity record for the web pod: %v", err)
	} else if !strings.Contains(string(b), `"web"`) {
		t.Errorf("identity record %s does not name the web pod", b)
	}
	webNS, err := ns.GetNS(webPath)
	if err != nil {
		t.Fatal(err)
	}
	defer webNS.Close()
	if dump := nstest.NFTDump(t, webNS); !strings.Contains(dump, "table inet egress_cni") {
		t.Errorf("the web pod's ruleset lacks our capture table:\n%s", dump)
	}
	proxy := nstest.ServeProxy(t, webNS, 15001)
	target := internetIP + ":" + echoPort
	if r := dialReply(t, webNS, appUID, target); r.Kind != nstest.KindProxy {
		t.Errorf("app UID to %s: %+v, want the pod's proxy", target, r)
	}
	if _, err := nstest.Dial(t, webNS, proxyUID, proxyUID, "tcp4", target, nstest.WithTimeout(2*time.Second)); err == nil {
		t.Errorf("the proxy UID reached %s from a pod that is not a gateway: the node rules do not hold it", target)
	} else if de := (*nstest.DialError)(nil); !errors.As(err, &de) || de.Kind != "timeout" {
		t.Errorf("the proxy UID to %s: %v, want a timeout (dropped at the node)", target, err)
	}
	// The agent in the container, with only the manifest's capabilities,
	// reports that drop (NFLOG) naming the pod from its identity record
	// and the node from the downward API.
	audit := grepLine(c.waitLog(id, `"destination":"`+internetIP+`"`, 5*time.Second), `"destination":"`+internetIP+`"`)
	for _, want := range []string{`"pod":"web"`, `"namespace":"default"`, `"containerID":"` + webID + `"`, `"reason":"not-a-gateway"`, `"node":"` + simNodeName + `"`} {
		if !strings.Contains(audit, want) {
			t.Errorf("the agent's audit line %q lacks %s", audit, want)
		}
	}
	proxy.Close()

	// A gateway pod (istio-system/istio-egressgateway-…, matched by name)
	// gets out on an egress node, masqueraded to the uplink's address,
	// and is held in like any pod on an app node.
	const gwPod = "istio-system/istio-egressgateway-5d4f"
	if role == "egress" {
		_, gwPath, _ := c.runPod(gwPod, nil, cgroupParent)
		gwNS, err := ns.GetNS(gwPath)
		if err != nil {
			t.Fatal(err)
		}
		defer gwNS.Close()
		line, err := nstest.Dial(t, gwNS, appUID, appUID, "tcp4", target, nstest.WithTimeout(2*time.Second))
		if r, perr := nstest.ParseReply(line); err != nil || perr != nil || r.Kind != nstest.KindDirect || r.Src.Addr().String() != uplinkNodeIP {
			t.Errorf("the gateway on the egress node to %s: %q %v, want direct from the uplink's %s", target, line, err, uplinkNodeIP)
		}
		if err := gwNS.Close(); err != nil {
			t.Error(err)
		}
	} else {
		// On an app node the plugin refuses a gateway's sandbox.
		cfg := filepath.Join(dir, "gateway-pod.json")
		writeJSON(t, cfg, map[string]any{
			"metadata": map[string]any{"name": "istio-egressgateway-5d4f", "namespace": "istio-system", "uid": "uid-gw", "attempt": 0},
			"linux":    map[string]any{"cgroup_parent": cgroupParent},
		})
		out, err := c.crictl("runp", cfg)
		if err == nil || !strings.Contains(out, "egress gateways are honoured only on egress nodes") {
			t.Errorf("a gateway's sandbox on an app node: %v\n%s", err, out)
		}
	}

	// The container stops (a DaemonSet update, or delete): as documented,
	// the entry, the binary and the node rules stay; readiness goes.
	c.stopContainer(id, ds.Spec.Template.Spec.TerminationGracePeriodSeconds)
	if code, logs := c.waitExit(id, 5*time.Second); code != 0 {
		t.Errorf("installer exit code %d after stop; log:\n%s", code, logs)
	}
	if _, n := entryFile(); n != 1 {
		t.Errorf("after stop: %d entries, want ours kept", n)
	}
	if _, err := os.Stat(pluginBin); err != nil {
		t.Errorf("after stop: %v", err)
	}
	if !slices.Contains(nodeTables(t, node), "inet egress_cni_node") {
		t.Error("after stop the node rules are gone")
	}
	if _, err := os.Stat(readyFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after stop the ready file is still there (%v)", err)
	}

	// A Multus-style secondary interface in the web pod: a macvlan whose
	// lower device stays on the node. Its traffic bypasses the node rules;
	// the installer's attachment scan (setns into every pod namespace
	// under /run/netns, seen through the HostToContainer mount) reports it.
	addMacvlan(t, node, webNS)

	// Without SYS_ADMIN the installer cannot enter the pods' namespaces:
	// it says so instead of finding nothing.
	t.Run("without SYS_ADMIN", func(t *testing.T) {
		if !scan {
			t.Skip("the attachment scan is off: the manifest adds no SYS_ADMIN")
		}
		caps := criCaps(pod.container.SecurityContext.Capabilities.Add)
		less := slices.DeleteFunc(slices.Clone(caps), func(s string) bool { return s == "SYS_ADMIN" })
		if len(less) == len(caps) {
			t.Fatalf("the manifest does not add SYS_ADMIN (adds %v)", caps)
		}
		cfg := pod.withArgs(2)
		cfg["linux"].(map[string]any)["security_context"].(map[string]any)["capabilities"].(map[string]any)["add_capabilities"] = less
		id := c.createContainer(sandboxID, cfg, pod.sandbox, "nosysadmin")
		c.waitReady(id, pod.container, 30*time.Second)
		logs := c.waitLog(id, "could not scan pods for host-bypassing attachments", 10*time.Second)
		if !strings.Contains(logs, "takes CAP_SYS_ADMIN") || strings.Contains(logs, "bypasses the node's IP stack") {
			t.Errorf("log:\n%s", logs)
		}
		t.Logf("installer without SYS_ADMIN: %s", grepLine(logs, "could not scan"))
		c.stopContainer(id, ds.Spec.Template.Spec.TerminationGracePeriodSeconds)
		c.waitExit(id, 5*time.Second)
	})

	// Uninstall as docs/install.md says: -uninstall-on-exit in the args,
	// then the pod is deleted.
	id2 := c.createContainer(sandboxID, pod.withArgs(1, "-uninstall-on-exit"), pod.sandbox, "uninstall")
	c.waitReady(id2, pod.container, 30*time.Second)
	if scan {
		seen := c.waitLog(id2, "bypasses the node's IP stack", 10*time.Second)
		inContainer := filepath.Join("/host/run/netns", filepath.Base(webPath))
		if line := grepLine(seen, "bypasses the node's IP stack"); !strings.Contains(line, inContainer) || !strings.Contains(line, "macvlan") {
			t.Errorf("attachment scan: %q, want the macvlan in %s", line, inContainer)
		}
	} else if logs := c.containerLogs(id2); strings.Contains(logs, "bypasses") || strings.Contains(logs, "could not scan") {
		// Off: the macvlan goes unreported, as documented.
		t.Errorf("attachment scan off, but:\n%s", logs)
	}
	c.stopContainer(id2, ds.Spec.Template.Spec.TerminationGracePeriodSeconds)
	code, logs := c.waitExit(id2, 5*time.Second)
	if code != 0 || !strings.Contains(logs, "uninstalled on exit") {
		t.Errorf("uninstall on exit: exit %d; log:\n%s", code, logs)
	}
	if b, _ := os.ReadFile(primary); !bytes.Equal(b, primaryBytes) {
		t.Errorf("after uninstall the conflist is not the primary's original:\n%s\nwant\n%s", b, primaryBytes)
	}
	for _, f := range []string{pluginBin, nodeCopy, readyFile} {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("after uninstall %s exists (%v)", f, err)
		}
	}
	if left := nodeTables(t, node); slices.ContainsFunc(left, func(s string) bool { return strings.Contains(s, "egress_cni") }) {
		t.Errorf("after uninstall node tables %v", left)
	}
	// The control: without the node rules the same pod gets out, so what
	// held it in was them.
	if r := dialReply(t, webNS, proxyUID, target); r.Kind != nstest.KindDirect || r.Src.Addr() != webIP {
		t.Errorf("after uninstall the proxy UID to %s: %+v, want direct from %s", target, r, webIP)
	}
	if err := webNS.Close(); err != nil {
		t.Error(err)
	}
	t.Logf("DaemonSet container end to end in %s", time.Since(start).Round(time.Millisecond))
}

// addMacvlan puts a macvlan on a dummy device of the node into the pod's
// namespace.
func addMacvlan(t *testing.T, node, pod ns.NetNS) {
	t.Helper()
	// The lower device: a veth of the node's, as an uplink would be (a
	// macvlan needs an Ethernet device with a real driver).
	err := node.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "secondary0"}, PeerName: "secondary1"}); err != nil {
			return err
		}
		lower, err := netlink.LinkByName("secondary0")
		if err != nil {
			return err
		}
		mv := &netlink.Macvlan{LinkAttrs: netlink.LinkAttrs{Name: "net1", ParentIndex: lower.Attrs().Index}, Mode: netlink.MACVLAN_MODE_BRIDGE}
		if err := netlink.LinkAdd(mv); err != nil {
			return err
		}
		return netlink.LinkSetNsFd(mv, int(pod.Fd()))
	})
	if err != nil {
		t.Fatalf("macvlan into the pod: %v", err)
	}
}

// waitLog waits until the container's log contains s and returns the log.
func (c *containerd) waitLog(id, s string, timeout time.Duration) string {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		logs := c.containerLogs(id)
		if strings.Contains(logs, s) {
			return logs
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("container %.12s did not log %q in %s; log:\n%s", id, s, timeout, logs)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func grepLine(s, sub string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
}

func lastLine(s string) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return l[len(l)-1]
}

// nodeTables lists the nftables tables of the namespace ("family name").
func nodeTables(t *testing.T, n ns.NetNS) []string {
	t.Helper()
	out, err := nstest.Exec(n, "nft", "list", "tables")
	if err != nil {
		t.Fatalf("nft list tables: %v", err)
	}
	var tables []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if f, ok := strings.CutPrefix(strings.TrimSpace(l), "table "); ok {
			tables = append(tables, f)
		}
	}
	return tables
}

// createContainer writes the config and runs crictl create and start.
func (c *containerd) createContainer(sandboxID string, cfg, sandbox map[string]any, name string) string {
	t := c.t
	t.Helper()
	cfgFile := filepath.Join(c.dir, "ctr-"+name+".json")
	sbFile := filepath.Join(c.dir, "sandbox-"+name+".json")
	writeJSON(t, cfgFile, cfg)
	writeJSON(t, sbFile, sandbox)
	out, err := c.crictl("create", sandboxID, cfgFile, sbFile)
	if err != nil {
		t.Fatalf("crictl create %s: %v\n%s\n%s", name, err, out, c.logTail())
	}
	id := strings.TrimSpace(out)
	if out, err := c.crictl("start", id); err != nil {
		t.Fatalf("crictl start %s: %v\n%s\n%s", name, err, out, c.logTail())
	}
	return id
}

// containerStatus is the part of `crictl inspect` the test reads.
type containerStatus struct {
	Status struct {
		State    string
		ExitCode int32 `json:"exitCode"`
	}
	Info struct {
		Pid int
	}
}

func (c *containerd) inspectContainer(id string) containerStatus {
	c.t.Helper()
	out, err := c.crictl("inspect", "-o", "json", id)
	if err != nil {
		c.t.Fatalf("crictl inspect %s: %v\n%s", id, err, out)
	}
	var s containerStatus
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		c.t.Fatalf("crictl inspect: %v\n%.2000s", err, out)
	}
	return s
}

func (c *containerd) containerLogs(id string) string {
	out, err := c.crictl("logs", id)
	if err != nil {
		c.t.Errorf("crictl logs %s: %v", id, err)
	}
	return out
}

// waitExit waits for the container to exit and returns its exit code and
// log.
func (c *containerd) waitExit(id string, timeout time.Duration) (int32, string) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s := c.inspectContainer(id)
		if s.Status.State == "CONTAINER_EXITED" {
			return s.Status.ExitCode, c.containerLogs(id)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("container %.12s still %s after %s; log:\n%s", id, s.Status.State, timeout, c.containerLogs(id))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitReady runs the manifest's readiness probe (exec) in the container
// every 200ms, as the kubelet would every periodSeconds, until it passes.
func (c *containerd) waitReady(id string, ctr corev1.Container, timeout time.Duration) {
	c.t.Helper()
	if ctr.ReadinessProbe == nil || ctr.ReadinessProbe.Exec == nil {
		c.t.Fatal("the container has no exec readiness probe")
	}
	deadline := time.Now().Add(timeout)
	for {
		out, err := c.crictl(append([]string{"exec", "-s", "--timeout", "5", id}, ctr.ReadinessProbe.Exec.Command...)...)
		if err == nil {
			return
		}
		if s := c.inspectContainer(id); s.Status.State != "CONTAINER_RUNNING" || time.Now().After(deadline) {
			c.t.Fatalf("installer not ready (%s, probe: %v %s); log:\n%s", s.Status.State, err, out, c.containerLogs(id))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *containerd) stopContainer(id string, grace *int64) {
	c.t.Helper()
	secs := int64(30)
	if grace != nil {
		secs = *grace
	}
	if out, err := c.crictl("stop", "-t", strconv.FormatInt(secs, 10), id); err != nil {
		c.t.Fatalf("crictl stop: %v\n%s", err, out)
	}
}

// waitCNIConf waits until containerd's loaded CNI config holds a plugin
// of the type (it reloads on changes to its conf dir).
func (c *containerd) waitCNIConf(typ string, timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		types, err := c.cniPluginTypes()
		if err == nil && slices.Contains(types, typ) {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("containerd's CNI config has no %s plugin after %s: %v %v", typ, timeout, types, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// cniPluginTypes are the plugin types of the network config containerd
// has loaded (crictl info: cniconfig.Networks[].Config.Source).
func (c *containerd) cniPluginTypes() ([]string, error) {
	out, err := c.crictl("info")
	if err != nil {
		return nil, err
	}
	var info struct {
		CNIConfig struct {
			Networks []struct{ Config struct{ Source string } }
		} `json:"cniconfig"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		return nil, err
	}
	var types []string
	for _, n := range info.CNIConfig.Networks {
		var conf struct{ Plugins []struct{ Type string } }
		if json.Unmarshal([]byte(n.Config.Source), &conf) != nil {
			continue
		}
		for _, p := range conf.Plugins {
			types = append(types, p.Type)
		}
	}
	return types, nil
}

// checkSecurity reads the container's process from the host: its
// effective, permitted and bounding capabilities are exactly the
// securityContext's add list, no_new_privs and seccomp (filter) follow
// it, and its root filesystem is read-only.
func checkSecurity(t *testing.T, c *containerd, id string, sc *corev1.SecurityContext) {
	t.Helper()
	pid := c.inspectContainer(id).Info.Pid
	if pid == 0 {
		t.Fatal("crictl inspect shows no pid")
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	status := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			status[k] = strings.TrimSpace(v)
		}
	}
	var want uint64
	for _, name := range sc.Capabilities.Add {
		n, ok := capNumbers[string(name)]
		if !ok {
			t.Fatalf("capability %s unknown to the test", name)
		}
		want |= 1 << n
	}
	if !slices.Contains(sc.Capabilities.Drop, "ALL") {
		t.Errorf("capabilities.drop %v, want ALL", sc.Capabilities.Drop)
	}
	for _, k := range []string{"CapEff", "CapPrm", "CapBnd"} {
		got, err := strconv.ParseUint(status[k], 16, 64)
		if err != nil || got != want {
			t.Errorf("%s = %s, want %016x (%v)", k, status[k], want, sc.Capabilities.Add)
		}
	}
	nnp := "0"
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		nnp = "1"
	}
	if status["NoNewPrivs"] != nnp {
		t.Errorf("NoNewPrivs = %s, want %s", status["NoNewPrivs"], nnp)
	}
	if sc.SeccompProfile != nil && sc.SeccompProfile.Type == corev1.SeccompProfileTypeRuntimeDefault && status["Seccomp"] != "2" {
		t.Errorf("Seccomp = %s, want 2 (filter: RuntimeDefault)", status["Seccomp"])
	}
	mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	rootRO := false
	for _, l := range strings.Split(string(mi), "\n") {
		f := strings.Fields(l)
		if len(f) > 5 && f[4] == "/" {
			rootRO = slices.Contains(strings.Split(f[5], ","), "ro")
		}
	}
	if ro := sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem; ro != rootRO {
		t.Errorf("root filesystem read-only %v, want %v", rootRO, ro)
	}
	t.Logf("installer process %d: CapEff %s NoNewPrivs %s Seccomp %s, root read-only %v", pid, status["CapEff"], status["NoNewPrivs"], status["Seccomp"], rootRO)
}

// capNumbers are the capabilities a manifest may add, by their
// Kubernetes names.
var capNumbers = map[string]int{
	"CHOWN": unix.CAP_CHOWN, "DAC_OVERRIDE": unix.CAP_DAC_OVERRIDE, "DAC_READ_SEARCH": unix.CAP_DAC_READ_SEARCH,
	"FOWNER": unix.CAP_FOWNER, "KILL": unix.CAP_KILL, "NET_ADMIN": unix.CAP_NET_ADMIN, "NET_RAW": unix.CAP_NET_RAW,
	"SYS_ADMIN": unix.CAP_SYS_ADMIN, "SYS_PTRACE": unix.CAP_SYS_PTRACE, "SYS_CHROOT": unix.CAP_SYS_CHROOT,
	"SETUID": unix.CAP_SETUID, "SETGID": unix.CAP_SETGID, "BPF": unix.CAP_BPF, "SYS_RESOURCE": unix.CAP_SYS_RESOURCE,
}

// checkMetricsEndpoint: the agent serves /metrics where the manifest
// says (-metrics-bind=$(NODE_IP): the node's internal address only) and
// not on the node's other addresses, the uplink's included.
func checkMetricsEndpoint(t *testing.T, n ns.NetNS, c corev1.Container) {
	t.Helper()
	port := ""
	for _, p := range c.Ports {
		if p.Name == "metrics" {
			port = strconv.Itoa(int(p.ContainerPort))
		}
	}
	if port == "" {
		t.Log("no metrics port in this DaemonSet")
		return
	}
	get := func(addr string) (string, error) {
		var conn net.Conn
		if err := n.Do(func(ns.NetNS) error {
			var err error
			conn, err = net.DialTimeout("tcp", net.JoinHostPort(addr, port), 3*time.Second)
			return err
		}); err != nil {
			return "", err
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(conn, "GET /metrics HTTP/1.0\r\nHost: node\r\n\r\n"); err != nil {
			return "", err
		}
		b, err := io.ReadAll(conn)
		return string(b), err
	}
	body, err := get(simNodeIP)
	if err != nil || !strings.HasPrefix(body, "HTTP/1.0 200") || !strings.Contains(body, "egress_cni_node_rules_in_sync 1") {
		t.Errorf("GET /metrics at the node's internal address %s:%s: %v; %.300s", simNodeIP, port, err, body)
	}
	if _, err := get(uplinkNodeIP); err == nil || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("GET /metrics at the uplink's address %s:%s: %v, want connection refused (bound to the internal address only)", uplinkNodeIP, port, err)
	}
}
