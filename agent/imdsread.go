package agent

import (
	"context"
	"maps"
	"slices"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/netcfg"
)

// Snapshotter reads the instance metadata service (an *imds.Client): a
// read built on the last good snapshot that fetches only what may have
// changed (see imds.Client.Refresh; from no snapshot it is a full one), or
// only the listing of attached MACs, one request.
type Snapshotter interface {
	Refresh(ctx context.Context, prev imds.Snapshot, u imds.Update) (imds.Snapshot, error)
	ListMACs(ctx context.Context) (macs []string, requests int, err error)
}

// FullReadEvery is how many polls go between two full snapshots (and two
// full kernel dumps): about every 5 minutes at the default 15 s interval.
// The polls in between read only the keys that change while an ENI stays
// attached; the full read is defence in depth, for a change no link event
// told us of.
const FullReadEvery = 20

// IMDS read pacing of the daemon.
const (
	// minLinkReadGap spaces the IMDS reads caused by new links: on a host
	// where containers come and go, each new veth would otherwise cost a
	// read (a MAC listing). A hot-attached ENI waits at most this long.
	minLinkReadGap = time.Second
	// maxLinkRetries bounds the quick IMDS re-reads for a link IMDS does not
	// know yet (0.5 s, 1 s, 2 s, 4 s, 8 s); after that the poll timer takes over.
	maxLinkRetries = 5
	firstLinkRetry = 500 * time.Millisecond
	// maxIMDSBackoff caps the retry delay while IMDS is unreachable (the poll
	// interval caps it too).
	maxIMDSBackoff = 30 * time.Second
)

// imdsReads decides what each reconcile reads of IMDS, and keeps what the
// reads taught: the last good snapshot, the links IMDS was asked about, the
// polls, the backoff while IMDS fails and the quick re-reads for links IMDS
// does not describe yet. What a trigger reads ("new links" appeared, or
// changed MAC, since the last read):
//   - start, reload, retry, and any trigger before the first good read: a
//     full snapshot;
//   - a poll: what changes while an ENI stays attached (imds.Update's
//     Dynamic), and the new links' MACs in full; every FullReadEvery-th poll
//     a full snapshot;
//   - a kernel event: nothing while IMDS backs off, nor within
//     minLinkReadGap of the last read (the read is deferred to the gap's
//     end); else the new links. A MAC the last good snapshot lists is read
//     in full: its ENI is new, not ready yet, or attached again, maybe with
//     another device number. Unknown MACs (every container veth on a busy
//     host) first cost only the MAC listing, one request; then only the
//     MACs it names that the snapshot lacks are read (a hot attach: about
//     14 requests). IMDS shares the link-local budget of 1024 packets/s per
//     ENI with DNS and NTP, so veths must not spend it, and a hot attach
//     must not wait for the other ENIs;
//   - a recheck (the quick re-reads): as an event, for the new links and
//     the links IMDS did not describe at the last read.
//
// An IMDS error is never an answer: the reconcile then repairs from the
// last good snapshot and removes nothing.
type imdsReads struct {
	source       Snapshotter
	pollInterval time.Duration // caps the backoff

	lastGood    *imds.Snapshot
	seen        map[int]string // link index -> MAC, as observed at the last read
	polls       int
	failures    int         // reads failed in a row
	lastError   string      // of the last read while reads fail, else ""
	retryAt     time.Time   // while IMDS fails, events read nothing until then
	lastRead    time.Time   // successful or not
	deferred    bool        // a new link's read waits for minLinkReadGap
	linkRetries map[int]int // quick re-reads so far per link IMDS does not describe
}

