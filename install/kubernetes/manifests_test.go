// Package kubernetes holds the manifests that install egress-cni on a
// cluster (kubectl apply -k install/kubernetes). This test decodes every
// YAML document in it strictly with the k8s.io/api types, so a typo in a
// field name fails here rather than being dropped by the API server, and
// checks the embedded configs with the parsers that will read them.
package kubernetes

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/egress-cni/egress-cni/internal/initcmd"
	"github.com/egress-cni/egress-cni/pkg/cni"
	"github.com/egress-cni/egress-cni/pkg/install"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// newObject returns an empty typed object for apiVersion/kind.
func newObject(gvk string) (any, bool) {
	switch gvk {
	case "v1/Namespace":
		return &corev1.Namespace{}, true
	case "v1/ServiceAccount":
		return &corev1.ServiceAccount{}, true
	case "v1/ConfigMap":
		return &corev1.ConfigMap{}, true
	case "v1/Pod":
		return &corev1.Pod{}, true
	case "apps/v1/DaemonSet":
		return &appsv1.DaemonSet{}, true
	case "apps/v1/Deployment":
		return &appsv1.Deployment{}, true
	case "rbac.authorization.k8s.io/v1/ClusterRole":
		return &rbacv1.ClusterRole{}, true
	case "rbac.authorization.k8s.io/v1/ClusterRoleBinding":
		return &rbacv1.ClusterRoleBinding{}, true
	case "rbac.authorization.k8s.io/v1/Role":
		return &rbacv1.Role{}, true
	case "rbac.authorization.k8s.io/v1/RoleBinding":
		return &rbacv1.RoleBinding{}, true
	}
	return nil, false
}

// kustomization is the subset of kustomize's Kustomization we use,
// decoded strictly too.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
	Labels     []struct {
		Pairs            map[string]string `json:"pairs"`
		IncludeSelectors bool              `json:"includeSelectors,omitempty"`
	} `json:"labels,omitempty"`
	Patches []struct {
		Path string `json:"path"`
	} `json:"patches,omitempty"`
	// Images is what `kustomize edit set image` writes.
	Images []struct {
		Name    string `json:"name"`
		NewName string `json:"newName,omitempty"`
		NewTag  string `json:"newTag,omitempty"`
		Digest  string `json:"digest,omitempty"`
	} `json:"images,omitempty"`
}

var docSep = regexp.MustCompile(`(?m)^---\s*$`)

// decodeStrict converts one YAML document to JSON (duplicate keys are an
// error) and decodes it into v, refusing unknown fields.
func decodeStrict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("trailing data after the object")
	}
	return nil
}

// decodeManifest decodes a YAML document as the kind it declares.
func decodeManifest(doc []byte) (any, error) {
	var tm metav1.TypeMeta
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(j, &tm); err != nil {
		return nil, err
	}
	obj, ok := newObject(tm.APIVersion + "/" + tm.Kind)
	if !ok {
		return nil, fmt.Errorf("unexpected kind %s/%s: add it to newObject", tm.APIVersion, tm.Kind)
	}
	return obj, decodeStrict(doc, obj)
}

