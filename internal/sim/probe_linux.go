package sim

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/internal/nscore"
	"github.com/egress-cni/egress-cni/internal/sockopt"
)

// A probe is a plain socket client run as a child process of a chosen
// UID (this program re-executed, like Dial's clients): it sends bytes of
// its caller's choosing from an optional fixed local port, so that an
// attack needs no privilege the pod's user lacks and its packets can be
// told apart at the far end. RunProbeChild, called first thing in main
// (next to RunChild), serves that mode.
const (
	probeEnv      = "EGRESS_SIM_PROBE"
	probeNetwork  = "EGRESS_SIM_PROBE_NETWORK"
	probeAddr     = "EGRESS_SIM_PROBE_ADDR"
	probeLocal    = "EGRESS_SIM_PROBE_LOCAL_PORT"
	probePayload  = "EGRESS_SIM_PROBE_PAYLOAD"
	probeTimeout  = "EGRESS_SIM_PROBE_TIMEOUT"
	probeNoReply  = "EGRESS_SIM_PROBE_NO_REPLY"
	probeErrorTag = "sim-probe-error "
)

// RunProbeChild runs the probe this process was started as, if it was,
// and exits; it returns at once in an ordinary run.
func RunProbeChild() {
	if os.Getenv(probeEnv) == "1" {
		os.Exit(runProbeChild())
	}
}

// Probe is one client exchange.
type Probe struct {
	// Network is tcp4, tcp6, udp4 or udp6.
	Network string
	Addr    netip.AddrPort
	// LocalPort, if not 0, is the source port.
	LocalPort uint16
	// Payload is sent once connected (TCP) or as the datagram (UDP).
	Payload []byte
	// Timeout bounds the connect and the wait for a reply (default 1s).
	Timeout time.Duration
	// NoReply: send and return without waiting for an answer.
	NoReply bool
}

// RunProbe runs p inside n as uid:uid (no supplementary groups), with
// exe from Executable, and returns the first reply (TCP: up to the first
// newline or the peer's close; UDP: one datagram). Failures are
// *DialError, classified as Dial's are.
func RunProbe(ctx context.Context, exe string, n ns.NetNS, uid uint32, p Probe) ([]byte, error) {
	if p.Timeout == 0 {
		p.Timeout = time.Second
	}
	out, err := nscore.RunAs(ctx, exe, n, nscore.Child{
		UID: uid, GID: uid, Limit: p.Timeout + 3*time.Second, ErrPrefix: probeErrorTag,
		Env: []string{
			probeEnv + "=1",
			probeNetwork + "=" + p.Network,
			probeAddr + "=" + p.Addr.String(),
			probeLocal + "=" + strconv.Itoa(int(p.LocalPort)),
			probePayload + "=" + hex.EncodeToString(p.Payload),
			probeTimeout + "=" + p.Timeout.String(),
			probeNoReply + "=" + strconv.FormatBool(p.NoReply),
		},
	})
	var ce *nscore.ClientError
	switch {
	case errors.As(err, &ce) && ce.Killed:
		return nil, &DialError{Kind: "timeout", Msg: "probe killed"}
	case errors.As(err, &ce) && ce.Kind == "other":
		return nil, &DialError{Kind: "other", Msg: "probe: " + strings.TrimPrefix(ce.Msg, "client exited: ")}
	case errors.As(err, &ce):
		return nil, &DialError{Kind: ce.Kind, Msg: ce.Msg}
	case err != nil:
		return nil, err
	}
	b, err := hex.DecodeString(strings.TrimSpace(out))
	if err != nil {
		return nil, fmt.Errorf("probe output %q: %w", out, err)
	}
	return b, nil
}

func runProbeChild() int {
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "%s%s %v\n", probeErrorTag, sockopt.Classify(err), err)
		return 1
	}
	network, addr := os.Getenv(probeNetwork), os.Getenv(probeAddr)
	timeout, err := time.ParseDuration(os.Getenv(probeTimeout))
	if err != nil {
		timeout = time.Second
	}
	payload, err := hex.DecodeString(os.Getenv(probePayload))
	if err != nil {
		return fail(err)
	}
	lport, _ := strconv.Atoi(os.Getenv(probeLocal))
	noReply := os.Getenv(probeNoReply) == "true"
	d := net.Dialer{Timeout: timeout}
	if lport != 0 {
		if strings.HasPrefix(network, "udp") {
			d.LocalAddr = &net.UDPAddr{Port: lport}
		} else {
			d.LocalAddr = &net.TCPAddr{Port: lport}
		}
	}
	c, err := d.Dial(network, addr)
	if err != nil {
		return fail(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if len(payload) > 0 || strings.HasPrefix(network, "udp") {
		if _, err := c.Write(payload); err != nil {
			return fail(err)
		}
	}
	if noReply {
		fmt.Println()
		return 0
	}
	buf := make([]byte, 4096)
	var got []byte
	for {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil && len(got) == 0 {
			// Nothing came back (a UDP timeout too): a failure, never
			// an empty reply.
			return fail(err)
		}
		if err != nil || strings.HasPrefix(network, "udp") || strings.Contains(string(got), "\n") {
			break
		}
	}
	fmt.Println(hex.EncodeToString(got))
	return 0
}

// SendVXLAN sends, as uid from inside n through an ordinary UDP socket
// (no privilege at all), one VXLAN datagram to vtep (a node address,
// port 8472 for flannel): VNI vni, an inner Ethernet frame to dstMAC
// (the receiving VXLAN device's address) holding inner. The receiving
// node decapsulates it and the inner packet enters its stack on the
// VXLAN device, with whatever source inner claims.
func SendVXLAN(ctx context.Context, exe string, n ns.NetNS, uid uint32, vtep netip.AddrPort, vni uint32, dstMAC net.HardwareAddr, inner Packet) error {
	b, err := inner.Marshal()
	if err != nil {
		return err
	}
	// A locally administered source MAC: never the receiver's own (the
	// VXLAN driver drops such frames).
	src := net.HardwareAddr{0x02, 0x00, 0x5e, 0xe5, 0xca, 0x9e}
	network := "udp4"
	if vtep.Addr().Is6() {
		network = "udp6"
	}
	_, err = RunProbe(ctx, exe, n, uid, Probe{Network: network, Addr: vtep, Payload: VXLAN(vni, EthernetFrame(dstMAC, src, nil, b)), NoReply: true})
	return err
}
