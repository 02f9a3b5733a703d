package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/pkg/node"
)

// explainOpts are explain's inputs besides the config.
type explainOpts struct {
	source, dest string
	stateDir     string
	live         bool
	established  bool
	srcAddr      string // forge this source from the pod's interface
	iif          string // input interface of a source that is no pod
}

// dest is ip:port/proto, [ip6]:port/proto, or ip/icmp.
type dest struct {
	addr  netip.Addr
	port  uint16
	proto uint8
	name  string
}

func parseDest(s string) (dest, error) {
	hostport, proto, ok := strings.Cut(s, "/")
	if !ok {
		return dest{}, fmt.Errorf("destination %q: want IP:PORT/PROTO (tcp, udp) or IP/icmp", s)
	}
	var d dest
	switch proto {
	case "tcp":
		d.proto = unix.IPPROTO_TCP
	case "udp":
		d.proto = unix.IPPROTO_UDP
	case "icmp":
		a, err := netip.ParseAddr(strings.Trim(hostport, "[]"))
		if err != nil {
			return dest{}, fmt.Errorf("destination %q: %q is not an IP address", s, hostport)
		}
		d.addr, d.proto, d.name = a, unix.IPPROTO_ICMP, "icmp"
		if a.Is6() {
			d.proto, d.name = unix.IPPROTO_ICMPV6, "ipv6-icmp"
		}
		return d, nil
	default:
		return dest{}, fmt.Errorf("destination %q: protocol %q is not tcp, udp or icmp", s, proto)
	}
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil || ap.Port() == 0 {
		return dest{}, fmt.Errorf("destination %q: %q is not IP:PORT (IPv6 as [ADDR]:PORT)", s, hostport)
	}
	d.addr, d.port, d.name = ap.Addr().Unmap(), ap.Port(), proto
	return d, nil
}

// findSource resolves a pod IP or namespace/name to a registered pod.
func findSource(src string, pods []node.Pod, ids map[string]node.Identity, v6 bool) (node.Pod, netip.Addr, string, error) {
	if a, err := netip.ParseAddr(src); err == nil {
		for _, p := range pods {
			if slices.Contains(p.IPs, a) {
				return p, a, who(p, ids), nil
			}
		}
		return node.Pod{}, a, "", nil // no pod: -iif says where it comes from
	}
	ns, name, ok := strings.Cut(src, "/")
	if !ok || ns == "" || name == "" {
		return node.Pod{}, netip.Addr{}, "", fmt.Errorf("source %q: want a pod IP or NAMESPACE/NAME", src)
	}
	for id, rec := range ids {
		if rec.Namespace != ns || rec.Name != name {
			continue
		}
		for _, p := range pods {
			if p.ContainerID != id {
				continue
			}
			for _, a := range p.IPs {
				if a.Is6() == v6 {
					return p, a, who(p, ids), nil
				}
			}
			return node.Pod{}, netip.Addr{}, "", fmt.Errorf("source %q: the pod has no %s address (%v)", src, map[bool]string{false: "IPv4", true: "IPv6"}[v6], p.IPs)
		}
		return node.Pod{}, netip.Addr{}, "", fmt.Errorf("source %q: recorded as container %s, which is not registered with the node rules", src, id)
	}
	return node.Pod{}, netip.Addr{}, "", fmt.Errorf("source %q: no identity record of that pod on this node", src)
}

func who(p node.Pod, ids map[string]node.Identity) string {
	if rec, ok := ids[p.ContainerID]; ok {
		return rec.Namespace + "/" + rec.Name
	}
	return "container " + p.ContainerID
}

// routeOIF names the interface the route to a leaves through.
func routeOIF(a netip.Addr) (string, error) {
	rs, err := netlink.RouteGet(a.AsSlice())
	if err != nil {
		return "", fmt.Errorf("no route to %s: %w", a, err)
	}
	if len(rs) == 0 {
		return "", fmt.Errorf("no route to %s", a)
	}
	l, err := netlink.LinkByIndex(rs[0].LinkIndex)
	if err != nil {
		return "", fmt.Errorf("route to %s: interface %d: %w", a, rs[0].LinkIndex, err)
	}
	return l.Attrs().Name, nil
}

