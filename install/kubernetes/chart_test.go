package kubernetes

// The Helm chart (install/helm/egress-cni), rendered with Helm's own Go
// library as `helm template` / `helm install` render it (values merged,
// values.schema.json enforced), then held to the same checks as the
// kustomize manifests: every document decoded strictly with the
// k8s.io/api types, the embedded configs parsed by the plugin's and
// pkg/node's parsers, and the default rendering equal to the kustomize
// manifests, so the two cannot drift.

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-containerregistry/pkg/name"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/egress-cni/egress-cni/install/image"
	"github.com/egress-cni/egress-cni/pkg/cni"
	"github.com/egress-cni/egress-cni/pkg/install"
	"github.com/egress-cni/egress-cni/pkg/node"
)

const chartDir = "../helm/egress-cni"

func loadChart(t *testing.T) *chart.Chart {
	t.Helper()
	ch, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	return ch
}

// render renders the chart with the values (merged over values.yaml, as
// `helm install -f` does) and decodes every document strictly.
func render(t *testing.T, ch *chart.Chart, vals map[string]any) ([]any, error) {
	t.Helper()
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{
		Name: "egress-cni", Namespace: "kube-system", Revision: 1, IsInstall: true,
	}, chartutil.DefaultCapabilities)
	if err != nil {
		return nil, err
	}
	out, err := engine.Render(ch, rv)
	if err != nil {
		return nil, err
	}
	files := slices.Sorted(maps.Keys(out))
	var objs []any
	for _, f := range files {
		if strings.HasSuffix(f, "NOTES.txt") {
			continue
		}
		for i, doc := range docSep.Split(out[f], -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			obj, err := decodeManifest([]byte(doc))
			if err != nil {
				t.Errorf("%s#%d: %v\n%s", f, i, err, doc)
				continue
			}
			objs = append(objs, obj)
		}
	}
	return objs, nil
}

func mustRender(t *testing.T, ch *chart.Chart, vals map[string]any) []any {
	t.Helper()
	objs, err := render(t, ch, vals)
	if err != nil {
		t.Fatalf("render %v: %v", vals, err)
	}
	return objs
}

// rendered sorts a rendering's objects by kind.
type rendered struct {
	ns         []*corev1.Namespace
	sa         []*corev1.ServiceAccount
	cm         []*corev1.ConfigMap
	daemonSets map[string]*appsv1.DaemonSet
	other      []any
}

func byKind(objs []any) rendered {
	r := rendered{daemonSets: map[string]*appsv1.DaemonSet{}}
	for _, o := range objs {
		switch o := o.(type) {
		case *corev1.Namespace:
			r.ns = append(r.ns, o)
		case *corev1.ServiceAccount:
			r.sa = append(r.sa, o)
		case *corev1.ConfigMap:
			r.cm = append(r.cm, o)
		case *appsv1.DaemonSet:
			r.daemonSets[o.Name] = o
		default:
			r.other = append(r.other, o)
		}
	}
	return r
}

// checkRendering runs the kustomize manifests' checks on a rendering.
func checkRendering(t *testing.T, objs []any, wantNamespace bool) rendered {
	t.Helper()
	return checkRenderingOn(t, objs, wantNamespace, defaultLayout)
}

func checkRenderingOn(t *testing.T, objs []any, wantNamespace bool, lay nodeLayout) rendered {
	t.Helper()
	r := byKind(objs)
	if len(r.other) != 0 {
		t.Errorf("unexpected objects: %v", r.other)
	}
	if n := len(r.ns); (n == 1) != wantNamespace || n > 1 {
		t.Errorf("%d Namespaces, want %v", n, wantNamespace)
	}
	if len(r.sa) != 1 || r.sa[0].AutomountServiceAccountToken == nil || *r.sa[0].AutomountServiceAccountToken {
		t.Errorf("want one ServiceAccount without a token: %v", r.sa)
	}
	if len(r.cm) != 1 {
		t.Fatalf("%d ConfigMaps", len(r.cm))
	}
	cm := r.cm[0]
	entry, err := install.NormalizeEntry([]byte(cm.Data["plugin.json"]))
	if err != nil {
		t.Errorf("plugin.json: %v", err)
	}
	if s, err := cni.ParseConfig(entry); err != nil || s.Conf.NodeEnforcement == nil || !*s.Conf.NodeEnforcement {
		t.Errorf("plugin.json must parse and set nodeEnforcement: %v", err)
	}
	if len(r.daemonSets) != 2 || r.daemonSets["egress-cni"] == nil || r.daemonSets["egress-cni-egress"] == nil {
		t.Fatalf("DaemonSets %v, want egress-cni and egress-cni-egress", slices.Sorted(maps.Keys(r.daemonSets)))
	}
	roles := map[node.Role]bool{}
	for _, ds := range r.daemonSets {
		checkDaemonSetOn(t, ds, cm, roles, lay)
		if ds.Namespace != cm.Namespace || ds.Namespace != r.sa[0].Namespace {
			t.Errorf("%s in namespace %q, ConfigMap in %q", ds.Name, ds.Namespace, cm.Namespace)
		}
	}
	if !roles[node.RoleApp] || !roles[node.RoleEgress] {
		t.Errorf("roles covered: %v", roles)
	}
	return r
}

