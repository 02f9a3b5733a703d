package sim

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
)

// A kube-proxy stand-in: what kube-proxy's iptables mode programs for
// Services, written with the nft binary into tables of its own (ip and
// ip6 kube-proxy-sim) in a node's namespace, the way the other writers
// on a node share the host with egress-cni:
//
//   - nat prerouting and output jump to services: a ClusterIP:port is
//     DNATed to the Service's endpoint, after KUBE-MARK-MASQ (mark |=
//     0x4000) for sources outside the cluster's pod CIDRs; an
//     externalIP:port and, for destinations local to the node (fib daddr
//     type local), a NodePort are marked unconditionally and DNATed;
//   - nat postrouting masquerades what carries 0x4000, and clears the
//     bit, as KUBE-POSTROUTING does;
//   - filter forward accepts what carries 0x4000 and established flows,
//     as KUBE-FORWARD does (an accept in our table does not override a
//     drop in another, which is the point);
//   - hostPorts, as the portmap plugin does them: node-local
//     destination:port DNATed to the pod, no masquerade.
//
// Only the first packet of a connection passes nat chains, so, as with
// the real kube-proxy, only that packet carries 0x4000.
const (
	KubeProxyTable = "kube-proxy-sim"
	// KubeMarkMasq is kube-proxy's default masquerade bit
	// (iptablesMasqueradeBit 14).
	KubeMarkMasq uint32 = 0x4000
)

// Service is one Kubernetes Service as kube-proxy would program it.
type Service struct {
	Name string
	// Protocols are "tcp" and/or "udp"; empty means both.
	Protocols []string
	// ClusterIPs (one per family at most) and Port.
	ClusterIPs []netip.Addr
	Port       uint16
	// NodePort, if not 0, on every local address of the node.
	NodePort uint16
	// ExternalIPs, reached on Port.
	ExternalIPs []netip.Addr
	// Endpoints: one per family at most (a Service without selector and
	// a hand-made EndpointSlice may point anywhere, the internet
	// included).
	Endpoints []netip.AddrPort
}

// HostPort is a container port published on the node (portmap plugin).
type HostPort struct {
	Protocol string // "tcp" or "udp"
	Port     uint16
	Pod      netip.AddrPort
}

// KubeProxy is the whole stand-in configuration of one node.
type KubeProxy struct {
	// ClusterCIDRs are the cluster's pod CIDRs (kube-proxy's
	// --cluster-cidr): ClusterIP traffic from outside them is marked.
	ClusterCIDRs []netip.Prefix
	Services     []Service
	HostPorts    []HostPort
}

