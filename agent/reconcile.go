package agent

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/netcfg"
)

// Snapshotter reads the instance metadata service (an *imds.Client).
type Snapshotter interface {
	Snapshot(ctx context.Context) (imds.Snapshot, error)
}

// MACLister is the cheap IMDS read a Snapshotter may also offer (an
// *imds.Client does): only the listing of attached MACs, one request.
type MACLister interface {
	ListMACs(ctx context.Context) (macs []string, requests int, err error)
}

// Refresher is the cheaper IMDS read a Snapshotter may also offer (an
// *imds.Client does): a read built on the last good snapshot that fetches
// only what may have changed (see imds.Client.Refresh).
type Refresher interface {
	Refresh(ctx context.Context, prev imds.Snapshot, u imds.Update) (imds.Snapshot, error)
}

// FullReadEvery is how many polls (RefreshPoll) go between two full
// snapshots (and two full kernel dumps): every FullReadEvery-th poll is one,
// about every 5 minutes at the default 15 s interval. The polls
// in between read only the keys that change while an ENI stays attached;
// the full read is defence in depth, for a change no link event told us of.
const FullReadEvery = 20

// Kernel is what a reconcile needs of the kernel (a *netcfg.Kernel).
// Observe includes the owned state.
type Kernel interface {
	Observe() (netcfg.Observed, error)
	Apply(netcfg.Plan) (writes int, err error)
	Conflicts(desired netcfg.State) []netcfg.Warning
}

// Refresh says whether a reconcile reads IMDS or reuses the last good snapshot.
type Refresh int

const (
	// RefreshAlways reads IMDS (poll timer, start, reload, one-shot commands).
	RefreshAlways Refresh = iota
	// RefreshIfNewLinks reads IMDS only when a link appeared since the last
	// read, so that a hot-attached ENI is configured without waiting for the
	// poll; kernel drift alone is repaired from the last good snapshot.
	//
	// A new link whose MAC the last good snapshot does not list (every
	// container veth on a busy host) first costs only the MAC listing (one
	// request, when the source is a MACLister): IMDS is read further only
	// when the listing names a MAC the snapshot lacks, and then (when the
	// source is a Refresher) only that MAC's keys, about 14 requests rather
	// than a 213-request snapshot on a 15-ENI instance. IMDS shares the
	// link-local budget of 1024 packets/s per ENI with DNS and NTP, so veths
	// must not spend it, and a hot attach must not wait for the other ENIs.
	// A new link whose MAC the snapshot lists, ready or not, has that MAC
	// read in full.
	RefreshIfNewLinks
	// RefreshNever reuses the last good snapshot (IMDS is backing off).
	RefreshNever
	// RefreshPendingLinks is RefreshIfNewLinks that also looks again at the
	// links IMDS did not describe at the last read (Report.PendingLinks):
	// the daemon's quick re-reads for a hot attach that IMDS has not caught
	// up with. A MAC the snapshot lists as not ready costs a snapshot; an
	// unknown MAC costs one listing until IMDS lists it.
	RefreshPendingLinks
	// RefreshPoll is the poll timer's read. It re-reads only what can change
	// while an ENI stays attached (addresses, prefixes, CIDR blocks) for the
	// ENIs the last good snapshot has ready; new, not-ready and re-attached
	// ENIs are read in full, and every so many polls the whole snapshot is.
	RefreshPoll
)

// Change is one planned or applied operation, attributed to an ENI.
type Change struct {
	ENI  string    `json:"eni,omitempty"`  // interface id (or MAC); "" for objects of a detached ENI
	Link string    `json:"link,omitempty"` // link name, when the link exists
	Text string    `json:"text"`           // the op in `ip` syntax, links by name
	Op   netcfg.Op `json:"op"`
}

// String describes the change the way `ip` would.
func (c Change) String() string { return c.Text }

