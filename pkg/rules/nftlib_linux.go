package rules

import (
	"errors"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The nftables plumbing both layers use. The node layer (pkg/node) owns
// other tables than the pod layer, but talks to the kernel the same way:
// a socket sized for its batch, set elements in chunks that fit one
// netlink attribute, rule comments that `nft -f` can load back, and a
// readback that compares expressions, not only comments.

// NFTConn opens a lasting nftables connection in the calling thread's
// network namespace whose socket buffers hold a batch of about sockBuf
// bytes (see nftConn).
func NFTConn(sockBuf int) (*nftables.Conn, error) { return nftConn(sockBuf) }

// NFTElementBytes is a generous estimate of one set element in a batch,
// for sizing the socket: a 16-byte interface name, a 16-byte address,
// flags, a key and an end, and a comment of up to 64 bytes.
const NFTElementBytes = 160

// NFTQueueElements queues els for s in chunks that each fit one netlink
// attribute (its length is 16 bits). It only queues; Flush sends.
func NFTQueueElements(c *nftables.Conn, s *nftables.Set, els []nftables.SetElement) error {
	for chunk := range slices.Chunk(els, nftElemChunk) {
		if err := c.SetAddElements(s, chunk); err != nil {
			return err
		}
	}
	return nil
}

// NFTQueueDeleteElements is NFTQueueElements for deletions.
func NFTQueueDeleteElements(c *nftables.Conn, s *nftables.Set, els []nftables.SetElement) error {
	for chunk := range slices.Chunk(els, nftElemChunk) {
		if err := c.SetDeleteElements(s, chunk); err != nil {
			return err
		}
	}
	return nil
}

// NFTRuleComment is the userdata of a rule whose text is text, as nft
// writes it. Double quotes are dropped (nft cannot escape them, and a
// comment holding one makes `nft list` output that `nft -f` rejects) and
// the text is cut to nft's 128-byte limit.
func NFTRuleComment(text string) []byte {
	c := nftCommentText(text)
	if len(c) > nftMaxComment-1 {
		c = c[:nftMaxComment-1]
	}
	return nftRuleComment(c)
}

// NFTRuleCommentOf decodes a rule's comment.
func NFTRuleCommentOf(ud []byte) string { return nftRuleCommentOf(ud) }

// NFTExprsEqual says whether two expression lists encode to the same
// netlink bytes (set IDs ignored: they exist only within one batch).
func NFTExprsEqual(fam nftables.TableFamily, a, b []expr.Any) bool { return nftExprsEqual(fam, a, b) }

// IsNFTNotFound says the kernel answered ENOENT: the table, chain, set
// or element named does not exist. google/nftables v0.3.0 wraps the
// errno on some paths (Flush) and formats it into the message on others
// (the receive of a Get call), so the errno's text is matched too; this
// is the one place that does it.
func IsNFTNotFound(err error) bool {
	return err != nil && (errors.Is(err, unix.ENOENT) || strings.HasSuffix(err.Error(), unix.ENOENT.Error()))
}