// read reads what t calls for (see imdsReads) within timeout (0: ctx's
// deadline only), records the outcome in rep and returns the snapshot to
// plan from: the fresh one, or else the last good one; false when IMDS was
// never read successfully.
func (p *imdsReads) read(ctx context.Context, t Trigger, links []netcfg.Link, timeout time.Duration, rep *Report) (imds.Snapshot, bool) {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	now := time.Now()
	var newLinks []netcfg.Link
	for _, l := range links {
		if l.MAC != "" && p.seen[l.Index] != l.MAC {
			newLinks = append(newLinks, l)
		}
	}
	rep.NewLinks = len(newLinks) > 0
	rd := imdsRead{imdsReads: p, ctx: ctx, links: links, rep: rep}
	switch {
	case t&TriggerPoll != 0 && t&(TriggerStart|TriggerRetry|TriggerReload) == 0:
		p.polls++
		if p.lastGood != nil && p.polls%FullReadEvery != 0 {
			rd.fetch(*p.lastGood, imds.Update{Dynamic: true, Full: p.listed(newLinks)})
		} else {
			rd.fetch(imds.Snapshot{}, imds.Update{})
		}
	case t.needsIMDS():
		rd.fetch(imds.Snapshot{}, imds.Update{})
	case now.Before(p.retryAt): // backing off: repair from the last good snapshot
	case t&TriggerRecheck != 0: // its own schedule spaces it
		rd.ask(append(newLinks, p.pending(links)...))
	case now.Sub(p.lastRead) < minLinkReadGap:
		p.deferred = p.deferred || len(newLinks) > 0
	default:
		rd.ask(newLinks)
	}
	p.record(now, rep)
	rep.PendingLinks = p.pending(links)
	if p.lastGood == nil {
		return imds.Snapshot{}, false
	}
	p.countRetries(links, rep)
	rep.HaveSnapshot = true
	return *p.lastGood, true
}

// record keeps the outcome of a read: when it happened, and the backoff.
func (p *imdsReads) record(now time.Time, rep *Report) {
	if rep.Fresh || rep.Listed || rep.IMDSError != "" {
		p.lastRead, p.deferred = now, false
	}
	switch {
	case rep.IMDSError != "":
		p.failures++
		p.lastError = rep.IMDSError
		p.retryAt = now.Add(min(time.Second<<min(p.failures-1, 10), maxIMDSBackoff, p.pollInterval))
	case rep.Fresh:
		p.failures, p.retryAt, p.lastError = 0, time.Time{}, ""
	}
}

// countRetries counts the quick re-reads of each link IMDS does not
// describe yet, and forgets the links it describes now. The count of an
// Unconfirmed ENI's link stays once its re-reads are done: its device 0 is
// then trusted until the ENI changes.
func (p *imdsReads) countRetries(links []netcfg.Link, rep *Report) {
	keep := map[int]bool{}
	for _, l := range rep.PendingLinks {
		keep[l.Index] = true
		if rep.Fresh || rep.Listed {
			p.linkRetries[l.Index]++
		}
	}
	for _, l := range links {
		if e, ok := p.lastGood.ENI(l.MAC); ok && e.Unconfirmed() {
			keep[l.Index] = true
		}
	}
	maps.DeleteFunc(p.linkRetries, func(idx, _ int) bool { return !keep[idx] })
}

// next is how long until IMDS should be read again for the backoff, a
// pending link's quick re-read or a deferred read; 0 for never.
func (p *imdsReads) next(now time.Time) time.Duration {
	var next time.Duration
	if !p.retryAt.IsZero() {
		next = max(p.retryAt.Sub(now), 0)
	}
	sooner := func(delay time.Duration) {
		if next == 0 || delay < next {
			next = delay
		}
	}
	if len(p.linkRetries) > 0 {
		if fewest := slices.Min(slices.Collect(maps.Values(p.linkRetries))); fewest >= 1 && fewest < maxLinkRetries {
			sooner(firstLinkRetry << (fewest - 1))
		}
	}
	if p.deferred {
		sooner(max(p.lastRead.Add(minLinkReadGap).Sub(now), time.Millisecond))
	}
	return next
}

// listed returns the MACs of links that the last good snapshot lists.
func (p *imdsReads) listed(links []netcfg.Link) []string {
	var macs []string
	for _, l := range links {
		if _, ok := p.lastGood.ENI(l.MAC); ok && l.MAC != "" {
			macs = append(macs, l.MAC)
		}
	}
	return macs
}