// Report is the outcome of one reconcile.
type Report struct {
	Time time.Time `json:"time"`
	// Trigger names what caused the reconcile in the daemon ("poll", "link+drift").
	Trigger  string        `json:"trigger,omitempty"`
	Duration time.Duration `json:"duration_ns"`
	// Fresh is true when this reconcile read IMDS successfully.
	Fresh bool `json:"fresh"`
	// IMDSError says why IMDS could not be read. While it is set, the
	// reconcile only re-adds objects of the last good snapshot and deletes
	// nothing: an IMDS error is never an answer.
	IMDSError string `json:"imds_error,omitempty"`
	IMDSErr   error  `json:"-"`
	// HaveSnapshot is false until IMDS was read successfully once: nothing
	// is known about the ENIs and nothing is changed.
	HaveSnapshot bool `json:"have_snapshot"`
	// Listed is true when this reconcile read only IMDS's MAC listing, which
	// named no MAC the last good snapshot lacks: that snapshot was reused
	// (adds only, as after drift) and no full snapshot was taken.
	Listed bool `json:"listed,omitempty"`
	// IMDSRequests is the number of HTTP requests the IMDS reads cost.
	IMDSRequests int           `json:"imds_requests"`
	IMDSLatency  time.Duration `json:"imds_latency_ns"`

	ENIs     []netcfg.ENIStatus `json:"enis"`
	Warnings []netcfg.Warning   `json:"warnings,omitempty"`
	// Changes is the plan: applied (DryRun false) or pending (DryRun true).
	Changes []Change `json:"changes,omitempty"`
	DryRun  bool     `json:"dry_run,omitempty"`
	Writes  int      `json:"writes"`
	// Repairs counts re-added objects of ENIs that were already configured:
	// drift caused by another program.
	Repairs int `json:"repairs"`
	// Restored counts re-adds of a reconcile a link change triggered (the
	// daemon moves them out of Repairs): the kernel removed those objects
	// with the link, no program did.
	Restored int `json:"restored,omitempty"`
	// Blocked counts adds of this reconcile that did not stick (EEXIST on
	// another program's object); they are not retried until Unblock.
	Blocked int `json:"blocked,omitempty"`
	// ApplyError is set when Apply failed part way.
	ApplyError string `json:"apply_error,omitempty"`
	// NewLinks is true when a link appeared since the last IMDS read.
	NewLinks bool `json:"new_links,omitempty"`
	// PendingLinks are links whose MAC IMDS does not list yet (or lists as
	// not ready): the daemon re-reads IMDS for them with a backoff.
	PendingLinks []netcfg.Link `json:"pending_links,omitempty"`
	// Managed counts what dualhomed owns after this reconcile.
	ManagedRules  int `json:"managed_rules"`
	ManagedRoutes int `json:"managed_routes"`
}

// OK reports whether the reconcile read IMDS and applied everything.
func (r Report) OK() bool { return r.Fresh && r.IMDSError == "" && r.ApplyError == "" }

// Configured counts the ENIs in the configured state.
func (r Report) Configured() int {
	n := 0
	for _, e := range r.ENIs {
		if e.State == netcfg.ENIConfigured {
			n++
		}
	}
	return n
}

// Summary is the one-line STATUS= text: "3 ENIs: 2 configured, 1 waiting for IMDS".
func (r Report) Summary() string {
	order := []netcfg.ENIState{netcfg.ENIConfigured, netcfg.ENIDrift, netcfg.ENIWaitingLink,
		netcfg.ENIWaitingIMDS, netcfg.ENIExcluded, netcfg.ENIPrimaryRole}
	counts := map[netcfg.ENIState]int{}
	for _, e := range r.ENIs {
		counts[e.State]++
	}
	var parts []string
	for _, s := range order {
		if counts[s] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[s], s))
			delete(counts, s)
		}
	}
	for s, n := range counts { // states added later to netcfg
		parts = append(parts, fmt.Sprintf("%d %s", n, s))
	}
	noun := "ENIs"
	if len(r.ENIs) == 1 {
		noun = "ENI"
	}
	s := fmt.Sprintf("%d %s", len(r.ENIs), noun)
	if len(parts) > 0 {
		s += ": " + strings.Join(parts, ", ")
	}
	if !r.HaveSnapshot {
		s = "no IMDS snapshot yet, nothing changed"
	}
	if r.IMDSError != "" {
		s = "degraded, IMDS unreachable, keeping routes: " + s
	}
	if r.ApplyError != "" {
		s = "degraded, apply failed: " + s
	}
	if len(r.Warnings) > 0 {
		s += fmt.Sprintf(" (%d warnings)", len(r.Warnings))
	}
	return s
}