// manifests decodes every document of every YAML file under the
// directory, keyed by "file#index".
func manifests(t *testing.T) map[string]any {
	t.Helper()
	objs := map[string]any{}
	err := filepath.WalkDir(".", func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !(strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml")) {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for i, doc := range docSep.Split(string(b), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			name := fmt.Sprintf("%s#%d", path, i)
			if filepath.Base(path) == "kustomization.yaml" {
				var k kustomization
				if err := decodeStrict([]byte(doc), &k); err != nil {
					t.Errorf("%s: %v", name, err)
				}
				objs[name] = &k
				continue
			}
			obj, err := decodeManifest([]byte(doc))
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			objs[name] = obj
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

func stripComments(doc string) string {
	var out []string
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// A typo must fail: the strictness is what this test is for.
func TestStrictDecodingCatchesTypos(t *testing.T) {
	for _, doc := range []string{
		"apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec:\n  template:\n    spec:\n      hostNetwrok: true\n",
		"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\ndata: {c: d}\n",
		"apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x, namespce: y}\n",
		"apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n",
	} {
		if _, err := decodeManifest([]byte(doc)); err == nil {
			t.Errorf("accepted:\n%s", doc)
		}
	}
}

func TestManifests(t *testing.T) {
	objs := manifests(t)
	if len(objs) == 0 {
		t.Fatal("no manifests found")
	}
	var (
		daemonSets []*appsv1.DaemonSet
		configMap  *corev1.ConfigMap
		kust       *kustomization
		sa         *corev1.ServiceAccount
	)
	for name, o := range objs {
		switch o := o.(type) {
		case *appsv1.DaemonSet:
			daemonSets = append(daemonSets, o)
		case *corev1.ConfigMap:
			configMap = o
		case *corev1.ServiceAccount:
			sa = o
		case *kustomization:
			if !strings.Contains(name, "/") {
				kust = o
			}
		case *rbacv1.Role, *rbacv1.ClusterRole, *rbacv1.RoleBinding, *rbacv1.ClusterRoleBinding:
			t.Errorf("%s: RBAC object, but neither the installer nor the plugin uses the API server", name)
		}
	}

	// kubectl apply -k install/kubernetes applies every top-level file.
	if kust == nil {
		t.Fatal("no kustomization.yaml")
	}
	top, _ := filepath.Glob("*.yaml")
	top = slices.DeleteFunc(top, func(s string) bool { return s == "kustomization.yaml" })
	slices.Sort(top)
	res := slices.Sorted(slices.Values(kust.Resources))
	if !slices.Equal(top, res) {
		t.Errorf("kustomization resources %v, want every top-level manifest %v", res, top)
	}

	if sa == nil || sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
		t.Error("the ServiceAccount must exist and not mount a token")
	}
	if configMap == nil {
		t.Fatal("no ConfigMap")
	}
	entry, err := install.NormalizeEntry([]byte(configMap.Data["plugin.json"]))
	if err != nil {
		t.Errorf("plugin.json: %v", err)
	}
	// The node rules drop everything from pods but registered gateways;
	// only the plugin registers them.
	if s, err := cni.ParseConfig(entry); err != nil || s.Conf.NodeEnforcement == nil || !*s.Conf.NodeEnforcement {
		t.Errorf("plugin.json must set nodeEnforcement: %v", err)
	}

	if len(daemonSets) != 2 {
		t.Fatalf("%d DaemonSets, want the app and the egress one", len(daemonSets))
	}
	roles := map[node.Role]bool{}
	for _, ds := range daemonSets {
		checkDaemonSet(t, ds, configMap, roles)
	}
	if !roles[node.RoleApp] || !roles[node.RoleEgress] {
		t.Errorf("roles covered: %v", roles)
	}
}

// nodeLayout is what a DaemonSet must fit on the node: the CNI dirs, the
// egress nodes' labels and taint.
type nodeLayout struct {
	cniBin, cniConf string
	egressLabels    map[string]string
	egressTaint     string
	// noScan: the attachment scan is off (-netns-dir=): no /run/netns
	// mount, no SYS_ADMIN.
	noScan bool
	// metricsPort is the agent's -metrics-port, container port and
	// scrape annotation; 0 means metrics off (none of the three but the
	// flag).
	metricsPort int
	// metricsAllAddrs: no -metrics-bind (every host address) instead
	// of the node's internal address from status.hostIP.
	metricsAllAddrs bool
}

// defaultLayout is what the kustomize manifests (and the chart's
// defaults) install for.
var defaultLayout = nodeLayout{
	cniBin: "/opt/cni/bin", cniConf: "/etc/cni/net.d",
	egressLabels: map[string]string{"egress-cni.io/role": "egress"}, egressTaint: "egress-cni.io/egress",
	metricsPort: install.DefaultMetricsPort,
}

func checkDaemonSet(t *testing.T, ds *appsv1.DaemonSet, cm *corev1.ConfigMap, roles map[node.Role]bool) {
	t.Helper()
	checkDaemonSetOn(t, ds, cm, roles, defaultLayout)
}

func checkDaemonSetOn(t *testing.T, ds *appsv1.DaemonSet, cm *corev1.ConfigMap, roles map[node.Role]bool, lay nodeLayout) {
	t.Helper()
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Errorf("%s: not hostNetwork", ds.Name)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("%s: mounts a service account token", ds.Name)
	}
	if ds.Spec.Selector == nil || ds.Spec.Selector.MatchLabels["app.kubernetes.io/name"] != ds.Spec.Template.Labels["app.kubernetes.io/name"] {
		t.Errorf("%s: selector does not match the template", ds.Name)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%s: %d containers", ds.Name, len(spec.Containers))
	}
	c := spec.Containers[0]
	checkLeastPrivilege(t, ds.Name, c.SecurityContext, !lay.noScan)
	if c.ReadinessProbe == nil || c.ReadinessProbe.Exec == nil {
		t.Errorf("%s: no readiness probe", ds.Name)
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	mounted := map[string]string{} // host path -> container path
	for _, m := range c.VolumeMounts {
		if hp, ok := hostPaths[m.Name]; ok {
			mounted[hp] = m.MountPath
		}
	}
	wantHost := []string{lay.cniBin, lay.cniConf, "/run/egress-cni", "/var/log", "/run/netns"}
	if lay.noScan {
		wantHost = wantHost[:4]
		if _, ok := hostPathsOf(spec)["netns"]; ok {
			t.Errorf("%s: /run/netns mounted without the attachment scan", ds.Name)
		}
	}
	for _, hp := range wantHost {
		if mounted[hp] == "" {
			t.Errorf("%s: host path %s not mounted", ds.Name, hp)
		}
	}
	// The flags point at the mounts and at ConfigMap keys that exist.
	args := map[string]string{}
	for _, a := range c.Args {
		if k, v, ok := strings.Cut(strings.TrimLeft(a, "-"), "="); ok {
			args[k] = v
		}
	}
	// The plugin's nodeConfig is the host path of the installer's copy.
	if copyPath := args["node-config-copy"]; copyPath == "" || mounted["/var/lib/egress-cni"] == "" ||
		strings.Replace(copyPath, mounted["/var/lib/egress-cni"], "/var/lib/egress-cni", 1) != pluginNodeConfig(t, cm) {
		t.Errorf("%s: -node-config-copy %q (mounted %v) is not the plugin's nodeConfig %q", ds.Name, copyPath, mounted, pluginNodeConfig(t, cm))
	}
	if lay.noScan {
		if v, ok := args["netns-dir"]; !ok || v != "" {
			t.Errorf("%s: no attachment scan, but args %v lack -netns-dir=", ds.Name, c.Args)
		}
	} else if _, ok := args["netns-dir"]; ok {
		t.Errorf("%s: -netns-dir=%s set: the scan must use the mount", ds.Name, args["netns-dir"])
	}
	// The attachment scan's default directory is the netns mount, which
	// must see pods created after the installer started.
	if !lay.noScan && mounted["/run/netns"] != install.DefaultNetNSDir {
		t.Errorf("%s: /run/netns mounted at %q, want %s (the installer's -netns-dir default)", ds.Name, mounted["/run/netns"], install.DefaultNetNSDir)
	}
	for _, m := range c.VolumeMounts {
		if hostPaths[m.Name] == "/run/netns" && (m.MountPropagation == nil || *m.MountPropagation != "HostToContainer") {
			t.Errorf("%s: /run/netns without mountPropagation HostToContainer: new pods' namespaces would not be seen", ds.Name)
		}
	}
	if args["cni-conf-dir"] != mounted[lay.cniConf] || args["cni-bin-dir"] != mounted[lay.cniBin] {
		t.Errorf("%s: args %v do not match the mounts %v", ds.Name, args, mounted)
	}
	// The audit reads the plugin's identity records where the plugin
	// writes them (its default stateDir, mounted).
	if args["state-dir"] != mounted[node.DefaultStateDir] {
		t.Errorf("%s: -state-dir %q is not the plugin's stateDir %s as mounted (%q)", ds.Name, args["state-dir"], node.DefaultStateDir, mounted[node.DefaultStateDir])
	}
	// Metrics: the container port named metrics, the flag and the scrape
	// annotations agree (the Helm chart mirrors these names).
	port := fmt.Sprint(lay.metricsPort)
	switch lay.metricsPort {
	case 0:
		if len(c.Ports) != 0 || len(ds.Spec.Template.Annotations) != 0 || args["metrics-port"] != "0" {
			t.Errorf("%s: metrics off, but ports %v, annotations %v, -metrics-port=%q", ds.Name, c.Ports, ds.Spec.Template.Annotations, args["metrics-port"])
		}
	default:
		checkMetrics(t, ds, c, args, port)
		checkMetricsBind(t, ds, c, args, lay.metricsAllAddrs)
	}
	if !slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool {
		return e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName"
	}) {
		t.Errorf("%s: no NODE_NAME from spec.nodeName: the audit lines would name the pod's host name", ds.Name)
	}
	for _, flag := range []string{"plugin-config", "node-config"} {
		key, ok := strings.CutPrefix(args[flag], "/etc/egress-cni/")
		if !ok || cm.Data[key] == "" {
			t.Errorf("%s: -%s=%s is not a key of the ConfigMap", ds.Name, flag, args[flag])
			continue
		}
		if flag == "node-config" {
			cfg, err := node.Parse([]byte(cm.Data[key]))
			if err != nil {
				t.Errorf("%s: %s: %v", ds.Name, key, err)
				continue
			}
			roles[cfg.Role] = true
			checkPlacement(t, ds, cfg.Role, lay)
		}
	}
}

// installerCaps are the capabilities the installer needs, and why
// (test/runtime runs the container with exactly these, and shows the
// installer's error without each).
var installerCaps = map[corev1.Capability]string{
	"NET_ADMIN": "nftables and link notifications in the host network namespace (the node rules)",
	"SYS_ADMIN": "setns into the pods' network namespaces under /run/netns (the attachment scan)",
}

// checkLeastPrivilege: not privileged, every capability dropped but
// installerCaps (NET_ADMIN alone without the scan, and then no privilege
// escalation), read-only root filesystem, RuntimeDefault seccomp.
// checkMetrics: the container port named metrics, the flag and the
// scrape annotations agree on port.
func checkMetrics(t *testing.T, ds *appsv1.DaemonSet, c corev1.Container, args map[string]string, port string) {
	t.Helper()
	if i := slices.IndexFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == "metrics" }); i < 0 ||
		fmt.Sprint(c.Ports[i].ContainerPort) != port || c.Ports[i].Protocol != corev1.ProtocolTCP || args["metrics-port"] != port {
		t.Errorf("%s: want container port metrics %s/TCP and -metrics-port=%s; ports %v, flag %q", ds.Name, port, port, c.Ports, args["metrics-port"])
	}
	for k, v := range map[string]string{"prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": "/metrics"} {
		if got := ds.Spec.Template.Annotations[k]; got != v {
			t.Errorf("%s: pod annotation %s=%q, want %q", ds.Name, k, got, v)
		}
	}
}

