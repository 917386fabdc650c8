package netcfg

import (
	"net/netip"

	"github.com/dualhomed/dualhomed/imds"
)

// Observed is what Desired needs to know of the kernel: which links exist (ENIs
// are matched to links by MAC) and which addresses are already on them, whoever
// put them there. An address already present is never added again.
type Observed struct {
	Links []Link
	Addrs map[int][]netip.Prefix // every address on each link, by link index
}

// ENIState is the lifecycle state of one ENI as reported by plan and status.
type ENIState string

const (
	ENIConfigured  ENIState = "configured"
	ENIWaitingLink ENIState = "waiting for link"
	ENIWaitingIMDS ENIState = "waiting for IMDS"
	ENIExcluded    ENIState = "excluded"
	ENIDrift       ENIState = "drift" // set by callers that diffed against the kernel
	ENIPrimaryRole ENIState = "primary"
)

// ENIStatus describes one ENI of the snapshot and what dualhomed does with it.
type ENIStatus struct {
	MAC         string
	InterfaceID string
	VPCID       string
	MultiVPC    bool // VPC differs from the primary ENI's
	Primary     bool
	Card        int
	Device      int
	Link        string // "" while waiting for the link
	LinkIndex   int
	Addresses   []netip.Addr
	Table       int // 0 when the ENI has no table
	Priority    int // 0 when the ENI has no rules
	State       ENIState
	Warnings    []string
}

// Warning is something the operator should know: a skipped route, a conflict
// with another manager. Hint says how to fix it.
type Warning struct {
	ENI     string // interface id or MAC; "" for instance-wide warnings
	Message string
	Hint    string
}

// Result is the output of Desired.
type Result struct {
	State    State
	ENIs     []ENIStatus
	Warnings []Warning
}

// Desired computes the routing state dualhomed wants for snap. It is a pure
// function: same inputs, same Result, sorted.
func Desired(snap imds.Snapshot, obs Observed, cfg Config) Result {
	panic("TODO(netcfg-desired)")
}