// Reconciler runs the pipeline snapshot -> Observe -> Desired -> Owned ->
// Diff -> Apply. It keeps the last good IMDS snapshot in memory so that drift
// can be repaired while IMDS is unreachable, and so that a not-ready ENI keeps
// what it had. It is not safe for concurrent use: the daemon calls it from one
// goroutine.
type Reconciler struct {
	source Snapshotter
	kernel Kernel
	cfg    Config
	// IMDSTimeout bounds one snapshot (0: the caller's context only).
	IMDSTimeout time.Duration

	// blocked holds adds that did not stick: the kernel answered EEXIST
	// because another program's object holds the same key (a foreign route
	// with our table and destination). Retrying them on every reconcile
	// would write forever and look like drift; they are skipped until
	// Unblock (a foreign object was deleted).
	blocked map[string]string // op key -> op text
	// retrying holds the adds Unblock released for this reconcile: trying
	// them again is not a drift repair.
	retrying map[string]bool

	lastGood   *imds.Snapshot
	seenLinks  map[int]string  // link index -> MAC, as observed at the last IMDS read
	configured map[string]bool // MACs of ENIs configured by an earlier successful apply
	polls      int             // RefreshPoll reads so far, for FullReadEvery
	memo       *desiredMemo    // the last Desired result and its inputs
	// quiet: the last reconcile changed nothing, so the memo's observation
	// is the kernel's state for as long as the kernel announces no change
	// (UnchangedKernel).
	quiet bool
}

// UnchangedKernel is what a Kernel may also offer (a *netcfg.Kernel does):
// whether the kernel announced no change since the last Observe.
type UnchangedKernel interface {
	Unchanged() bool
}

// observe returns the kernel's state. A poll (mayReuse) whose previous
// reconcile changed nothing reuses that reconcile's observation while the
// kernel reports no change since: at full scale that saves dumping about
// 3,000 objects (2-4 ms) on every poll, a quarter of the daemon's idle CPU.
// Anything the kernel announces (links, addresses, rules, routes, rp_filter,
// a lost notification) makes it dump again, and so does every full poll.
func (r *Reconciler) observe(mayReuse bool) (netcfg.Observed, error) {
	if q, ok := r.kernel.(UnchangedKernel); ok && mayReuse && r.quiet && q.Unchanged() {
		return r.memo.obs, nil
	}
	r.quiet = false
	return r.kernel.Observe()
}

// desiredMemo is a Desired result with its inputs. Desired is a pure
// function, and most reconciles a netlink event triggers (a container's
// veth, a foreign address) find the kernel state they depend on exactly as
// the previous reconcile left it: they reuse its result instead of
// computing about 3,000 objects again (0.4 ms of a 3 ms no-op at full scale).
type desiredMemo struct {
	snap   *imds.Snapshot // r.lastGood when it was computed: a new read replaces the pointer
	obs    netcfg.Observed
	result netcfg.Result
	// noChanges: Diff(obs.Owned, result.State) was empty. A no-op's Diff
	// of the same inputs (0.2-0.4 ms at full scale) is skipped too.
	noChanges bool
}

// desired returns netcfg.Desired for snap (r.lastGood) and obs, and
// whether it is the memo's (the same inputs); r.memo holds it afterwards.
func (r *Reconciler) desired(snap imds.Snapshot, obs netcfg.Observed) (netcfg.Result, bool) {
	m := r.memo
	reused := m != nil && m.snap == r.lastGood && sameObserved(m.obs, obs)
	if !reused {
		m = &desiredMemo{snap: r.lastGood, obs: cloneObserved(obs), result: netcfg.Desired(snap, obs, netcfgFor(r.cfg, snap))}
		r.memo = m
	}
	res := m.result
	res.ENIs = slices.Clone(res.ENIs) // the caller marks ENI states in place
	return res, reused
}