// checkMetricsBind: the unauthenticated endpoint listens on the node's
// internal address (status.hostIP through $(NODE_IP), which the kubelet
// expands from the container's env), not on every host address, unless
// the layout says all addresses.
func checkMetricsBind(t *testing.T, ds *appsv1.DaemonSet, c corev1.Container, args map[string]string, allAddrs bool) {
	t.Helper()
	hostIP := slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool {
		return e.Name == "NODE_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP"
	})
	bind, set := args["metrics-bind"]
	switch {
	case allAddrs && (set || hostIP):
		t.Errorf("%s: metrics on all addresses, but -metrics-bind=%q, NODE_IP from status.hostIP %v", ds.Name, bind, hostIP)
	case !allAddrs && (bind != "$(NODE_IP)" || !hostIP):
		t.Errorf("%s: want -metrics-bind=$(NODE_IP) with NODE_IP from status.hostIP; flag %q (set %v), env %v", ds.Name, bind, set, c.Env)
	}
}

func checkLeastPrivilege(t *testing.T, name string, sc *corev1.SecurityContext, scan bool) {
	t.Helper()
	if sc == nil {
		t.Errorf("%s: no securityContext", name)
		return
	}
	if sc.Privileged == nil || *sc.Privileged {
		t.Errorf("%s: privileged must be set, false", name)
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("%s: capabilities.drop must be [ALL]", name)
	} else {
		add := slices.Sorted(slices.Values(sc.Capabilities.Add))
		want := slices.Sorted(maps.Keys(installerCaps))
		if !scan {
			want = []corev1.Capability{"NET_ADMIN"}
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Errorf("%s: without SYS_ADMIN, allowPrivilegeEscalation must be false", name)
			}
		}
		if !slices.Equal(add, want) {
			t.Errorf("%s: capabilities.add %v, want %v", name, add, want)
		}
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("%s: readOnlyRootFilesystem must be true", name)
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: seccompProfile must be RuntimeDefault", name)
	}
	// The API server refuses allowPrivilegeEscalation: false with
	// CAP_SYS_ADMIN; with SYS_ADMIN no_new_privs would be no boundary.
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation && slices.Contains(sc.Capabilities.Add, "SYS_ADMIN") {
		t.Errorf("%s: allowPrivilegeEscalation false with SYS_ADMIN", name)
	}
}

