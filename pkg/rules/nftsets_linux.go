package rules

import "github.com/google/nftables"

// The interval-set encoding is shared with the node layer (pkg/node),
// which owns other nftables tables but must encode and read back its
// address sets exactly as the pod layer does.

// NFTIntervalElements encodes s as interval-set elements, as Apply sends
// them: merged, disjoint ranges, with nft's conventions for the ends.
func NFTIntervalElements(s *Set) []nftables.SetElement { return nftSetElements(s) }

// NFTSetElementTexts lists s's elements as nft prints them (a prefix where
// a merged range is one, else from-to).
func NFTSetElementTexts(s *Set) []string { return nftSetElementTexts(s) }

// NFTElementTexts decodes interval-set elements read back from the kernel,
// in any order, into the texts NFTSetElementTexts gives for the same set.
func NFTElementTexts(t SetType, els []nftables.SetElement) []string { return nftElementTexts(t, els) }
