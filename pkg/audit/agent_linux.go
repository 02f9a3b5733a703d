package audit

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	nflog "github.com/florianl/go-nflog/v2"
	"github.com/mdlayher/netlink"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/node"
)

// Defaults of Options.
const (
	DefaultDedup        = 10 * time.Second
	DefaultPodRetention = 5 * time.Minute
	// queueLen bounds the events waiting for the worker; beyond it
	// events are counted as lost, never buffered without bound.
	queueLen = 4096
	// dedupMax bounds the remembered attempts.
	dedupMax = 16384
	// DefaultReadBuffer is the NFLOG socket's receive buffer asked for.
	DefaultReadBuffer = 4 << 20
)

// Options configure an Auditor.
type Options struct {
	// NetNS is the node rules' network namespace ("" the current one).
	NetNS string
	// Group is the NFLOG group (node.Config.AuditGroup).
	Group uint16
	// Node is the node's name, in every line.
	Node string
	// StateDir holds the plugin's identity records (node.Identity).
	StateDir string
	// Out receives one JSON line per connection attempt; nil: none.
	Out io.Writer
	// Dedup is the window in which repeats of an attempt (same pod,
	// source, destination, protocol, port and reason) are not logged
	// again; 0 logs every event.
	Dedup time.Duration
	// PodRetention is how long a gone pod's series are kept; 0 turns
	// the per-pod series off.
	PodRetention time.Duration
	// ReadBuffer is the NFLOG socket's receive buffer (bytes; 0:
	// DefaultReadBuffer). It is set with SO_RCVBUFFORCE (the agent has
	// CAP_NET_ADMIN), past net.core.rmem_max, else with SO_RCVBUF,
	// which the kernel caps at rmem_max; the size obtained is logged.
	ReadBuffer int
	// Registerer gets the per-pod counter and the loss counter; nil:
	// none.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// Line is one audit log line. Field names are a public contract
// (docs/observability.md).
type Line struct {
	Time        time.Time `json:"time"`
	Node        string    `json:"node"`
	Namespace   string    `json:"namespace"`
	Pod         string    `json:"pod"`
	ContainerID string    `json:"containerID"`
	Source      string    `json:"source"`
	Destination string    `json:"destination"`
	Protocol    string    `json:"protocol"`
	DPort       uint16    `json:"destinationPort"`
	Family      string    `json:"family"`
	Reason      string    `json:"reason"`
	// Interface is the interface the packet came in on: its bridge
	// port when the kernel reports one (the pod's host-side veth, or
	// the unregistered port that sent it), else the input interface
	// (a routed pod's veth, or the bridge).
	Interface string `json:"interface"`
}

// Auditor reads the drop events and writes the audit.
type Auditor struct {
	o   Options
	log *slog.Logger

	events   chan nflog.Attribute
	received atomic.Uint64
	lostN    atomic.Uint64
	logged   atomic.Uint64
	bound    atomic.Bool
	rcvbuf   atomic.Int64

	podDrops *prometheus.CounterVec
	lost     prometheus.CounterFunc

	mu     sync.Mutex
	series map[[3]string]*series // namespace, pod, reason
	res    *resolver
	dd     *dedup
}

type series struct {
	containerID string
	goneSince   time.Time
}

// New checks the options.
func New(o Options) (*Auditor, error) {
	if o.Dedup < 0 || o.PodRetention < 0 {
		return nil, fmt.Errorf("audit: negative dedup window %v or pod retention %v", o.Dedup, o.PodRetention)
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	a := &Auditor{o: o, log: log, events: make(chan nflog.Attribute, queueLen), series: map[[3]string]*series{},
		res: newResolver(o.NetNS, o.StateDir), dd: newDedup(o.Dedup, dedupMax)}
	a.podDrops = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "egress_cni_pod_dropped_packets_total",
		Help: "Packets of a pod dropped by the node rules, by reason, counted from the NFLOG events: sampled, since the kernel rate-limits them per reason (the node totals are exact).",
	}, []string{"namespace", "pod", "reason"})
	a.lost = prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "egress_cni_audit_events_lost_total",
		Help: "NFLOG drop events the agent could not read or process (socket overflow or a full queue).",
	}, func() float64 { return float64(a.lostN.Load()) })
	if o.Registerer != nil {
		if o.PodRetention > 0 {
			if err := o.Registerer.Register(a.podDrops); err != nil {
				return nil, err
			}
		}
		if err := o.Registerer.Register(a.lost); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// Stats are the auditor's event counts.
type Stats struct{ Received, Lost, Logged, Suppressed uint64 }

// Stats returns the counts so far.
func (a *Auditor) Stats() Stats {
	a.mu.Lock()
	sup := a.dd.suppressed
	a.mu.Unlock()
	return Stats{Received: a.received.Load(), Lost: a.lostN.Load(), Logged: a.logged.Load(), Suppressed: sup}
}

// ReadBuffer is the NFLOG socket's receive buffer as the kernel reports
// it (SO_RCVBUF: twice the size set, for its bookkeeping); 0 before Run
// opens the socket.
func (a *Auditor) ReadBuffer() int { return int(a.rcvbuf.Load()) }

// setReadBuffer sets the socket's receive buffer with SO_RCVBUFFORCE,
// else SO_RCVBUF, and returns the size the kernel reports and whether
// the forced one took.
func setReadBuffer(c *netlink.Conn, size int) (int, bool) {
	rc, err := c.SyscallConn()
	if err != nil {
		_ = c.SetReadBuffer(size)
		return 0, false
	}
	var forced bool
	got := 0
	_ = rc.Control(func(fd uintptr) {
		forced = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size) == nil
		if !forced {
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, size)
		}
		got, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
	})
	return got, forced
}