func TestChartDefaults(t *testing.T) {
	ch := loadChart(t)
	r := checkRendering(t, mustRender(t, ch, nil), true)
	for _, ds := range r.daemonSets {
		if img := ds.Spec.Template.Spec.Containers[0].Image; img != image.DefaultRef {
			t.Errorf("%s runs %s, `make image` builds %s", ds.Name, img, image.DefaultRef)
		}
	}
	tag, err := name.NewTag(image.DefaultRef, name.StrictValidation)
	if err != nil {
		t.Fatal(err)
	}
	if ch.Metadata.AppVersion != tag.TagStr() {
		t.Errorf("Chart.yaml appVersion %s, image tag %s", ch.Metadata.AppVersion, tag.TagStr())
	}
}

// kustomizeObjects decodes the top-level manifests as `kubectl apply -k`
// sends them: with the kustomization's labels added to every object's
// metadata.labels (not selectors, not templates).
func kustomizeObjects(t *testing.T) []any {
	t.Helper()
	b, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := decodeStrict(b, &k); err != nil {
		t.Fatal(err)
	}
	var objs []any
	for _, f := range k.Resources {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, doc := range docSep.Split(string(b), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			obj, err := decodeManifest([]byte(doc))
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			m := obj.(metav1.Object)
			labels := m.GetLabels()
			if labels == nil {
				labels = map[string]string{}
			}
			for _, l := range k.Labels {
				if l.IncludeSelectors {
					t.Fatal("includeSelectors labels are not modelled here")
				}
				maps.Copy(labels, l.Pairs)
			}
			m.SetLabels(labels)
			objs = append(objs, obj)
		}
	}
	return objs
}

// normalizeConfigMap re-encodes JSON values, so that key order and
// indentation do not count.
func normalizeConfigMap(t *testing.T, cm *corev1.ConfigMap) {
	t.Helper()
	for k, v := range cm.Data {
		var x any
		if err := json.Unmarshal([]byte(v), &x); err != nil {
			t.Fatalf("ConfigMap %s: %v", k, err)
		}
		b, _ := json.Marshal(x)
		cm.Data[k] = string(b)
	}
}

// The chart with default values renders exactly what kustomize applies.
func TestChartMatchesKustomize(t *testing.T) {
	chartObjs := mustRender(t, loadChart(t), nil)
	kustObjs := kustomizeObjects(t)
	key := func(o any) string {
		m := o.(metav1.Object)
		return fmt.Sprintf("%T %s/%s", o, m.GetNamespace(), m.GetName())
	}
	index := func(objs []any) map[string]any {
		out := map[string]any{}
		for _, o := range objs {
			if cm, ok := o.(*corev1.ConfigMap); ok {
				normalizeConfigMap(t, cm)
			}
			out[key(o)] = o
		}
		return out
	}
	c, k := index(chartObjs), index(kustObjs)
	if ck, kk := slices.Sorted(maps.Keys(c)), slices.Sorted(maps.Keys(k)); !slices.Equal(ck, kk) {
		t.Fatalf("chart renders %v, kustomize has %v", ck, kk)
	}
	for name, want := range k {
		if d := cmp.Diff(want, c[name]); d != "" {
			t.Errorf("%s: chart (+) differs from kustomize (-):\n%s", name, d)
		}
	}
}