// explain runs in the node rules' namespace.
func explain(w io.Writer, cfg *node.Config, o explainOpts) error {
	d, err := parseDest(o.dest)
	if err != nil {
		return err
	}
	live := "not compared with the kernel (add -live)"
	if o.live {
		if err := node.Check(cfg); err != nil {
			return fmt.Errorf("the node rules in the kernel differ from the config, so the model cannot answer for them: %w", err)
		}
		live = "the node rules in the kernel match the config (Check)"
	}
	pods, err := node.ListPods()
	if err != nil {
		return err
	}
	ids, idErr := node.ReadIdentities(o.stateDir)
	pod, src, name, err := findSource(o.source, pods, ids, d.addr.Is6())
	if err != nil {
		if idErr != nil {
			err = errors.Join(err, idErr)
		}
		return err
	}
	pkt := node.TracePacket{Src: src, Dst: d.addr, Proto: d.proto, SPort: 40000, DPort: d.port, Established: o.established}
	switch {
	case pod.ContainerID != "":
		pkt.IIF = pod.L3
		if !pod.Routed() {
			pkt.Port = pod.Port
		}
	case o.iif != "":
		pkt.IIF = o.iif
		name = "no pod's address, from " + o.iif
	default:
		return fmt.Errorf("source %s is no registered pod's address: say where it comes from with -iif", src)
	}
	if o.srcAddr != "" {
		a, err := netip.ParseAddr(o.srcAddr)
		if err != nil || a.Is6() != d.addr.Is6() {
			return fmt.Errorf("-src-addr %q: want an address of the destination's family", o.srcAddr)
		}
		pkt.Src = a
	}
	// A frame to another pod of the same bridge is bridged, not routed.
	for _, p := range pods {
		if pkt.Port != "" && p.L3 == pod.L3 && p.Port != pod.Port && slices.Contains(p.IPs, d.addr) {
			pkt.OPort = p.Port
		}
	}
	if pkt.OPort == "" {
		if pkt.OIF, err = routeOIF(d.addr); err != nil {
			return err
		}
		back, err := routeOIF(pkt.Src)
		pkt.RPFOK = err == nil && back == pkt.IIF
	}
	tr, err := cfg.TracePacket(pods, pkt)
	if err != nil {
		return err
	}
	state := "new connection"
	if o.established {
		state = "established connection"
	}
	dst := d.addr.String()
	if d.port != 0 {
		dst = netip.AddrPortFrom(d.addr, d.port).String()
	}
	fmt.Fprintf(w, "packet: %s %s -> %s/%s, %s\n", name, pkt.Src, dst, d.name, state)
	if pod.ContainerID != "" {
		fmt.Fprintf(w, "  pod: container %s, host side %s via %s\n", pod.ContainerID, pod.Port, pod.L3)
	}
	if pkt.OPort != "" {
		fmt.Fprintf(w, "  bridged to port %s\n", pkt.OPort)
	} else {
		fmt.Fprintf(w, "  in on %s, route out %s, reverse path %s\n", pkt.IIF, pkt.OIF, map[bool]string{true: "ok", false: "fails"}[pkt.RPFOK])
	}
	fmt.Fprintln(w, "path:")
	for _, s := range tr.Steps {
		fmt.Fprintf(w, "  %s\n", s)
	}
	v := tr.Verdict()
	if tr.Reason != "" {
		v += " (" + string(tr.Reason) + ")"
	}
	fmt.Fprintf(w, "verdict: %s\ndecided by: %s\n", v, tr.Decided)
	if !tr.Accepted && tr.Logged {
		fmt.Fprintf(w, "audit: sent to NFLOG group %d (rate limited %d/s per reason); counters %s\n", cfg.AuditGroup, cfg.AuditRate, strings.Join(tr.Counters, ", "))
	}
	fmt.Fprintf(w, "live: %s\n", live)
	return nil
}