func hostPathsOf(spec corev1.PodSpec) map[string]string {
	hp := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hp[v.Name] = v.HostPath.Path
		}
	}
	return hp
}

// checkPlacement: the egress DaemonSet runs exactly on egress nodes and
// tolerates their taint; the app one runs everywhere else.
func checkPlacement(t *testing.T, ds *appsv1.DaemonSet, role node.Role, lay nodeLayout) {
	t.Helper()
	spec := ds.Spec.Template.Spec
	tolerates := func(key string) bool {
		return slices.ContainsFunc(spec.Tolerations, func(tl corev1.Toleration) bool {
			return (tl.Key == key || tl.Key == "") && tl.Operator == corev1.TolerationOpExists &&
				(tl.Effect == "" || tl.Effect == corev1.TaintEffectNoSchedule)
		})
	}
	switch role {
	case node.RoleEgress:
		if lay.egressTaint != "" && !tolerates(lay.egressTaint) {
			t.Errorf("%s: does not tolerate %s:NoSchedule", ds.Name, lay.egressTaint)
		}
		if !maps.Equal(spec.NodeSelector, lay.egressLabels) {
			t.Errorf("%s: egress rules with nodeSelector %v, want %v", ds.Name, spec.NodeSelector, lay.egressLabels)
		}
	case node.RoleApp:
		// Off every egress node: some term must exclude each label, and
		// the terms (ORed) each hold one NotIn on an egress label.
		a := spec.Affinity
		if a == nil || a.NodeAffinity == nil || a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
			t.Errorf("%s: app rules must keep off egress nodes (no required node affinity)", ds.Name)
			return
		}
		terms := a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms
		covered := map[string]bool{}
		for _, term := range terms {
			ok := slices.ContainsFunc(term.MatchExpressions, func(r corev1.NodeSelectorRequirement) bool {
				v, isLabel := lay.egressLabels[r.Key]
				if isLabel && r.Operator == corev1.NodeSelectorOpNotIn && slices.Contains(r.Values, v) {
					covered[r.Key] = true
					return true
				}
				return false
			})
			if !ok {
				t.Errorf("%s: affinity term %v admits egress nodes", ds.Name, term)
			}
		}
		if len(terms) == 0 || len(covered) != len(lay.egressLabels) {
			t.Errorf("%s: app rules must keep off egress nodes (affinity NotIn on each of %v; terms %v)", ds.Name, lay.egressLabels, terms)
		}
	}
}

