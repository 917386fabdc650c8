package agent

import (
	"strings"

	"github.com/dualhomed/dualhomed/netcfg"
)

// Trigger is a bit set of what asked for a reconcile. It decides what the
// reconcile reads of IMDS (see imdsReads).
type Trigger uint32

const (
	TriggerStart   Trigger = 1 << iota // the daemon's start, and the one-shot commands
	TriggerPoll                        // IMDS poll timer
	TriggerRetry                       // backoff retry: IMDS unreachable, or the kernel unreadable
	TriggerReload                      // SIGHUP
	TriggerLink                        // a link appeared, went or changed
	TriggerAddr                        // an address was added or removed
	TriggerDrift                       // one of our routes or rules was deleted
	TriggerResync                      // kernel notifications were lost: state may have changed unseen
	TriggerForeign                     // another program deleted one of its routes or rules (or added a route while the kernel refuses an add of ours): blocked adds may fit now
	// TriggerRecheck is the quick re-read for links IMDS did not describe
	// yet (and a new link's read deferred by minLinkReadGap): it costs the
	// MAC listing, and a snapshot only once IMDS lists something new.
	TriggerRecheck
	// TriggerGrace: a link's wait for a DHCP client to add its ENI's
	// primary IPv4 ended (Config.DHCPGrace).
	TriggerGrace
)

// triggerNames are the bits' names, in bit order.
var triggerNames = []string{"start", "poll", "retry", "reload", "link", "address", "drift", "resync", "foreign", "recheck", "grace"}

// String names the bits: "link+drift".
func (t Trigger) String() string {
	var names []string
	for i, n := range triggerNames {
		if t&(1<<i) != 0 {
			names = append(names, n)
		}
	}
	return strings.Join(names, "+")
}

// needsIMDS reports whether t calls for an IMDS read whatever the links.
func (t Trigger) needsIMDS() bool {
	return t&(TriggerStart|TriggerPoll|TriggerRetry|TriggerReload) != 0
}

// kernelTriggers are the reconciles kernel changes always ask for.
var kernelTriggers = map[netcfg.KernelChange]Trigger{netcfg.LinkChanged: TriggerLink,
	netcfg.AddrChanged: TriggerAddr, netcfg.OwnedDeleted: TriggerDrift, netcfg.Resync: TriggerResync}

// triggerFor is the reconcile a kernel change asks for; 0 for none. A
// foreign deletion matters only while some add of ours is blocked, any other
// change (a route added) only while the kernel refuses one of our adds.
func triggerFor(c netcfg.KernelChange, blocked, refused bool) Trigger {
	if c == netcfg.ForeignDeleted && blocked || c == netcfg.OtherChanged && refused {
		return TriggerForeign
	}
	return kernelTriggers[c]
}