// cloneObserved copies obs, so that the memo cannot change under it.
func cloneObserved(obs netcfg.Observed) netcfg.Observed {
	addrs := make(map[int][]netip.Prefix, len(obs.Addrs))
	for i, ps := range obs.Addrs {
		addrs[i] = slices.Clone(ps)
	}
	return netcfg.Observed{Links: slices.Clone(obs.Links), Addrs: addrs, Owned: netcfg.State{
		Rules: slices.Clone(obs.Owned.Rules), Routes: slices.Clone(obs.Owned.Routes),
		Addrs: slices.Clone(obs.Owned.Addrs), RPFilters: slices.Clone(obs.Owned.RPFilters)}}
}

// sameObserved reports whether two observations of the kernel are equal in
// everything Desired reads.
func sameObserved(a, b netcfg.Observed) bool {
	return slices.Equal(a.Links, b.Links) &&
		maps.EqualFunc(a.Addrs, b.Addrs, slices.Equal) &&
		slices.Equal(a.Owned.Rules, b.Owned.Rules) &&
		slices.Equal(a.Owned.Routes, b.Owned.Routes) &&
		slices.Equal(a.Owned.Addrs, b.Owned.Addrs) &&
		slices.Equal(a.Owned.RPFilters, b.Owned.RPFilters)
}

// NewReconciler returns a Reconciler reading IMDS through source and acting
// on kernel with cfg.
func NewReconciler(source Snapshotter, kernel Kernel, cfg Config) *Reconciler {
	return &Reconciler{source: source, kernel: kernel, cfg: cfg, configured: map[string]bool{},
		blocked: map[string]string{}, retrying: map[string]bool{}}
}

// Blocked returns how many wanted objects are held off by foreign objects.
func (r *Reconciler) Blocked() int { return len(r.blocked) }

// Unblock releases the blocked adds, so that the next reconcile tries them
// again. Call it when the kernel changed in a way that may free their place
// or hide a wrong verdict: another program deleted a route or rule, a link or
// address changed (the kernel flushes IPv4 routes silently then), one of our
// objects was deleted.
func (r *Reconciler) Unblock() {
	for k := range r.blocked {
		r.retrying[k] = true
	}
	clear(r.blocked)
}

// Swap replaces the IMDS source, kernel and configuration (after a reload),
// keeping the last good snapshot.
func (r *Reconciler) Swap(source Snapshotter, kernel Kernel, cfg Config) {
	r.source, r.kernel, r.cfg = source, kernel, cfg
	r.memo, r.quiet = nil, false // Desired's configuration changed; another kernel
}

// LastGood returns the last complete IMDS snapshot, if any.
func (r *Reconciler) LastGood() (imds.Snapshot, bool) {
	if r.lastGood == nil {
		return imds.Snapshot{}, false
	}
	return *r.lastGood, true
}