// pending returns the links IMDS does not describe yet: their MAC is not
// listed, or listed as not ready, or as Unconfirmed and not re-read
// maxLinkRetries-1 times yet (IMDS answers device-number 0 for a few
// seconds after a hot attach; the re-reads cover 7.5 s, where
// amazon-ec2-net-utils 2.7.4 waits 6 s for a 0 on card 0 to change). Links
// without a MAC (lo, tunnels) are skipped.
func (p *imdsReads) pending(links []netcfg.Link) []netcfg.Link {
	var out []netcfg.Link
	for _, l := range links {
		if l.MAC == "" || l.MAC == "00:00:00:00:00:00" {
			continue
		}
		if p.lastGood == nil {
			out = append(out, l)
		} else if e, ok := p.lastGood.ENI(l.MAC); !ok || !e.Ready || (e.Unconfirmed() && p.linkRetries[l.Index] < maxLinkRetries) {
			out = append(out, l)
		}
	}
	return out
}

// markSeen records the links IMDS has been asked about.
func (p *imdsReads) markSeen(links []netcfg.Link) {
	p.seen = make(map[int]string, len(links))
	for _, l := range links {
		p.seen[l.Index] = l.MAC
	}
}

// imdsRead is one reconcile's read.
type imdsRead struct {
	*imdsReads
	ctx   context.Context
	links []netcfg.Link // every link observed
	rep   *Report
}

// ask reads IMDS for links: see imdsReads. A listing that names nothing
// new marks the links as seen, so later events on them (a container's
// addresses) cost nothing, and sets rep.Listed; a failed listing is
// reported like a failed snapshot.
func (rd imdsRead) ask(links []netcfg.Link) {
	if rd.lastGood == nil {
		rd.fetch(imds.Snapshot{}, imds.Update{})
		return
	}
	if known := rd.listed(links); len(known) > 0 {
		rd.fetch(*rd.lastGood, imds.Update{Full: known})
		return
	}
	if !slices.ContainsFunc(links, func(l netcfg.Link) bool { return l.MAC != "" && l.MAC != "00:00:00:00:00:00" }) {
		if len(links) > 0 {
			rd.markSeen(rd.links) // only links without a MAC appeared: nothing to ask
		}
		return
	}
	t0 := time.Now()
	macs, n, err := rd.source.ListMACs(rd.ctx)
	rd.rep.IMDSLatency, rd.rep.IMDSRequests = time.Since(t0), n
	if err != nil {
		rd.rep.IMDSError, rd.rep.IMDSErr = err.Error(), err
		return
	}
	if slices.ContainsFunc(macs, func(mac string) bool { _, listed := rd.lastGood.ENI(mac); return !listed }) {
		rd.fetch(*rd.lastGood, imds.Update{MACs: macs})
		return
	}
	rd.rep.Listed = true
	rd.markSeen(rd.links)
}

// fetch reads a snapshot as u says on prev: the last good one, or none for
// a full read.
func (rd imdsRead) fetch(prev imds.Snapshot, u imds.Update) {
	t0 := time.Now()
	fresh, err := rd.source.Refresh(rd.ctx, prev, u)
	rd.rep.IMDSLatency += time.Since(t0)
	rd.rep.IMDSRequests += fresh.Requests
	if err != nil {
		rd.rep.IMDSError, rd.rep.IMDSErr = err.Error(), err
		return
	}
	rd.rep.Fresh = true
	if rd.lastGood != nil {
		// A not-ready ENI keeps its entry of the last good snapshot, if that
		// one was ready: IMDS catching up after a hot attach (or briefly
		// answering device-number 0) must not undo configuration that was
		// correct a moment ago.
		fresh.ENIs = slices.Clone(fresh.ENIs)
		for i, e := range fresh.ENIs {
			if old, ok := rd.lastGood.ENI(e.MAC); ok && old.Ready && !e.Ready {
				fresh.ENIs[i] = old
			}
		}
	}
	if rd.lastGood == nil || !rd.lastGood.Equal(fresh) {
		rd.lastGood = &fresh // a read that found nothing new keeps the pointer: the quiet memo holds
	}
	rd.markSeen(rd.links)
}
