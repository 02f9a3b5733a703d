package sim

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/egress-cni/egress-cni/pkg/audit"
)

// AgentMetricsPort is the agent's metrics port in the simulated nodes.
const AgentMetricsPort = 9964

// Agent is `egress-cni-install run` on a node, as the DaemonSet runs it
// (hostNetwork: started from a thread in the node's namespace, so its
// metrics port is the node's), with its audit lines collected.
type Agent struct {
	n     *Node
	cmd   *exec.Cmd
	mu    sync.Mutex
	lines []audit.Line
	log   strings.Builder
}

// StartAgent starts the agent on n with the node's dirs, its own lock
// file, no resync and no attachment scan, plus extra flags; cl stops it.
// It returns once the agent reads the NFLOG group and serves /metrics.
func (n *Node) StartAgent(cl *Cleanups, installer, plugin string, extra ...string) (*Agent, error) {
	a := &Agent{n: n}
	args := append([]string{"run", "-cni-conf-dir", n.ConfDir, "-cni-bin-dir", n.BinDir, "-binary", plugin,
		"-plugin-config", n.PluginConfig, "-node-config", n.NodeConfig, "-netns", n.NS.Path(),
		"-lock-file", filepath.Join(n.Dir, "run/agent.lock"), "-ready-file", n.ReadyFile, "-resync", "1h", "-netns-dir", "",
		"-state-dir", n.StateDir, "-node-name", n.Name, "-metrics-port", strconv.Itoa(AgentMetricsPort)}, extra...)
	a.cmd = exec.Command(installer, args...)
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := a.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stderr, err := a.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := n.NS.Do(func(ns.NetNS) error { return a.cmd.Start() }); err != nil {
		return nil, err
	}
	cl.Push(func() { _ = a.cmd.Process.Kill(); _ = a.cmd.Wait() })
	bound := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var ln audit.Line
			if json.Unmarshal(sc.Bytes(), &ln) == nil {
				a.mu.Lock()
				a.lines = append(a.lines, ln)
				a.mu.Unlock()
			}
		}
	}()
	go func() {
		sc := bufio.NewScanner(stderr)
		var once sync.Once
		for sc.Scan() {
			a.mu.Lock()
			a.log.WriteString(sc.Text() + "\n")
			a.mu.Unlock()
			if strings.Contains(sc.Text(), "audit: reading node-rule drops") {
				once.Do(func() { close(bound) })
			}
		}
	}()
	select {
	case <-bound:
	case <-time.After(10 * time.Second):
		return nil, fmt.Errorf("the agent on the %s node never bound its NFLOG group:\n%s", n.Name, a.Log())
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := a.Scrape()
		if err == nil {
			return a, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the agent on the %s node serves no /metrics: %w\n%s", n.Name, err, a.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Pid is the agent's process ID.
func (a *Agent) Pid() int { return a.cmd.Process.Pid }

// Log is the agent's stderr so far.
func (a *Agent) Log() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.log.String()
}

// Lines are the audit lines so far.
func (a *Agent) Lines() []audit.Line {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]audit.Line(nil), a.lines...)
}

// WaitLine waits up to d for an audit line, from the from'th on, that
// match accepts.
func (a *Agent) WaitLine(ctx context.Context, from int, d time.Duration, match func(audit.Line) bool) (audit.Line, bool) {
	deadline := time.Now().Add(d)
	for {
		ls := a.Lines()
		for _, ln := range ls[min(from, len(ls)):] {
			if match(ln) {
				return ln, true
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return audit.Line{}, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Scrape GETs /metrics over HTTP at the node's uplink address and
// returns every sample by its name and labels as exposed.
func (a *Agent) Scrape() (map[string]float64, error) {
	// The TCP socket is made on a thread in the node's namespace; the
	// HTTP exchange then runs over it (a Transport would dial from
	// another thread, in the caller's own namespace).
	addr := netip.AddrPortFrom(a.n.Uplink4, AgentMetricsPort).String()
	var conn net.Conn
	if err := a.n.NS.Do(func(ns.NetNS) error {
		var err error
		conn, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	}); err != nil {
		return nil, err
	}
	used := false
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(context.Context, string, string) (net.Conn, error) {
			if used {
				return nil, errors.New("one connection per scrape")
			}
			used = true
			return conn, nil
		}}}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		conn.Close()
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("/metrics: %s", resp.Status)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("sample %q: %w", line, err)
		}
		out[line[:i]] = v
	}
	return out, nil
}