// Reconcile runs the pipeline once. With dryRun it computes the plan without
// applying it (plan, status). The error is for failures to read the kernel;
// IMDS and apply failures are reported in the Report, which is always valid.
func (r *Reconciler) Reconcile(ctx context.Context, refresh Refresh, dryRun bool) (rep Report, err error) {
	start := time.Now()
	rep = Report{Time: start, DryRun: dryRun}
	defer func() { rep.Duration = time.Since(start) }() // named result: the caller sees it

	fullPoll := false // this poll reads everything: IMDS and the kernel
	if refresh == RefreshPoll {
		r.polls++
		fullPoll = r.polls%FullReadEvery == 0
	}
	obs, err := r.observe(refresh == RefreshPoll && !fullPoll)
	if err != nil {
		return rep, fmt.Errorf("observing links and addresses: %w", err)
	}

	// Decide whether to read IMDS.
	var newLinks []netcfg.Link
	for _, l := range obs.Links {
		if l.MAC != "" && r.seenLinks[l.Index] != l.MAC {
			newLinks = append(newLinks, l)
		}
	}
	rep.NewLinks = len(newLinks) > 0
	var read bool
	var update *imds.Update // what to read again of r.lastGood; nil: a full snapshot
	switch {
	case refresh == RefreshAlways:
		read = true
	case refresh == RefreshNever:
	case r.lastGood == nil:
		read = true
	case refresh == RefreshPoll:
		read = true
		if !fullPoll {
			update = &imds.Update{Dynamic: true, Full: r.listedMACs(newLinks)}
		}
	case refresh == RefreshIfNewLinks:
		read, update = r.needsRead(ctx, newLinks, obs, &rep)
	case refresh == RefreshPendingLinks:
		read, update = r.needsRead(ctx, append(newLinks, pendingLinks(*r.lastGood, obs)...), obs, &rep)
	}

	var snap imds.Snapshot
	haveSnap := false
	if read {
		sctx, cancel := r.imdsContext(ctx)
		defer cancel()
		t0 := time.Now()
		var fresh imds.Snapshot
		var readErr error
		if rf, ok := r.source.(Refresher); ok && update != nil {
			fresh, readErr = rf.Refresh(sctx, *r.lastGood, *update)
		} else {
			fresh, readErr = r.source.Snapshot(sctx)
		}
		rep.IMDSLatency += time.Since(t0)
		rep.IMDSRequests += fresh.Requests
		if readErr != nil {
			rep.IMDSError, rep.IMDSErr = readErr.Error(), readErr
		} else {
			rep.Fresh = true
			snap = r.mergeNotReady(fresh)
			haveSnap = true
			if r.lastGood == nil || !r.lastGood.Equal(snap) {
				r.lastGood = &snap // a poll that found nothing new keeps the memo's snapshot
			}
			r.markSeen(obs)
		}
	}
	if !haveSnap && r.lastGood != nil {
		snap, haveSnap = *r.lastGood, true
	}
	rep.HaveSnapshot = haveSnap

	owned := obs.Owned
	var desired netcfg.Result
	reused := false // desired is the memo's: same inputs
	if haveSnap {
		desired, reused = r.desired(snap, obs)
	}
	diff := func() netcfg.Plan {
		if reused && r.memo.noChanges {
			return netcfg.Plan{} // the same inputs' Diff was empty
		}
		p := netcfg.Diff(owned, desired.State)
		r.memo.noChanges = p.Empty()
		return p
	}
	rep.ENIs = desired.ENIs
	rep.Warnings = append(rep.Warnings, desired.Warnings...)
	rep.PendingLinks = pendingLinks(snap, obs)

	var plan netcfg.Plan
	switch {
	case !haveSnap:
		// Never read IMDS: nothing is known, so nothing is changed.
	case !rep.Fresh && rep.IMDSError != "":
		// IMDS failed: repair what the last good snapshot wanted, remove nothing.
		plan = withoutDeletes(diff())
	default:
		plan = diff()
		if !rep.Fresh {
			// Kernel drift repaired from the last good snapshot: that snapshot
			// may be stale, so it can add but never remove.
			plan = withoutDeletes(plan)
		}
	}

	attr := newAttributor(desired.ENIs, obs)
	var conflicts []netcfg.Warning
	blocked := r.blocked
	if dryRun && haveSnap {
		// A dry run cannot learn from EEXIST what a foreign object holds:
		// it asks Conflicts, which the daemon reports too, so that plan
		// agrees with the daemon, which skips such adds once tried.
		conflicts = r.kernel.Conflicts(desired.State)
		blocked = blockedByConflicts(plan, conflicts, r.blocked)
	}
	if len(blocked) > 0 {
		plan = withoutBlocked(plan, blocked, attr, &rep)
	}
	touched := map[string]bool{} // MACs with pending or applied changes
	for _, op := range plan.Ops {
		c := attr.change(op)
		rep.Changes = append(rep.Changes, c)
		if mac := attr.mac(op); mac != "" {
			touched[mac] = true
			if !op.Delete && r.configured[mac] && !dryRun && !r.retrying[opKey(op)] {
				rep.Repairs++
			}
		}
	}

	if !dryRun && !plan.Empty() {
		rep.Writes, err = r.kernel.Apply(plan)
		if err != nil {
			rep.ApplyError = err.Error()
		} else {
			r.checkAddsStuck(plan, attr, &rep)
		}
	}
	if haveSnap {
		if !dryRun {
			conflicts = r.kernel.Conflicts(desired.State) // the state after Apply
		}
		rep.Warnings = append(rep.Warnings, conflicts...)
	}

	// ENI states: pending changes (dry run) or a failed apply mean drift.
	for i, e := range rep.ENIs {
		if e.State != netcfg.ENIConfigured {
			continue
		}
		if touched[e.MAC] && (dryRun || rep.ApplyError != "") {
			rep.ENIs[i].State = netcfg.ENIDrift
		}
	}
	if !dryRun && rep.ApplyError == "" && haveSnap {
		r.configured = map[string]bool{}
		for _, e := range rep.ENIs {
			if e.State == netcfg.ENIConfigured {
				r.configured[e.MAC] = true
			}
		}
	}

	clear(r.retrying)
	// The kernel is as observed (the memo holds that observation): a poll
	// may reuse it while Unchanged.
	r.quiet = haveSnap && !dryRun && plan.Empty() && rep.ApplyError == ""
	rep.ManagedRules, rep.ManagedRoutes = len(owned.Rules), len(owned.Routes)
	if !dryRun && rep.ApplyError == "" {
		for _, op := range plan.Ops {
			d := 1
			if op.Delete {
				d = -1
			}
			if !op.Delete && r.blocked[opKey(op)] != "" {
				continue // did not stick
			}
			switch {
			case op.Rule != nil:
				rep.ManagedRules += d
			case op.Route != nil && !op.Replace:
				rep.ManagedRoutes += d
			}
		}
	}
	return rep, nil
}