// Bound says whether Run holds the NFLOG group now.
func (a *Auditor) Bound() bool { return a.bound.Load() }

// Run binds the NFLOG group and processes events until ctx ends.
func (a *Auditor) Run(ctx context.Context) error {
	cfg := &nflog.Config{Group: a.o.Group, Copymode: nflog.CopyPacket, Bufsize: 128,
		// Flush to user space every 32 packets or 100 ms, whichever
		// first: at most 100 ms late, and batched under a flood.
		QThresh: 32, Timeout: 10}
	if a.o.NetNS != "" {
		f, err := os.Open(a.o.NetNS)
		if err != nil {
			return fmt.Errorf("audit: could not open network namespace %s: %w", a.o.NetNS, err)
		}
		defer f.Close()
		cfg.NetNS = int(f.Fd())
	}
	nf, err := nflog.Open(cfg)
	if err != nil {
		return fmt.Errorf("audit: could not open NFLOG: %w", err)
	}
	defer nf.Close()
	// A large receive buffer rides out bursts; what overflows it is
	// counted (ENOBUFS), not silently lost.
	size := a.o.ReadBuffer
	if size <= 0 {
		size = DefaultReadBuffer
	}
	got, forced := setReadBuffer(nf.Con, size)
	a.rcvbuf.Store(int64(got))
	if !forced && got < size {
		a.log.Warn("audit: the NFLOG receive buffer is smaller than asked (no CAP_NET_ADMIN for SO_RCVBUFFORCE; net.core.rmem_max caps it)",
			"asked", size, "bytes", got)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	hook := func(m nflog.Attribute) int {
		a.received.Add(1)
		select {
		case a.events <- m:
		default:
			a.lostN.Add(1)
		}
		return 0
	}
	errfn := func(err error) int {
		if ctx.Err() != nil {
			return 1
		}
		var op *net.OpError
		if errors.As(err, &op) && op.Timeout() {
			return 0
		}
		a.lostN.Add(1)
		a.log.Warn("audit: NFLOG receive error (events lost)", "error", err)
		return 0
	}
	if err := nf.RegisterWithErrorFunc(ctx, hook, errfn); err != nil {
		return fmt.Errorf("audit: could not bind NFLOG group %d: %w", a.o.Group, err)
	}
	a.bound.Store(true)
	defer a.bound.Store(false)
	a.log.Info("audit: reading node-rule drops", "group", a.o.Group, "stateDir", a.o.StateDir, "receiveBuffer", got)
	sweepEvery := a.o.PodRetention / 4
	sweepEvery = max(100*time.Millisecond, min(sweepEvery, 30*time.Second))
	sweep := time.NewTicker(sweepEvery)
	defer sweep.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case m := <-a.events:
			a.handle(m, time.Now())
		case now := <-sweep.C:
			a.sweep(now)
		}
	}
}