// The init-container form passes Istio's arguments to egress-init, which
// must accept them.
func TestInitContainerArgs(t *testing.T) {
	objs := manifests(t)
	n := 0
	for name, o := range objs {
		d, ok := o.(*appsv1.Deployment)
		if !ok {
			continue
		}
		for _, c := range d.Spec.Template.Spec.InitContainers {
			if !strings.HasSuffix(c.Command[0], "egress-init") {
				continue
			}
			n++
			if _, err := initcmd.Parse(c.Args, io.Discard); err != nil {
				t.Errorf("%s: egress-init rejects %q: %v", name, c.Args, err)
			}
			caps := c.SecurityContext.Capabilities
			if caps == nil || !slices.Contains(caps.Add, "NET_ADMIN") {
				t.Errorf("%s: egress-init needs NET_ADMIN", name)
			}
		}
	}
	if n == 0 {
		t.Error("no egress-init init container found")
	}
}

// What `kubectl apply -k` sends is kustomize's output: decode that too
// (as the issue asks of `helm template` output, should a chart appear).
func TestKustomizeBuild(t *testing.T) {
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		t.Skip("kubectl not installed: kustomize output not checked (the source manifests are, by TestManifests)")
	}
	out, err := exec.Command(kubectl, "kustomize", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl kustomize: %v\n%s", err, out)
	}
	kinds := map[string]int{}
	for i, doc := range docSep.Split(string(out), -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		obj, err := decodeManifest([]byte(doc))
		if err != nil {
			t.Errorf("document %d: %v", i, err)
			continue
		}
		kinds[fmt.Sprintf("%T", obj)]++
		if m, ok := obj.(metav1.Object); ok && m.GetLabels()["app.kubernetes.io/part-of"] != "egress-cni" {
			t.Errorf("document %d: %s lacks the part-of label", i, m.GetName())
		}
	}
	want := map[string]int{"*v1.Namespace": 1, "*v1.ServiceAccount": 1, "*v1.ConfigMap": 1, "*v1.DaemonSet": 2}
	if fmt.Sprint(kinds) != fmt.Sprint(want) {
		t.Errorf("kustomize output has %v, want %v", kinds, want)
	}
}

// pluginNodeConfig is plugin.json's "nodeConfig".
func pluginNodeConfig(t *testing.T, cm *corev1.ConfigMap) string {
	t.Helper()
	var entry struct {
		NodeConfig string `json:"nodeConfig"`
	}
	if err := json.Unmarshal([]byte(cm.Data["plugin.json"]), &entry); err != nil {
		t.Fatalf("plugin.json: %v", err)
	}
	return entry.NodeConfig
}