// imdsContext bounds one IMDS read by IMDSTimeout.
func (r *Reconciler) imdsContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if r.IMDSTimeout > 0 {
		return context.WithTimeout(ctx, r.IMDSTimeout)
	}
	return ctx, func() {}
}

// markSeen records the links IMDS has been asked about.
func (r *Reconciler) markSeen(obs netcfg.Observed) {
	r.seenLinks = map[int]string{}
	for _, l := range obs.Links {
		r.seenLinks[l.Index] = l.MAC
	}
}

// needsRead reports whether links call for reading IMDS (r.lastGood is
// set), and what to read: a MAC the last good snapshot lists is read in
// full (its ENI is new, not ready yet, or attached again, maybe with another
// device number). Links with unknown MACs first cost only IMDS's MAC
// listing; the MACs it names that the last good snapshot lacks are then
// read, the other ENIs kept as they are. A listing that names nothing new
// marks the links as seen, so later events on them (a container's
// addresses) cost nothing, and sets rep.Listed; a failed listing is reported
// like a failed snapshot.
func (r *Reconciler) needsRead(ctx context.Context, links []netcfg.Link, obs netcfg.Observed, rep *Report) (bool, *imds.Update) {
	if known := r.listedMACs(links); len(known) > 0 {
		return true, &imds.Update{Full: known}
	}
	unknown := false
	for _, l := range links {
		unknown = unknown || (l.MAC != "" && l.MAC != "00:00:00:00:00:00")
	}
	if !unknown {
		if len(links) > 0 {
			r.markSeen(obs) // only links without a MAC appeared: nothing to ask
		}
		return false, nil
	}
	lister, ok := r.source.(MACLister)
	if !ok {
		return true, nil
	}
	lctx, cancel := r.imdsContext(ctx)
	defer cancel()
	t0 := time.Now()
	macs, n, err := lister.ListMACs(lctx)
	rep.IMDSLatency, rep.IMDSRequests = time.Since(t0), n
	if err != nil {
		rep.IMDSError, rep.IMDSErr = err.Error(), err
		return false, nil
	}
	for _, mac := range macs {
		if _, listed := r.lastGood.ENI(mac); !listed {
			return true, &imds.Update{MACs: macs}
		}
	}
	rep.Listed = true
	r.markSeen(obs)
	return false, nil
}

// listedMACs returns the MACs of links that the last good snapshot lists.
func (r *Reconciler) listedMACs(links []netcfg.Link) []string {
	var macs []string
	for _, l := range links {
		if _, listed := r.lastGood.ENI(l.MAC); listed && l.MAC != "" {
			macs = append(macs, l.MAC)
		}
	}
	return macs
}