func (a *Auditor) handle(m nflog.Attribute, now time.Time) {
	if m.Prefix == nil {
		return
	}
	reason := node.ReasonOfPrefix(*m.Prefix)
	if reason == "" {
		return // not ours (another user of the group)
	}
	var etherType uint16
	if m.HwProtocol != nil {
		etherType = *m.HwProtocol
	}
	var payload []byte
	if m.Payload != nil {
		payload = *m.Payload
	}
	pkt, err := Decode(etherType, payload)
	if err != nil {
		a.log.Debug("audit: undecodable packet", "reason", reason, "error", err)
	}
	if m.Timestamp != nil && !m.Timestamp.IsZero() {
		now = *m.Timestamp
	}
	// The pod's own port: a bridged pod's frame in the bridge table
	// (PhysInDev the port, InDev the bridge), or (br_netfilter) the
	// physical input of the inet hooks; else the input interface.
	var physIn, in string
	if m.PhysInDev != nil && *m.PhysInDev != 0 {
		physIn = a.res.ifname(*m.PhysInDev)
	}
	if m.InDev != nil && *m.InDev != 0 {
		in = a.res.ifname(*m.InDev)
	}
	id, iface := a.res.pod(physIn, in, pkt.Src, reason, time.Now())
	line := Line{Time: now.UTC(), Node: a.o.Node, Namespace: id.Namespace, Pod: id.Name, ContainerID: id.ContainerID,
		Protocol: pkt.Proto, DPort: pkt.DPort, Family: pkt.Family, Reason: string(reason), Interface: iface}
	if pkt.Src.IsValid() {
		line.Source, line.Destination = pkt.Src.String(), pkt.Dst.String()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.o.PodRetention > 0 && id.Name != "" {
		a.podDrops.WithLabelValues(id.Namespace, id.Name, string(reason)).Inc()
		k := [3]string{id.Namespace, id.Name, string(reason)}
		a.series[k] = &series{containerID: id.ContainerID}
	}
	key := fmt.Sprintf("%s|%s|%s|%s|%s|%d|%s", id.ContainerID, iface, line.Source, line.Destination, line.Protocol, line.DPort, reason)
	if !a.dd.first(key, now) || a.o.Out == nil {
		return
	}
	b, _ := json.Marshal(line)
	if _, err := a.o.Out.Write(append(b, '\n')); err != nil {
		a.log.Warn("audit: could not write the audit line", "error", err)
		return
	}
	a.logged.Add(1)
}

// sweep deletes the series of pods gone for PodRetention: a pod is gone
// when its container is no longer registered with the node rules.
func (a *Auditor) sweep(now time.Time) {
	if a.o.PodRetention <= 0 {
		return
	}
	a.mu.Lock()
	n := len(a.series)
	a.mu.Unlock()
	if n == 0 {
		return
	}
	live, err := a.res.liveContainers()
	if err != nil {
		a.log.Debug("audit: could not list the registered pods", "error", err)
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for k, s := range a.series {
		if live[s.containerID] {
			s.goneSince = time.Time{}
			continue
		}
		if s.goneSince.IsZero() {
			s.goneSince = now
		}
		if now.Sub(s.goneSince) >= a.o.PodRetention {
			a.podDrops.DeleteLabelValues(k[0], k[1], k[2])
			delete(a.series, k)
		}
	}
}

// resolver names interfaces and pods in the node rules' namespace. Its
// pods and identity records are re-read before an event when they are
// older than refreshEvery or the identity directory changed (a record
// written or removed at ADD, DEL or GC), so that a deleted pod is not
// named for long after its DEL.
type resolver struct {
	netns, stateDir string
	ifnames         map[uint32]string
	pods            []node.Pod
	ids             map[string]node.Identity
	refreshed       time.Time
	dirMod          time.Time
	// list reads the registered pods (node.ListPods in netns).
	list func() ([]node.Pod, error)
}

const refreshEvery = 200 * time.Millisecond

func newResolver(ns, stateDir string) *resolver {
	r := &resolver{netns: ns, stateDir: stateDir, ifnames: map[uint32]string{}}
	r.list = func() ([]node.Pod, error) {
		var ps []node.Pod
		err := netns.Do(r.netns, func() error {
			var err error
			ps, err = node.ListPods()
			return err
		})
		return ps, err
	}
	return r
}

func (r *resolver) ifname(idx uint32) string {
	if n, ok := r.ifnames[idx]; ok {
		return n
	}
	var name string
	_ = netns.Do(r.netns, func() error {
		ifc, err := net.InterfaceByIndex(int(idx))
		if err == nil {
			name = ifc.Name
		}
		return err
	})
	if name == "" {
		return fmt.Sprintf("if%d", idx)
	}
	if len(r.ifnames) > 4096 {
		clear(r.ifnames)
	}
	r.ifnames[idx] = name
	return name
}

// identityDirMod is the identity directory's modification time (zero if
// there is none): it changes when a record is written or removed.
func (r *resolver) identityDirMod() time.Time {
	if r.stateDir == "" {
		return time.Time{}
	}
	fi, err := os.Stat(filepath.Join(r.stateDir, "pods"))
	if err != nil {
		return time.Time{}
	}
	return fi.ModTime()
}

// refresh re-reads the pods and records if they are older than
// refreshEvery or the identity directory changed since.
func (r *resolver) refresh(now time.Time) {
	mod := r.identityDirMod()
	if !r.refreshed.IsZero() && now.Sub(r.refreshed) < refreshEvery && now.Sub(r.refreshed) >= 0 && mod.Equal(r.dirMod) {
		return
	}
	r.refreshed, r.dirMod = now, mod
	ps, err := r.list()
	if err != nil {
		// Stale registrations would name pods that may be gone: name
		// nobody until a read succeeds.
		ps = nil
	}
	r.pods = ps
	if r.stateDir != "" {
		ids, _ := node.ReadIdentities(r.stateDir)
		r.ids = ids
	}
}

// addressAttributable says whether a drop of this reason may be
// attributed to a pod by its source address on the pod's L3 interface
// (a bridge) when the packet's port is unknown: only when the address
// has passed the bridge's source checks, i.e. never for the reasons
// that say the address or the interface is not a registered pod's.
func addressAttributable(reason node.Reason) bool {
	switch reason {
	case node.ReasonNotAGateway, node.ReasonSourceRoute:
		return true
	}
	return false
}

// pod finds the pod a packet came from and the interface to report.
// With a physical input port (bridge-family events, br_netfilter), only
// the pod registered on that port; else the pod registered on the input
// interface, or, for an address-attributable reason, the pod whose L3
// interface (bridge) it is and which owns src. Nobody otherwise.
func (r *resolver) pod(physIn, in string, src netip.Addr, reason node.Reason, now time.Time) (node.Identity, string) {
	r.refresh(now)
	port := in
	if physIn != "" {
		port = physIn
	}
	if port == "" {
		return node.Identity{}, ""
	}
	found := func(p node.Pod) node.Identity {
		if id, ok := r.ids[p.ContainerID]; ok {
			return id
		}
		return node.Identity{ContainerID: p.ContainerID}
	}
	for _, p := range r.pods {
		if p.Port == port {
			return found(p), port
		}
	}
	if physIn == "" && src.IsValid() && addressAttributable(reason) {
		for _, p := range r.pods {
			if p.L3 == in && p.L3 != p.Port && slices.Contains(p.IPs, src) {
				return found(p), in
			}
		}
	}
	return node.Identity{}, port
}

func (r *resolver) liveContainers() (map[string]bool, error) {
	ps, err := r.list()
	if err != nil {
		return nil, err
	}
	live := map[string]bool{}
	for _, p := range ps {
		live[p.ContainerID] = true
	}
	return live, nil
}