// Variants: each value reaches the object or config it names.
func TestChartVariants(t *testing.T) {
	ch := loadChart(t)
	digest := "sha256:" + strings.Repeat("ab", 32)

	t.Run("image by digest", func(t *testing.T) {
		r := checkRendering(t, mustRender(t, ch, map[string]any{"image": map[string]any{
			"hub": "registry.example.com/platform", "tag": "v9.8.7", "digest": digest, "pullPolicy": "Always",
		}}), true)
		for _, ds := range r.daemonSets {
			c := ds.Spec.Template.Spec.Containers[0]
			want := "registry.example.com/platform/egress-cni:v9.8.7@" + digest
			if c.Image != want || c.ImagePullPolicy != corev1.PullAlways {
				t.Errorf("%s: image %s %s, want %s Always", ds.Name, c.Image, c.ImagePullPolicy, want)
			}
			ref, err := name.NewDigest(c.Image, name.StrictValidation)
			if err != nil || ref.DigestStr() != digest {
				t.Errorf("%s: %s is not a valid digest reference: %v", ds.Name, c.Image, err)
			}
		}
	})

	t.Run("cluster and node values", func(t *testing.T) {
		vals := map[string]any{
			"cniBinDir": "/home/kubernetes/bin", "cniConfDir": "/etc/cni/conf.d", "cniConfFileName": "10-calico.conflist",
			"excludeNamespaces": []any{"kube-system", "monitoring"}, "logLevel": "debug",
			"node": map[string]any{
				"podCIDRs": []any{"10.42.0.0/16", "fd00:42::/56"}, "serviceCIDRs": []any{"10.43.0.0/16"},
				"nodeCIDRs": []any{"192.168.10.0/24"}, "allow": []any{"198.51.100.0/24"}, "logDrops": false,
			},
			"gateway": map[string]any{"namespace": "egress", "podNamePrefix": "gw", "annotation": "example.com/gateway", "allowedNamespaces": []any{"egress"}},
			"egressNodes": map[string]any{
				// Maps merge with the defaults (Helm): null removes a key.
				"labels": map[string]any{"egress-cni.io/role": nil, "node-role.example.com/egress": "true", "zone": "dmz"},
				"taints": []any{map[string]any{"key": "dedicated", "effect": "NoExecute"}},
				"uplink": "bond0", "egressIP": "203.0.113.7",
			},
			"updateStrategy": map[string]any{"type": "OnDelete"}, "uninstallOnExit": true,
			"resources":   map[string]any{"requests": map[string]any{"cpu": "50m"}, "limits": nil},
			"tolerations": []any{map[string]any{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}},
		}
		r := checkRenderingOn(t, mustRender(t, ch, vals), true, nodeLayout{
			cniBin: "/home/kubernetes/bin", cniConf: "/etc/cni/conf.d",
			egressLabels: map[string]string{"node-role.example.com/egress": "true", "zone": "dmz"},
			metricsPort:  install.DefaultMetricsPort,
		})
		cm := r.cm[0]
		entry, err := install.NormalizeEntry([]byte(cm.Data["plugin.json"]))
		if err != nil {
			t.Fatal(err)
		}
		s, err := cni.ParseConfig(entry)
		if err != nil {
			t.Fatal(err)
		}
		if s.LogLevel != "debug" || !slices.Equal(s.ExcludeNamespaces, []string{"kube-system", "monitoring"}) ||
			s.Gateways.Namespace != "egress" || s.Gateways.PodNamePrefix != "gw" || s.Gateways.Annotation != "example.com/gateway" ||
			!slices.Equal(s.Gateways.AllowedNamespaces, []string{"egress"}) {
			t.Errorf("plugin.json parsed as %+v", s)
		}
		app, err := node.Parse([]byte(cm.Data["node-app.json"]))
		if err != nil {
			t.Fatal(err)
		}
		egress, err := node.Parse([]byte(cm.Data["node-egress.json"]))
		if err != nil {
			t.Fatal(err)
		}
		// Allowed: pod, service and node CIDRs and the allow list.
		wantAllowed := []string{"10.42.0.0/16", "10.43.0.0/16", "192.168.10.0/24", "198.51.100.0/24", "fd00:42::/56"}
		for _, cfg := range []*node.Config{app, egress} {
			var allowed []string
			for _, p := range cfg.Allowed {
				allowed = append(allowed, p.String())
			}
			sort.Strings(allowed)
			// (the parser adds the link-local and multicast ranges)
			if slices.ContainsFunc(wantAllowed, func(w string) bool { return !slices.Contains(allowed, w) }) || cfg.LogDrops {
				t.Errorf("%s node config: allowed %v (want %v), logDrops %v", cfg.Role, allowed, wantAllowed, cfg.LogDrops)
			}
		}
		if egress.Uplink != "bond0" || egress.EgressIP.String() != "203.0.113.7" || app.Uplink != "" || app.EgressIP.IsValid() {
			t.Errorf("uplink/egressIP: egress %q %q, app %q %q", egress.Uplink, egress.EgressIP, app.Uplink, app.EgressIP)
		}
		for _, ds := range r.daemonSets {
			spec := ds.Spec.Template.Spec
			c := spec.Containers[0]
			hp := map[string]string{}
			for _, v := range spec.Volumes {
				if v.HostPath != nil {
					hp[v.Name] = v.HostPath.Path
				}
			}
			if hp["cni-bin"] != "/home/kubernetes/bin" || hp["cni-conf"] != "/etc/cni/conf.d" {
				t.Errorf("%s: hostPaths %v", ds.Name, hp)
			}
			if !slices.Contains(c.Args, "-cni-conf-file=10-calico.conflist") || !slices.Contains(c.Args, "-v") || !slices.Contains(c.Args, "-uninstall-on-exit") {
				t.Errorf("%s: args %v lack -cni-conf-file, -v and -uninstall-on-exit", ds.Name, c.Args)
			}
			if ds.Spec.UpdateStrategy.Type != appsv1.OnDeleteDaemonSetStrategyType {
				t.Errorf("%s: updateStrategy %v", ds.Name, ds.Spec.UpdateStrategy)
			}
			// requests merge with the default (memory 32Mi); limits: null
			// removed them.
			if q, m := c.Resources.Requests[corev1.ResourceCPU], c.Resources.Requests[corev1.ResourceMemory]; q.String() != "50m" || m.String() != "32Mi" || len(c.Resources.Limits) != 0 {
				t.Errorf("%s: resources %v", ds.Name, c.Resources)
			}
		}
		egressDS, appDS := r.daemonSets["egress-cni-egress"].Spec.Template.Spec, r.daemonSets["egress-cni"].Spec.Template.Spec
		if !maps.Equal(egressDS.NodeSelector, map[string]string{"node-role.example.com/egress": "true", "zone": "dmz"}) {
			t.Errorf("egress nodeSelector %v", egressDS.NodeSelector)
		}
		if !slices.ContainsFunc(egressDS.Tolerations, func(tl corev1.Toleration) bool {
			return tl.Key == "dedicated" && tl.Operator == corev1.TolerationOpExists && tl.Effect == corev1.TaintEffectNoExecute
		}) {
			t.Errorf("egress tolerations %v lack dedicated:NoExecute", egressDS.Tolerations)
		}
		// Not an egress node = lacking any one label: one term per label.
		terms := appDS.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms
		var got []string
		for _, term := range terms {
			for _, e := range term.MatchExpressions {
				got = append(got, fmt.Sprintf("%s %s %v", e.Key, e.Operator, e.Values))
			}
			if len(term.MatchExpressions) != 1 {
				t.Errorf("app affinity term %v: want one expression per term (ORed)", term)
			}
		}
		sort.Strings(got)
		if want := []string{"node-role.example.com/egress NotIn [true]", "zone NotIn [dmz]"}; !slices.Equal(got, want) {
			t.Errorf("app affinity %v, want %v", got, want)
		}
		if len(appDS.Tolerations) != 1 || appDS.Tolerations[0].Key != "gpu" {
			t.Errorf("app tolerations %v", appDS.Tolerations)
		}
	})

	t.Run("metrics off, namespace not created", func(t *testing.T) {
		lay := defaultLayout
		lay.metricsPort = 0
		r := checkRenderingOn(t, mustRender(t, ch, map[string]any{
			"metrics":   map[string]any{"port": 0},
			"namespace": map[string]any{"name": "platform-egress", "create": false},
		}), false, lay)
		for _, ds := range r.daemonSets {
			c := ds.Spec.Template.Spec.Containers[0]
			if len(c.Ports) != 0 || len(ds.Spec.Template.Annotations) != 0 || !slices.Contains(c.Args, "-metrics-port=0") {
				t.Errorf("%s: ports %v annotations %v args %v", ds.Name, c.Ports, ds.Spec.Template.Annotations, c.Args)
			}
			if ds.Namespace != "platform-egress" {
				t.Errorf("%s in %s", ds.Name, ds.Namespace)
			}
		}
	})

	t.Run("no attachment scan", func(t *testing.T) {
		lay := defaultLayout
		lay.noScan = true
		checkRenderingOn(t, mustRender(t, ch, map[string]any{"attachmentScan": false}), true, lay)
	})

	t.Run("metrics on all addresses", func(t *testing.T) {
		lay := defaultLayout
		lay.metricsAllAddrs = true
		checkRenderingOn(t, mustRender(t, ch, map[string]any{"metrics": map[string]any{"bindHostIP": false}}), true, lay)
	})

	t.Run("metrics port", func(t *testing.T) {
		lay := defaultLayout
		lay.metricsPort = 19964
		r := checkRenderingOn(t, mustRender(t, ch, map[string]any{"metrics": map[string]any{"port": 19964}}), true, lay)
		for _, ds := range r.daemonSets {
			c := ds.Spec.Template.Spec.Containers[0]
			if len(c.Ports) != 1 || c.Ports[0].Name != "metrics" || c.Ports[0].ContainerPort != 19964 ||
				ds.Spec.Template.Annotations["prometheus.io/port"] != "19964" || !slices.Contains(c.Args, "-metrics-port=19964") {
				t.Errorf("%s: ports %v annotations %v args %v", ds.Name, c.Ports, ds.Spec.Template.Annotations, c.Args)
			}
		}
	})
}