// mergeNotReady replaces each not-ready ENI of a fresh snapshot with its
// entry from the last good snapshot, if that one was ready: IMDS catching up
// after a hot attach (or briefly answering device-number 0) must not undo
// configuration that was correct a moment ago.
func (r *Reconciler) mergeNotReady(fresh imds.Snapshot) imds.Snapshot {
	if r.lastGood == nil {
		return fresh
	}
	out := fresh
	out.ENIs = make([]imds.ENI, len(fresh.ENIs))
	for i, e := range fresh.ENIs {
		if !e.Ready {
			if old, ok := r.lastGood.ENI(e.MAC); ok && old.Ready {
				e = old
			}
		}
		out.ENIs[i] = e
	}
	return out
}

// pendingLinks returns the links IMDS does not describe yet: their MAC is not
// listed, or listed as not ready. Links without a MAC (lo, tunnels) are skipped.
func pendingLinks(snap imds.Snapshot, obs netcfg.Observed) []netcfg.Link {
	var out []netcfg.Link
	for _, l := range obs.Links {
		if l.MAC == "" || l.MAC == "00:00:00:00:00:00" {
			continue
		}
		if e, ok := snap.ENI(l.MAC); !ok || !e.Ready {
			out = append(out, l)
		}
	}
	return out
}

func withoutDeletes(p netcfg.Plan) netcfg.Plan {
	var out netcfg.Plan
	for _, op := range p.Ops {
		if !op.Delete {
			out.Ops = append(out.Ops, op)
		}
	}
	return out
}

// opKey identifies the kernel object an op adds: two ops with one key
// collide in the kernel (EEXIST).
func opKey(op netcfg.Op) string {
	switch {
	case op.Route != nil:
		return fmt.Sprintf("route %v", op.Route.Key())
	case op.Rule != nil:
		return fmt.Sprintf("rule %v", op.Rule.Key())
	case op.Addr != nil:
		return fmt.Sprintf("addr %v", op.Addr.Key())
	}
	return ""
}

// withoutBlocked drops the adds known to be blocked (op key -> op text),
// with a warning each.
func withoutBlocked(p netcfg.Plan, blocked map[string]string, attr attributor, rep *Report) netcfg.Plan {
	var out netcfg.Plan
	for _, op := range p.Ops {
		if k := opKey(op); !op.Delete && k != "" && blocked[k] != "" {
			c := attr.change(op)
			rep.Warnings = append(rep.Warnings, netcfg.Warning{ENI: c.ENI,
				Message: fmt.Sprintf("cannot add %q: another program's object holds its place (EEXIST); left alone", strings.TrimPrefix(c.Text, "+ ")),
				Hint:    "remove the other object (see `ip route show table all` / `ip rule`) or exclude this ENI in the configuration"})
			continue
		}
		out.Ops = append(out.Ops, op)
	}
	return out
}

// blockedByConflicts returns known (not modified) plus the adds of p that
// a conflict warning says a foreign route keeps out (Warning.Blocks: same
// table, destination and metric, so the kernel would answer EEXIST).
func blockedByConflicts(p netcfg.Plan, conflicts []netcfg.Warning, known map[string]string) map[string]string {
	out := make(map[string]string, len(known))
	maps.Copy(out, known)
	held := map[string]string{}
	for _, w := range conflicts {
		for _, r := range w.Blocks {
			held[opKey(netcfg.Op{Route: &r})] = w.Message
		}
	}
	for _, op := range p.Ops {
		if k := opKey(op); !op.Delete && op.Route != nil && held[k] != "" {
			out[k] = held[k]
		}
	}
	return out
}

// checkAddsStuck reads the owned state back after an apply and marks the
// adds that are not there as blocked. Only reconciles that changed something
// pay for this read.
func (r *Reconciler) checkAddsStuck(p netcfg.Plan, attr attributor, rep *Report) {
	adds := false
	for _, op := range p.Ops {
		adds = adds || (!op.Delete && opKey(op) != "")
	}
	if !adds {
		return
	}
	after, err := r.kernel.Observe()
	if err != nil {
		return // the next reconcile sees the truth anyway
	}
	present := map[string]bool{}
	for _, rt := range after.Owned.Routes {
		present[opKey(netcfg.Op{Route: &rt})] = true
	}
	for _, ru := range after.Owned.Rules {
		present[opKey(netcfg.Op{Rule: &ru})] = true
	}
	for _, a := range after.Owned.Addrs {
		present[opKey(netcfg.Op{Addr: &a})] = true
	}
	links := map[int]bool{}
	for _, l := range after.Links {
		links[l.Index] = true
	}
	for _, op := range p.Ops {
		if k := opKey(op); !op.Delete && k != "" && !present[k] && !linkGone(op, links) {
			r.blocked[k] = attr.change(op).Text
			rep.Blocked++
		}
	}
}

