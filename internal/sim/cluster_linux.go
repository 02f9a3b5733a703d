package sim

// The cluster (every address from a documentation range):
//
//	internet  eth0 203.0.113.10/24  2001:db8:ff::10/64    echo server on 8080
//	   |
//	router    inet0 203.0.113.1/24  2001:db8:ff::1/64
//	          app0  192.0.2.1/30    2001:db8:a::1/64  -> 198.51.100.0/26, 2001:db8:1a::/64
//	          egr0  192.0.2.5/30    2001:db8:e::1/64  -> 198.51.100.64/26, 2001:db8:1e::/64
//	   |                  |
//	app node  uplink 192.0.2.2/30   egress node uplink 192.0.2.6/30
//	          cni0 198.51.100.1/26              cni0 198.51.100.65/26
//	               2001:db8:1a::1/64                 2001:db8:1e::1/64
//
// Each node has its own directory with a CNI bin dir (the reference
// plugins, as the primary CNI installed them), a CNI conf dir holding
// the primary CNI's 10-bridge.conflist, a node config and our plugin
// entry for the installer, host-local's data and libcni's cache.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/pkg/node"
)

// Addresses and ports of the cluster.
var (
	InternetV4 = netip.MustParseAddr("203.0.113.10")
	InternetV6 = netip.MustParseAddr("2001:db8:ff::10")
	// EchoPort is the internet host's (and in-cluster pods') echo port.
	EchoPort uint16 = 8080
	// ForwardPort is the egress gateway forwarder's port (Istio's egress
	// gateway takes mTLS from sidecars on 15443).
	ForwardPort uint16 = 15443
	// ClusterCIDRs are every pod and node network of the cluster: what
	// the node rules allow pods to reach.
	ClusterCIDRs = []netip.Prefix{
		netip.MustParsePrefix("198.51.100.0/25"), netip.MustParsePrefix("2001:db8:1a::/64"), netip.MustParsePrefix("2001:db8:1e::/64"),
		netip.MustParsePrefix("192.0.2.0/29"), netip.MustParsePrefix("2001:db8:a::/64"), netip.MustParsePrefix("2001:db8:e::/64"),
	}
)

// Cluster is the simulated cluster.
type Cluster struct {
	Internet, Router ns.NetNS
	App, Egress      *Node
	net              *Net
}

// Node is one node: its host network namespace and its CNI directories.
type Node struct {
	Name, Role string
	NS         ns.NetNS
	// Uplink4 and Uplink6 are the node's addresses towards the router:
	// on the egress node, the source the internet sees for gateways.
	Uplink4, Uplink6 netip.Addr
	// Dir holds BinDir, ConfDir, NodeConfig, PluginConfig, the plugin's
	// log and the ready and lock files of the installer.
	Dir, BinDir, ConfDir       string
	NodeConfig, PluginConfig   string
	LogFile, ReadyFile, lockFl string
	ipamDir, cacheDir          string
	// StateDir is the plugin's stateDir: the pods' identity records.
	StateDir string

	list     *libcni.NetworkConfigList
	loopback *libcni.NetworkConfig
	cni      *libcni.CNIConfig
	// ConfFile is the config the chain was loaded from.
	ConfFile string
}