// values.schema.json refuses malformed values, naming them.
func TestChartSchemaRejects(t *testing.T) {
	ch := loadChart(t)
	for _, tc := range []struct {
		vals string // YAML
		want string // in the error
	}{
		{"node: {podCIDRs: [10.244.0.0]}", "/node/podCIDRs/0"},
		{"node: {podCIDRs: []}", "/node/podCIDRs"},
		{"node: {podCIDRs: [10.244.0.0/16], allow: [example.com]}", "/node/allow/0"},
		{"image: {digest: sha256:abc}", "/image/digest"},
		{"image: {pullPolicy: Sometimes}", "/image/pullPolicy"},
		{"logLevel: verbose", "/logLevel"},
		{"chained: false", "/chained"},
		{"cniBinDir: opt/cni/bin", "/cniBinDir"},
		{"cniBinDirr: /opt/cni/bin", "cniBinDirr"},
		{"egressNodes: {uplink: ''}", "/egressNodes/uplink"},
		{"egressNodes: {egressIP: public}", "/egressNodes/egressIP"},
		{"egressNodes: {labels: {egress-cni.io/role: null}}", "/egressNodes/labels"},
		{"egressNodes: {uplink: eth0, labels: {role: egress}, tains: []}", "tains"},
		{"metrics: {port: 70000}", "/metrics/port"},
		{"tolerations: [{operator: Sometimes}]", "/tolerations/0/operator"},
		{"excludeNamespaces: [Kube_System]", "/excludeNamespaces/0"},
		{"updateStrategy: {type: Recreate}", "/updateStrategy/type"},
		{"uninstallOnExit: yes please", "/uninstallOnExit"},
		{"attachmentScan: 1", "/attachmentScan"},
	} {
		var vals map[string]any
		if err := yaml.Unmarshal([]byte(tc.vals), &vals); err != nil {
			t.Fatal(err)
		}
		_, err := render(t, ch, vals)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("values %s: error %v, want one naming %s", tc.vals, err, tc.want)
		}
	}
}

// The chart's files are where the docs say.
func TestChartFiles(t *testing.T) {
	for _, f := range []string{"Chart.yaml", "values.yaml", "values.schema.json", "templates/daemonset.yaml"} {
		if _, err := os.Stat(filepath.Join(chartDir, f)); err != nil {
			t.Error(err)
		}
	}
}