// linkGone reports whether op's route or address is on a link that is no
// longer there: the kernel removed the object with its link (a detach right
// after the attach), no foreign object blocks it.
func linkGone(op netcfg.Op, links map[int]bool) bool {
	switch {
	case op.Route != nil && op.Route.LinkIndex != 0:
		return !links[op.Route.LinkIndex]
	case op.Addr != nil:
		return !links[op.Addr.LinkIndex]
	}
	return false
}

// netcfgFor returns the routing configuration for snap: the file's
// top-level vpc_routes default applies to per-ENI entries without their own
// value and, through one entry per MAC, to ENIs no entry matches (netcfg
// rejects catch-all selectors).
func netcfgFor(cfg Config, snap imds.Snapshot) netcfg.Config {
	nc := cfg.Netcfg
	def := cfg.VPCRoutes
	if def == "" || def == netcfg.VPCRoutesAuto {
		return nc
	}
	enis := make([]netcfg.ENIConfig, 0, len(nc.ENIs)+len(snap.ENIs))
	for _, e := range nc.ENIs {
		if e.VPCRoutes == "" {
			e.VPCRoutes = def
		}
		enis = append(enis, e)
	}
	for _, e := range snap.ENIs {
		matched := false
		for _, ec := range nc.ENIs {
			if ec.Match.Matches(e) {
				matched = true
				break
			}
		}
		if !matched {
			enis = append(enis, netcfg.ENIConfig{Match: netcfg.Selector{MAC: e.MAC}, VPCRoutes: def})
		}
	}
	nc.ENIs = enis
	return nc
}

// attributor maps kernel objects back to the ENI they serve.
type attributor struct {
	byLink  map[int]*netcfg.ENIStatus
	byTable map[int]*netcfg.ENIStatus
	byName  map[string]*netcfg.ENIStatus
	names   map[int]string
}

func newAttributor(enis []netcfg.ENIStatus, obs netcfg.Observed) attributor {
	a := attributor{byLink: map[int]*netcfg.ENIStatus{}, byTable: map[int]*netcfg.ENIStatus{},
		byName: map[string]*netcfg.ENIStatus{}, names: map[int]string{}}
	for i := range enis {
		e := &enis[i]
		if e.LinkIndex != 0 {
			a.byLink[e.LinkIndex] = e
		}
		if e.Table != 0 {
			a.byTable[e.Table] = e
		}
		if e.Link != "" {
			a.byName[e.Link] = e
		}
	}
	for _, l := range obs.Links {
		a.names[l.Index] = l.Name
	}
	return a
}

func (a attributor) eni(op netcfg.Op) (*netcfg.ENIStatus, int) {
	switch {
	case op.Route != nil:
		if e := a.byLink[op.Route.LinkIndex]; e != nil {
			return e, op.Route.LinkIndex
		}
		return a.byTable[op.Route.Table], op.Route.LinkIndex
	case op.Rule != nil:
		return a.byTable[op.Rule.Table], 0
	case op.Addr != nil:
		return a.byLink[op.Addr.LinkIndex], op.Addr.LinkIndex
	case op.RPFilter != nil:
		return a.byName[op.RPFilter.LinkName], 0
	}
	return nil, 0
}

func (a attributor) mac(op netcfg.Op) string {
	if e, _ := a.eni(op); e != nil {
		return e.MAC
	}
	return ""
}

func (a attributor) change(op netcfg.Op) Change {
	c := Change{Op: op, Text: op.Format(a.names)}
	e, idx := a.eni(op)
	if e != nil {
		c.ENI = e.InterfaceID
		if c.ENI == "" {
			c.ENI = e.MAC
		}
		c.Link = e.Link
	}
	if c.Link == "" {
		c.Link = a.names[idx]
	}
	if c.Link == "" && op.RPFilter != nil {
		c.Link = op.RPFilter.LinkName
	}
	return c
}
