//go:build linux

// Command nftfloor is the floor that `make bench` compares egress-init
// with: the least a program can do to install pod capture with
// google/nftables. One netlink batch creates table ip nftfloor with a nat
// output chain holding a uid-1337 return, a lookup in an interval set of
// N excluded /32s and a redirect to 15001. No parsing, no model, no
// validation, no read-back: only the batch.
//
//	nftfloor -netns /run/netns/NAME -n 1000
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

func main() {
	nsPath := flag.String("netns", "", "network namespace to program (default: the current one)")
	n := flag.Int("n", 0, "number of excluded CIDRs (every other address of 10.0.0.0/8, as /32s)")
	flag.Parse()
	if err := run(*nsPath, *n); err != nil {
		fmt.Fprintf(os.Stderr, "nftfloor: %v\n", err)
		os.Exit(1)
	}
}

func run(nsPath string, n int) error {
	opts := []nftables.ConnOption{nftables.AsLasting()}
	if nsPath != "" {
		fd, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		opts = append(opts, nftables.WithNetNSFd(fd))
	}
	// A 10,000-interval batch exceeds the default 208 KiB socket buffer,
	// so the floor raises it as egress-init (and nft) must.
	if size := 64<<10 + 64*2*n; size > 212992/2 {
		opts = append(opts, nftables.WithSockOptions(func(c *netlink.Conn) error {
			raw, err := c.SyscallConn()
			if err != nil {
				return err
			}
			return raw.Control(func(fd uintptr) {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, size)
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size)
			})
		}))
	}
	// Timed from here to the end of the batch, like egress-init's own
	// "applied in" (after joining the namespace, to the kernel's reply).
	start := time.Now()
	defer func() { fmt.Fprintf(os.Stderr, "nftfloor: applied in %s\n", time.Since(start)) }()
	c, err := nftables.New(opts...)
	if err != nil {
		return err
	}
	defer c.CloseLasting()

	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: "nftfloor"})
	ch := c.AddChain(&nftables.Chain{
		Name: "output", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest,
	})
	set := &nftables.Set{Table: t, Name: "excluded", KeyType: nftables.TypeIPAddr, Interval: true}
	if err := c.AddSet(set, nil); err != nil {
		return err
	}
	els := []nftables.SetElement{{Key: []byte{0, 0, 0, 0}, IntervalEnd: true}}
	for i := range n {
		v := uint32(10)<<24 | uint32(2*i)
		els = append(els,
			nftables.SetElement{Key: []byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}},
			nftables.SetElement{Key: []byte{byte((v + 1) >> 24), byte((v + 1) >> 16), byte((v + 1) >> 8), byte(v + 1)}, IntervalEnd: true})
	}
	// A netlink attribute is at most 64 KiB: send the elements in chunks.
	for len(els) > 0 {
		k := min(len(els), 1024)
		if err := c.SetAddElements(set, els[:k]); err != nil {
			return err
		}
		els = els[k:]
	}
	ret := &expr.Verdict{Kind: expr.VerdictReturn}
	// meta skuid 1337 return
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x39, 0x05, 0, 0}},
		ret,
	}})
	// ip daddr @excluded return
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
		ret,
	}})
	// meta l4proto tcp redirect to :15001
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Immediate{Register: 1, Data: []byte{0x3a, 0x99}},
		&expr.Redir{RegisterProtoMin: 1},
	}})
	return c.Flush()
}