// Ruleset is the nft script that installs kp (replacing any earlier
// stand-in tables).
func (kp KubeProxy) Ruleset() (string, error) {
	var b strings.Builder
	for _, fam := range []string{"ip", "ip6"} {
		v6 := fam == "ip6"
		// add + delete + add: replaces the table whether or not it exists.
		fmt.Fprintf(&b, "add table %[1]s %[2]s\ndelete table %[1]s %[2]s\ntable %[1]s %[2]s {\n", fam, KubeProxyTable)
		var cidrs []string
		for _, p := range kp.ClusterCIDRs {
			if p.Addr().Is6() == v6 {
				cidrs = append(cidrs, p.String())
			}
		}
		b.WriteString("\tchain mark-masq {\n\t\tmeta mark set meta mark | 0x4000\n\t}\n")
		var svc, nodeports []string
		for _, s := range kp.Services {
			var ep netip.AddrPort
			for _, e := range s.Endpoints {
				if e.Addr().Is6() == v6 {
					ep = e
				}
			}
			if !ep.IsValid() {
				continue
			}
			l4 := l4Match(s.Protocols)
			target := ep.String()
			for _, ip := range s.ClusterIPs {
				if ip.Is6() != v6 {
					continue
				}
				m := fmt.Sprintf("%s daddr %s %s th dport %d", fam, ip, l4, s.Port)
				if len(cidrs) > 0 {
					svc = append(svc, fmt.Sprintf("%s %s saddr != { %s } jump mark-masq comment %q", m, fam, strings.Join(cidrs, ", "), s.Name+" cluster IP"))
				}
				svc = append(svc, fmt.Sprintf("%s dnat to %s comment %q", m, target, s.Name+" cluster IP"))
			}
			for _, ip := range s.ExternalIPs {
				if ip.Is6() != v6 {
					continue
				}
				m := fmt.Sprintf("%s daddr %s %s th dport %d", fam, ip, l4, s.Port)
				svc = append(svc, fmt.Sprintf("%s jump mark-masq comment %q", m, s.Name+" external IP"),
					fmt.Sprintf("%s dnat to %s comment %q", m, target, s.Name+" external IP"))
			}
			if s.NodePort != 0 {
				m := fmt.Sprintf("%s th dport %d", l4, s.NodePort)
				nodeports = append(nodeports, fmt.Sprintf("%s jump mark-masq comment %q", m, s.Name+" node port"),
					fmt.Sprintf("%s dnat to %s comment %q", m, target, s.Name+" node port"))
			}
		}
		var hostports []string
		for _, h := range kp.HostPorts {
			if h.Pod.Addr().Is6() != v6 {
				continue
			}
			if h.Protocol != "tcp" && h.Protocol != "udp" {
				return "", fmt.Errorf("host port %d: protocol %q", h.Port, h.Protocol)
			}
			hostports = append(hostports, fmt.Sprintf("fib daddr type local %s dport %d dnat to %s", h.Protocol, h.Port, h.Pod))
		}
		svc = append(svc, "fib daddr type local jump nodeports")
		writeChain(&b, "services", "", svc)
		writeChain(&b, "nodeports", "", nodeports)
		writeChain(&b, "hostports", "", hostports)
		writeChain(&b, "prerouting", "type nat hook prerouting priority dstnat; policy accept;", []string{"jump services", "jump hostports"})
		writeChain(&b, "output", "type nat hook output priority -100; policy accept;", []string{"jump services", "jump hostports"})
		writeChain(&b, "postrouting", "type nat hook postrouting priority srcnat; policy accept;", []string{
			"meta mark & 0x4000 == 0 return",
			"meta mark set meta mark & 0xffffbfff masquerade",
		})
		writeChain(&b, "forward", "type filter hook forward priority filter; policy accept;", []string{
			"meta mark & 0x4000 == 0x4000 accept",
			"ct state established,related accept",
		})
		b.WriteString("}\n")
	}
	return b.String(), nil
}

func l4Match(protos []string) string {
	if len(protos) == 1 {
		return "meta l4proto " + protos[0]
	}
	return "meta l4proto { tcp, udp }"
}

func writeChain(b *strings.Builder, name, base string, rules []string) {
	fmt.Fprintf(b, "\tchain %s {\n", name)
	if base != "" {
		fmt.Fprintf(b, "\t\t%s\n", base)
	}
	for _, r := range rules {
		fmt.Fprintf(b, "\t\t%s\n", r)
	}
	b.WriteString("\t}\n")
}

// InstallKubeProxy programs kp into n (replacing an earlier stand-in).
func InstallKubeProxy(n ns.NetNS, kp KubeProxy) error {
	rs, err := kp.Ruleset()
	if err != nil {
		return err
	}
	if _, err := execStdin(n, rs, "nft", "-f", "-"); err != nil {
		return fmt.Errorf("kube-proxy stand-in: %w\n%s", err, rs)
	}
	return nil
}

// RemoveKubeProxy deletes the stand-in's tables from n.
func RemoveKubeProxy(n ns.NetNS) error {
	_, err := execStdin(n, fmt.Sprintf("add table ip %[1]s\ndelete table ip %[1]s\nadd table ip6 %[1]s\ndelete table ip6 %[1]s\n", KubeProxyTable), "nft", "-f", "-")
	return err
}