// NewCluster builds the namespaces, links, routes and node directories.
// pluginsDir holds the reference plugins (EnsureReferencePlugins); they
// are linked into each node's CNI bin dir. The nodes have no egress-cni
// yet: run Node.Install.
func NewCluster(cl *Cleanups, pluginsDir string) (*Cluster, error) {
	w, err := NewNet(cl, NetOptions{})
	if err != nil {
		return nil, err
	}
	c := &Cluster{Internet: w.Internet, Router: w.Router, net: w}
	if err := ServeEcho(cl, c.Internet, netip.AddrPortFrom(InternetV4, EchoPort), netip.AddrPortFrom(InternetV6, EchoPort)); err != nil {
		return nil, err
	}
	var allow []string
	for _, p := range ClusterCIDRs {
		allow = append(allow, strconv.Quote(p.String()))
	}
	cidrs := `"podCIDRs": [` + strings.Join(allow[:3], ", ") + `], "nodeCIDRs": [` + strings.Join(allow[3:], ", ") + `]`
	c.App, err = c.newNode(cl, pluginsDir, "app", "app0", 0, "198.51.100.0/26", "198.51.100.1", "2001:db8:1a::/64", "2001:db8:1a::1",
		`{"role": "app", `+cidrs+`}`)
	if err != nil {
		return nil, err
	}
	c.Egress, err = c.newNode(cl, pluginsDir, "egress", "egr0", 4, "198.51.100.64/26", "198.51.100.65", "2001:db8:1e::/64", "2001:db8:1e::1",
		`{"role": "egress", "uplink": "uplink", `+cidrs+`}`)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// newNode makes a node on the cluster's network (Net.WireNode) and its
// directory with the primary CNI's plugins and conflist.
func (c *Cluster) newNode(cl *Cleanups, pluginsDir, name, routerIf string, off byte, sub4, gw4, sub6, gw6, nodeConfig string) (*Node, error) {
	nn, err := c.net.WireNode(name, routerIf, off, sub4, sub6)
	if err != nil {
		return nil, err
	}
	n := &Node{Name: name, Role: name, NS: nn.NS, Uplink4: nn.Uplink4, Uplink6: nn.Uplink6}

	if n.Dir, err = os.MkdirTemp("", "egress-sim-"+name+"-"); err != nil {
		return nil, err
	}
	cl.Push(func() { _ = os.RemoveAll(n.Dir) })
	n.BinDir, n.ConfDir = filepath.Join(n.Dir, "opt/cni/bin"), filepath.Join(n.Dir, "etc/cni/net.d")
	n.NodeConfig, n.PluginConfig = filepath.Join(n.Dir, "node.json"), filepath.Join(n.Dir, "plugin.json")
	n.LogFile, n.ReadyFile, n.lockFl = filepath.Join(n.Dir, "egress-cni.log"), filepath.Join(n.Dir, "run/ready"), filepath.Join(n.Dir, "run/install.lock")
	n.ipamDir, n.cacheDir = filepath.Join(n.Dir, "ipam"), filepath.Join(n.Dir, "cache")
	for _, d := range []string{n.BinDir, n.ConfDir, filepath.Dir(n.ReadyFile)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	for _, p := range ReferencePlugins {
		src, err := filepath.Abs(filepath.Join(pluginsDir, p))
		if err != nil {
			return nil, err
		}
		if err := os.Symlink(src, filepath.Join(n.BinDir, p)); err != nil {
			return nil, err
		}
	}
	// The primary CNI's config, as a bridge installation ships it.
	conflist := fmt.Sprintf(`{
  "cniVersion": "1.1.0",
  "name": "k8s-pod-network",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": false,
      "ipam": {
        "type": "host-local",
        "dataDir": %q,
        "ranges": [[{"subnet": %q, "gateway": %q}], [{"subnet": %q, "gateway": %q}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
      }
    }
  ]
}
`, n.ipamDir, sub4, gw4, sub6, gw6)
	// nodeConfig: the node config the installer applies, which the
	// plugin applies itself when an ADD finds no node rules (a reboot).
	// stateDir: the pods' identity records, which the agent reads to
	// name the pod of a drop.
	n.StateDir = filepath.Join(n.Dir, "state")
	plugin := fmt.Sprintf(`{"type": "egress-cni", "nodeEnforcement": true, "nodeConfig": %q, "stateDir": %q, "logFile": %q, "logLevel": "debug"}`, n.NodeConfig, n.StateDir, n.LogFile)
	for f, b := range map[string]string{
		filepath.Join(n.ConfDir, "10-bridge.conflist"): conflist,
		n.NodeConfig:   nodeConfig + "\n",
		n.PluginConfig: plugin + "\n",
	} {
		if err := os.WriteFile(f, []byte(b), 0o644); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// Install runs the real installer, the way the DaemonSet does on a node:
// `installer install` with this node's CNI dirs, plugin entry and node
// config, started inside the node's namespace (hostNetwork) and pointed
// at it with -netns as well. It returns the installer's log.
func (n *Node) Install(ctx context.Context, installer, plugin string) (string, error) {
	args := []string{"install",
		"-cni-conf-dir", n.ConfDir, "-cni-bin-dir", n.BinDir, "-binary", plugin,
		"-plugin-config", n.PluginConfig, "-node-config", n.NodeConfig, "-netns", n.NS.Path(),
		"-lock-file", n.lockFl, "-ready-file", n.ReadyFile}
	cmd := exec.CommandContext(ctx, installer, args...)
	var out []byte
	err := n.NS.Do(func(ns.NetNS) error {
		var err error
		out, err = cmd.CombinedOutput()
		return err
	})
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", installer, strings.Join(args, " "), err, out)
	}
	if _, err := os.Stat(n.ReadyFile); err != nil {
		return string(out), fmt.Errorf("installer on %s node exited 0 but is not ready: %w", n.Name, err)
	}
	return string(out), nil
}

// LoadChain loads the config the runtime would use, as containerd does:
// the lexically first .conf, .conflist or .json file in the conf dir (a
// .conf becomes a one-plugin list), with libcni executing plugins from
// the node's bin dir and caching results in the node's directory.
func (n *Node) LoadChain() error {
	files, err := libcni.ConfFiles(n.ConfDir, []string{".conf", ".conflist", ".json"})
	if err != nil {
		return err
	}
	sort.Strings(files)
	if len(files) == 0 {
		return fmt.Errorf("no CNI config in %s", n.ConfDir)
	}
	f := files[0]
	if strings.HasSuffix(f, ".conflist") {
		n.list, err = libcni.ConfListFromFile(f)
	} else {
		var conf *libcni.NetworkConfig
		if conf, err = libcni.ConfFromFile(f); err == nil {
			n.list, err = libcni.ConfListFromConf(conf)
		}
	}
	if err != nil {
		return fmt.Errorf("CNI config %s: %w", f, err)
	}
	n.ConfFile = f
	n.loopback, err = libcni.ConfFromBytes([]byte(`{"cniVersion": "1.1.0", "name": "cni-loopback", "type": "loopback"}`))
	if err != nil {
		return err
	}
	n.cni = libcni.NewCNIConfigWithCacheDir([]string{n.BinDir}, n.cacheDir, nil)
	return nil
}

// Plugins lists the types of the loaded chain, in order.
func (n *Node) Plugins() []string {
	var ts []string
	for _, p := range n.list.Plugins {
		ts = append(ts, p.Network.Type)
	}
	return ts
}

// Pod is one pod sandbox: its Kubernetes identity, its annotations (the
// runtime passes them in runtimeConfig), its network namespace and the
// addresses the chain gave it.
type Pod struct {
	Namespace, Name, ID string
	Annotations         map[string]string
	NS                  ns.NetNS
	Node                *Node
	IP4, IP6            netip.Addr
	// GW4 and GW6 are the pod's gateways (the bridge's addresses).
	GW4, GW6 netip.Addr
}

// NewPod makes a pod's namespace on n (IPv6 DAD off, so its address is
// usable at once); AddPod wires it.
func (n *Node) NewPod(cl *Cleanups, namespace, name string, annotations map[string]string) (*Pod, error) {
	netns, err := NewNS(cl, "pod-"+name)
	if err != nil {
		return nil, err
	}
	// Quiet IPv6 on the pod's link: no router solicitations, and MLD's
	// unsolicited reports (re)sent at once rather than over the next
	// seconds. With br_netfilter these link-local multicasts between
	// bridge ports pass the node's forward hook too, and would add noise
	// to the drop counter the demo reads.
	for _, kv := range [][2]string{
		{"net.ipv6.conf.default.accept_dad", "0"}, {"net.ipv6.conf.all.accept_dad", "0"},
		{"net.ipv6.conf.default.router_solicitations", "0"}, {"net.ipv6.conf.default.accept_ra", "0"},
		{"net.ipv6.conf.default.mldv1_unsolicited_report_interval", "1"},
		{"net.ipv6.conf.default.mldv2_unsolicited_report_interval", "1"},
	} {
		if err := Sysctl(netns, kv[0], kv[1]); err != nil {
			return nil, err
		}
	}
	if annotations == nil {
		annotations = map[string]string{}
	}
	return &Pod{Namespace: namespace, Name: name, ID: "sandbox-" + name, Annotations: annotations, NS: netns, Node: n}, nil
}

func (n *Node) rt(p *Pod) *libcni.RuntimeConf {
	return RuntimeConf(p.ID, p.NS.Path(), p.Namespace, p.Name, p.Annotations)
}

// RuntimeConf is the RuntimeConf containerd builds for a pod sandbox id
// of pod namespace/name in netnsPath: eth0, the kubelet's K8S_* CNI_ARGS
// and the pod's annotations as a capability argument.
func RuntimeConf(id, netnsPath, namespace, name string, annotations map[string]string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: id,
		NetNS:       netnsPath,
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", namespace},
			{"K8S_POD_NAME", name},
			{"K8S_POD_INFRA_CONTAINER_ID", id},
			{"K8S_POD_UID", "uid-" + name},
		},
		CapabilityArgs: map[string]interface{}{"io.kubernetes.cri.pod-annotations": annotations},
	}
}

// AddPod runs what containerd's RunPodSandbox runs: the loopback network,
// then the chain (ADD), from a thread inside the node's namespace so that
// every plugin runs there. cl runs the DEL.
func (n *Node) AddPod(ctx context.Context, cl *Cleanups, p *Pod) error {
	if n.list == nil {
		return errors.New("no CNI chain loaded: run LoadChain")
	}
	var res types.Result
	err := n.NS.Do(func(ns.NetNS) error {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if _, err := n.cni.AddNetwork(ctx, n.loopback, n.rt(p)); err != nil {
			return fmt.Errorf("loopback: %w", err)
		}
		var err error
		res, err = n.cni.AddNetworkList(ctx, n.list, n.rt(p))
		return err
	})
	// A failed ADD is cleaned up by DEL too, as a runtime does.
	cl.Push(func() { _ = n.DelPod(p) })
	if err != nil {
		return fmt.Errorf("ADD %s/%s on the %s node: %w", p.Namespace, p.Name, n.Name, err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return err
	}
	for _, ip := range r.IPs {
		a, _ := netip.AddrFromSlice(ip.Address.IP)
		gw, _ := netip.AddrFromSlice(ip.Gateway)
		if a = a.Unmap(); a.Is4() {
			p.IP4, p.GW4 = a, gw.Unmap()
		} else {
			p.IP6, p.GW6 = a, gw
		}
	}
	return nil
}

// ResolveNeighbours makes the pod resolve its gateways' link-layer
// addresses (a TCP connection to port 9 of each, refused by the node).
// IPv6 neighbour solicitations are multicast: the bridge floods them to
// the other pods' ports as well, and with br_netfilter those copies pass
// the node's forward hook, where the node rules drop and count them.
// Doing this before measuring keeps that out of the counts.
func (p *Pod) ResolveNeighbours() {
	_ = p.NS.Do(func(ns.NetNS) error {
		for _, gw := range []netip.Addr{p.GW4, p.GW6} {
			if gw.IsValid() {
				if c, err := net.DialTimeout("tcp", netip.AddrPortFrom(gw, 9).String(), 300*time.Millisecond); err == nil {
					c.Close()
				}
			}
		}
		return nil
	})
}

// DelPod runs DEL for the chain and loopback, with a short bound: it is
// used in teardown.
func (n *Node) DelPod(p *Pod) error {
	return n.NS.Do(func(ns.NetNS) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return errors.Join(
			n.cni.DelNetworkList(ctx, n.list, n.rt(p)),
			n.cni.DelNetwork(ctx, n.loopback, n.rt(p)),
		)
	})
}

// Drops reads the node rules' drop counters (packets): at the exit
// (dropped) and for a forged source (forged), together.
func (n *Node) Drops() (uint64, error) {
	var c node.Counters
	err := n.NS.Do(func(ns.NetNS) error {
		var err error
		c, err = node.ReadCounters()
		return err
	})
	return c.Dropped + c.Forged, err
}

// Gateways lists the node's registered gateways (interface . address).
func (n *Node) Gateways() ([]node.Gateway, error) {
	var gws []node.Gateway
	err := n.NS.Do(func(ns.NetNS) error {
		var err error
		gws, err = node.ListGateways()
		return err
	})
	return gws, err
}

// InternetSeen is how many packets to the echo port reached the internet
// host.
func (c *Cluster) InternetSeen() (uint64, error) {
	out, err := Exec(c.Internet, "nft", "-j", "list", "counter", "inet", "probe", "seen")
	if err != nil {
		return 0, err
	}
	var doc struct {
		Nftables []struct {
			Counter *struct {
				Packets uint64 `json:"packets"`
			} `json:"counter"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return 0, fmt.Errorf("nft counter output %q: %w", out, err)
	}
	for _, o := range doc.Nftables {
		if o.Counter != nil {
			return o.Counter.Packets, nil
		}
	}
	return 0, fmt.Errorf("no counter in %q", out)
}
