// Command egress-node applies, shows, checks and removes the node-level
// egress rules, and edits gateway membership by hand.
//
//	egress-node apply  -config /etc/egress-cni/node.json [-netns PATH]
//	egress-node show   -config FILE          the rules as nft syntax, gateways and drop counters
//	egress-node check  -config FILE          exit 1 and name the drift
//	egress-node remove                       delete our tables, nothing else
//	egress-node gateway add|del -iface VETH -ip ADDR [-id CONTAINER]
//	egress-node gateway list
//	egress-node explain -config FILE [-live] SOURCE DEST   follow a packet through the node rules
package main

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/egress-cni/egress-cni/pkg/netns"
	"github.com/egress-cni/egress-cni/pkg/node"
)

func usage() {
	fmt.Fprint(os.Stderr, `usage:
  egress-node apply  -config FILE [-netns PATH]
  egress-node show   [-config FILE] [-netns PATH]
  egress-node check  -config FILE [-netns PATH]
  egress-node remove [-netns PATH]
  egress-node gateway add|del -iface NAME -ip ADDR [-id CONTAINER_ID] [-netns PATH]
  egress-node gateway list [-netns PATH]
  egress-node explain -config FILE [-netns PATH] [-live] [-state-dir DIR] [-established]
                      [-src-addr ADDR] [-iif NAME] SOURCE DEST
      SOURCE: a pod IP or NAMESPACE/NAME (from the plugin's identity records);
      DEST: IP:PORT/tcp, IP:PORT/udp, [IPv6]:PORT/PROTO or IP/icmp.
      Prints the verdict and the rule that decides it; -live first checks
      that the kernel holds exactly the config's rules.
`)
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	cmd, args := os.Args[1], os.Args[2:]
	sub := ""
	if cmd == "gateway" {
		if len(args) == 0 {
			usage()
			os.Exit(2)
		}
		sub, args = args[0], args[1:]
	}
	fs := flag.NewFlagSet("egress-node "+cmd, flag.ContinueOnError)
	cfgPath := fs.String("config", "", "node config file (JSON)")
	nsPath := fs.String("netns", "", "network namespace to program (default: the current one)")
	iface := fs.String("iface", "", "gateway's host-side interface")
	ip := fs.String("ip", "", "gateway's IP address")
	id := fs.String("id", "manual", "container ID recorded with the gateway entry")
	var eo explainOpts
	fs.BoolVar(&eo.live, "live", false, "explain: compare the kernel's node rules with the config first (Check)")
	fs.StringVar(&eo.stateDir, "state-dir", node.DefaultStateDir, "explain: the plugin's stateDir (pod identity records)")
	fs.BoolVar(&eo.established, "established", false, "explain: a packet of an established connection (default: a new one)")
	fs.StringVar(&eo.srcAddr, "src-addr", "", "explain: the pod sends this (forged) source address instead of its own")
	fs.StringVar(&eo.iif, "iif", "", "explain: the input interface of a SOURCE address that is no pod's")
	if err := fs.Parse(args); err != nil {
		os.Exit(2)
	}
	if cmd == "explain" {
		if fs.NArg() != 2 {
			usage()
			os.Exit(2)
		}
		eo.source, eo.dest = fs.Arg(0), fs.Arg(1)
		err := netns.Do(*nsPath, func() error {
			cfg, err := load(*cfgPath)
			if err != nil {
				return err
			}
			return explain(os.Stdout, cfg, eo)
		})
		if err != nil {
			fmt.Fprintf(os.Stderr, "egress-node explain: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if err := netns.Do(*nsPath, func() error { return run(cmd, sub, *cfgPath, *iface, *ip, *id) }); err != nil {
		fmt.Fprintf(os.Stderr, "egress-node %s: %v\n", cmd, err)
		os.Exit(1)
	}
}

func load(path string) (*node.Config, error) {
	if path == "" {
		return nil, fmt.Errorf("-config is required")
	}
	return node.Load(path)
}

func run(cmd, sub, cfgPath, iface, ip, id string) error {
	switch cmd {
	case "apply":
		cfg, err := load(cfgPath)
		if err != nil {
			return err
		}
		start := time.Now()
		if err := node.Apply(cfg); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "egress-node: %s rules applied in %s\n", cfg.Role, time.Since(start).Round(time.Microsecond))
		return nil
	case "show":
		if cfgPath != "" {
			cfg, err := load(cfgPath)
			if err != nil {
				return err
			}
			fmt.Print(node.Render(cfg))
		}
		gws, err := node.ListGateways()
		if err != nil {
			return err
		}
		fmt.Printf("# gateways: %d\n", len(gws))
		for _, g := range gws {
			fmt.Printf("#   %s\n", g)
		}
		k, err := node.ReadCounters()
		if err != nil {
			return err
		}
		fmt.Printf("# dropped at the exit: %d packets; forged sources: %d packets\n", k.Dropped, k.Forged)
		for _, r := range node.Reasons() {
			var parts []string
			for _, fam := range []string{node.FamilyIPv4, node.FamilyIPv6, node.FamilyOther} {
				if n, ok := k.ByReason[r][fam]; ok {
					parts = append(parts, fmt.Sprintf("%s %d", fam, n))
				}
			}
			fmt.Printf("#   %-15s %s\n", r, strings.Join(parts, ", "))
		}
		return nil
	case "check":
		cfg, err := load(cfgPath)
		if err != nil {
			return err
		}
		if err := node.Check(cfg); err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, "egress-node: node rules match the config")
		return nil
	case "remove":
		return node.Remove()
	case "gateway":
		switch sub {
		case "list":
			gws, err := node.ListGateways()
			for _, g := range gws {
				fmt.Println(g)
			}
			return err
		case "add", "del":
			addr, err := netip.ParseAddr(ip)
			if err != nil || iface == "" {
				return fmt.Errorf("need -iface NAME and -ip ADDR (got %q, %q)", iface, ip)
			}
			g := node.Gateway{Iface: iface, IP: addr, ContainerID: id}
			if sub == "add" {
				return node.AddGateways(g)
			}
			_, err = node.RemoveGateways(func(x node.Gateway) bool { return x.Iface == g.Iface && x.IP == g.IP })
			return err
		}
	}
	usage()
	return fmt.Errorf("unknown command %q", cmd+" "+sub)
}
