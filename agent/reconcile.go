package agent

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/netcfg"
)

// Kernel is what a reconcile needs of the kernel (a *netcfg.Kernel), and
// plan and status of the NAT's counters.
type Kernel interface {
	Observe() (netcfg.Observed, error)
	Apply(netcfg.Plan) (writes int, err error)
	NATCounters() (netcfg.NATCounters, error)
}

// Change is one planned or applied operation, attributed to an ENI.
type Change = netcfg.Change

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
	// BlockedObjects names those adds and what holds their place, as read
	// back from the kernel after the apply.
	BlockedObjects []netcfg.Blocked `json:"blocked_objects,omitempty"`
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
	// NAT holds the NAT's counters in plan and status, when an ENI has a
	// NAT role (status --json shows them; the daemon reads none).
	NAT *netcfg.NATCounters `json:"-"`
}

// OK reports whether the reconcile read IMDS and applied everything.
func (r Report) OK() bool { return r.Fresh && r.IMDSError == "" && r.ApplyError == "" }

// Summary is the one-line STATUS= text: "3 ENIs: 2 configured, 1 waiting for IMDS".
func (r Report) Summary() string {
	counts := map[netcfg.ENIState]int{}
	for _, e := range r.ENIs {
		counts[e.State]++
	}
	var parts []string
	for _, s := range netcfg.ENIStates {
		if counts[s] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[s], s))
		}
	}
	s := fmt.Sprintf("%d ENIs", len(r.ENIs))
	if len(r.ENIs) == 1 {
		s = "1 ENI"
	}
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

// Reconciler runs the pipeline: Observe -> read IMDS -> Desired -> Diff ->
// Apply. It keeps the last good IMDS snapshot (imdsReads) so that drift can
// be repaired while IMDS is unreachable, and so that a not-ready ENI keeps
// what it had. It is not safe for concurrent use (the daemon calls it from
// one goroutine), KernelChanged aside.
type Reconciler struct {
	kernel Kernel
	cfg    Config
	imds   *imdsReads
	// IMDSTimeout bounds one IMDS read (0: the caller's context only).
	IMDSTimeout time.Duration
	// firstSeen is when each link (by index) first appeared in an
	// observation: the start of its cfg.DHCPGrace.
	firstSeen map[int]time.Time
	// leased holds the links (by index) on which a DHCP client's address
	// (finite lifetimes) for their ENI's primary IPv4 was seen. That
	// address is the client's on the link for as long as the link lives:
	// a client that drops its lease and takes it again (a reconfigure, an
	// ifdown/ifup) finds no copy of dualhomed's in its place.
	leased map[int]bool
	// HostWarnings are added to every report: what the host check
	// (HostWarnings) found at start or reload.
	HostWarnings []netcfg.Warning

	// blocked holds the ObjectKeys of adds that did not stick: the kernel
	// answered EEXIST because another program's object holds the same key
	// (a foreign route with our table and destination). Retrying them on
	// every reconcile would write forever and look like drift; they are
	// skipped until Unblock (a foreign object was deleted).
	blocked map[any]bool
	// refusals gives, for the blocked adds the kernel refused (Refused:
	// a gateway no route reaches), the reason.
	refusals map[any]string
	// retrying holds the adds Unblock released for this reconcile: trying
	// them again is not a drift repair.
	retrying   map[any]bool
	configured map[string]bool // names of ENIs configured by an earlier successful apply
	// nat is the NAT's table an earlier successful apply left: writing it
	// again is a drift repair.
	nat *netcfg.NFTable

	// kernelChanges counts the changes the kernel announced (KernelChanged);
	// 0 while nobody tells: then every reconcile reads the kernel.
	kernelChanges atomic.Uint64
	memo          *memo
}

// memo is the last reconcile's work when it changed nothing. Desired,
// Diff and Conflicts are pure: while the snapshot and the observation are
// the same, a reconcile finds the same ENIs, warnings and empty plan. Most
// reconciles a kernel event triggers (a container's veth, a foreign
// address, our own adds echoed back) find the kernel as the last one left
// it, and comparing two observations takes microseconds. Measured at full
// scale (15 ENIs x 100 addresses; BenchmarkFullScaleAgent on a shared
// 2-core machine, with and without it): the no-op on an event costs 2.1
// instead of 3.8 ms of CPU, against the 5 ms target. A poll while the
// kernel feed announced nothing (KernelChanged) also skips the kernel
// dumps: 19.2 instead of 22.8 ms of CPU per poll, IMDS and the in-process
// emulator included, where the daemon at rest (0.070 % of a core, target
// 0.1 %) has about 4 ms per poll to spare at the 15 s interval.
type memo struct {
	changes uint64         // kernelChanges before it observed
	snap    *imds.Snapshot // imdsReads.lastGood it planned from
	obs     netcfg.Observed
	enis    []netcfg.ENIStatus
	warns   []netcfg.Warning
}

// sameObserved reports whether two observations are equal in everything
// Desired and Conflicts read.
func sameObserved(a, b netcfg.Observed) bool {
	return slices.Equal(a.Links, b.Links) && maps.EqualFunc(a.Addrs, b.Addrs, slices.Equal) &&
		slices.Equal(a.Owned.Rules, b.Owned.Rules) && slices.Equal(a.Owned.Routes, b.Owned.Routes) &&
		slices.Equal(a.Owned.Addrs, b.Owned.Addrs) && slices.Equal(a.Owned.RPFilters, b.Owned.RPFilters) && a.Owned.NAT.Equal(b.Owned.NAT) &&
		slices.Equal(a.Owned.AltNames, b.Owned.AltNames) && maps.Equal(a.AltNames, b.AltNames) &&
		slices.Equal(a.ForeignRules, b.ForeignRules) && slices.Equal(a.ForeignRoutes, b.ForeignRoutes) &&
		slices.Equal(a.ForeignAddrs, b.ForeignAddrs) && maps.Equal(a.AwaitDHCP, b.AwaitDHCP)
}

// NewReconciler returns a Reconciler reading IMDS through source and acting
// on kernel with cfg.
func NewReconciler(source Snapshotter, kernel Kernel, cfg Config) *Reconciler {
	return &Reconciler{kernel: kernel, cfg: cfg, configured: map[string]bool{},
		blocked: map[any]bool{}, refusals: map[any]string{}, retrying: map[any]bool{},
		imds: &imdsReads{source: source, pollInterval: cfg.PollInterval, linkRetries: map[int]int{}}}
}

// KernelChanged tells the Reconciler that the kernel announced a change (the
// daemon calls it for every notification of its kernel feed, and once when
// the feed starts). A Reconciler that is told skips the kernel dumps of a
// poll while the kernel stays quiet; one that is never told always reads
// the kernel. Safe to call from any goroutine.
func (r *Reconciler) KernelChanged() { r.kernelChanges.Add(1) }

// Blocked returns how many wanted objects are held off by foreign objects.
func (r *Reconciler) Blocked() int { return len(r.blocked) }

// Unblock releases the blocked adds, so that the next reconcile tries them
// again. Call it when the kernel changed in a way that may free their place
// or hide a wrong verdict: another program deleted a route or rule, a link or
// address changed (the kernel flushes IPv4 routes silently then), one of our
// objects was deleted.
func (r *Reconciler) Unblock() {
	if len(r.blocked) > 0 {
		r.memo = nil // the released adds are tried again
	}
	maps.Copy(r.retrying, r.blocked)
	clear(r.blocked)
	clear(r.refusals)
}

// Refused reports whether some blocked add is one the kernel refused, which a
// change of routes may let in.
func (r *Reconciler) Refused() bool { return len(r.refusals) > 0 }

// Swap replaces the IMDS source and the configuration (after a reload),
// keeping the last good snapshot.
func (r *Reconciler) Swap(source Snapshotter, cfg Config) {
	r.imds.source, r.imds.pollInterval, r.cfg, r.memo = source, cfg.PollInterval, cfg, nil
}

// LastGood returns the last complete IMDS snapshot, if any.
func (r *Reconciler) LastGood() (imds.Snapshot, bool) {
	if r.imds.lastGood == nil {
		return imds.Snapshot{}, false
	}
	return *r.imds.lastGood, true
}

// Reconcile runs the pipeline once for what triggered it (TriggerStart for
// the one-shot commands). With dryRun it computes the plan without applying
// it (plan, status). The error is for failures to read the kernel; IMDS and
// apply failures are reported in the Report, which is always valid.
func (r *Reconciler) Reconcile(ctx context.Context, t Trigger, dryRun bool) (rep Report, err error) {
	start := time.Now()
	rep = Report{Time: start, DryRun: dryRun}
	defer func() { rep.Duration = time.Since(start) }() // named result: the caller sees it

	defer clear(r.retrying)
	m, changes := r.memo, r.kernelChanges.Load()
	r.memo = nil
	if dryRun {
		m = nil
	}
	var obs netcfg.Observed
	// A poll may skip the kernel dumps while the kernel announced nothing
	// since the memo, unless it comes with a start, retry or reload, or is
	// the poll that reads everything afresh.
	quietPoll := t&TriggerPoll != 0 && !(t &^ TriggerPoll).needsIMDS() && (r.imds.polls+1)%FullReadEvery != 0
	if m != nil && changes != 0 && m.changes == changes && quietPoll {
		obs = m.obs
	} else if obs, err = r.kernel.Observe(); err != nil {
		return rep, fmt.Errorf("observing links and addresses: %w", err)
	}
	r.seeLinks(obs.Links, start) // the grace runs while IMDS is read
	snap, ok := r.imds.read(ctx, t, obs.Links, r.IMDSTimeout, &rep)
	rep.ManagedRules, rep.ManagedRoutes = len(obs.Owned.Rules), len(obs.Owned.Routes)
	if !ok { // IMDS was never read: nothing is known, so nothing is changed
		return rep, nil
	}
	obs.AwaitDHCP = r.awaitDHCP(obs, snap, start)
	if m != nil && m.snap == r.imds.lastGood && sameObserved(m.obs, obs) {
		m.changes = changes
		rep.ENIs, rep.Warnings, r.memo = m.enis, m.warns, m
		return rep, nil
	}
	desired := netcfg.Desired(snap, obs, r.cfg.Netcfg)
	rep.ENIs, rep.Warnings = desired.ENIs, desired.Warnings
	plan, complete := r.plan(obs, desired.State, dryRun, &rep)
	if after, applied := r.apply(plan, obs, dryRun, &rep); applied {
		obs = after // what the kernel holds after Apply
		rep.ManagedRules, rep.ManagedRoutes = len(obs.Owned.Rules), len(obs.Owned.Routes)
	}
	if !dryRun && rep.ApplyError == "" {
		r.nat = desired.State.NAT
	}
	rep.Warnings = append(append(rep.Warnings, netcfg.Conflicts(obs, desired.State, r.cfg.Netcfg)...), r.HostWarnings...)
	if !dryRun && complete && plan.Empty() && rep.ApplyError == "" {
		r.memo = &memo{changes: changes, snap: r.imds.lastGood, obs: obs, enis: rep.ENIs, warns: rep.Warnings}
	}
	return rep, nil
}

// seeLinks records when each link was first seen, the start of its
// cfg.DHCPGrace, and forgets the links that went, with their leases.
func (r *Reconciler) seeLinks(links []netcfg.Link, now time.Time) {
	seen, leased := make(map[int]time.Time, len(links)), map[int]bool{}
	for _, l := range links {
		seen[l.Index], leased[l.Index] = cmp.Or(r.firstSeen[l.Index], now), r.leased[l.Index]
	}
	maps.DeleteFunc(leased, func(_ int, v bool) bool { return !v })
	r.firstSeen, r.leased = seen, leased
}

// awaitDHCP returns the links on which the ENI's primary IPv4 is left to a
// DHCP client: those seen for the first time less than cfg.DHCPGrace
// before now, and those on which a client's lease for it (an address with
// finite lifetimes) was ever seen, which it records in leased.
func (r *Reconciler) awaitDHCP(obs netcfg.Observed, snap imds.Snapshot, now time.Time) map[int]bool {
	primaryOf := map[int]netip.Addr{}
	for _, l := range obs.Links {
		if e, ok := snap.ENI(l.MAC); ok && len(e.LocalIPv4s) > 0 {
			primaryOf[l.Index] = e.LocalIPv4s[0]
		}
	}
	for _, a := range obs.ForeignAddrs {
		if p, ok := primaryOf[a.LinkIndex]; ok && a.Dynamic && a.Prefix.Addr() == p {
			r.leased[a.LinkIndex] = true
		}
	}
	wait := map[int]bool{}
	for idx, first := range r.firstSeen {
		if now.Sub(first) < r.cfg.DHCPGrace || r.leased[idx] {
			wait[idx] = true
		}
	}
	return wait
}

// NextGrace is how long until the next link's cfg.DHCPGrace ends, 0 for none.
func (r *Reconciler) NextGrace(now time.Time) time.Duration {
	var next time.Duration
	for _, first := range r.firstSeen {
		if left := first.Add(r.cfg.DHCPGrace).Sub(now); left > 0 && (next == 0 || left < next) {
			next = left
		}
	}
	return next
}

// plan returns Diff's plan for desired less what this reconcile may not or
// need not apply, and whether it withheld no deletion. Without a fresh IMDS read, the last good snapshot
// may be stale: it can add, and remove only the rules of tables the kernel
// emptied (a detached link's, see Plan.WithoutFreshIMDS). Adds another program's object holds out are left out with a
// warning each: those that did not stick before (blocked), and in a dry
// run, which cannot learn that from EEXIST, those Conflicts names, so that
// plan agrees with the daemon.
func (r *Reconciler) plan(obs netcfg.Observed, desired netcfg.State, dryRun bool, rep *Report) (netcfg.Plan, bool) {
	plan := netcfg.Diff(obs.Owned, desired)
	complete := true
	if !rep.Fresh {
		safe := plan.WithoutFreshIMDS(obs)
		plan, complete = safe, len(safe.Ops) == len(plan.Ops)
	}
	held := r.blocked
	if dryRun {
		held = netcfg.BlockedBy(plan, netcfg.Conflicts(obs, desired, r.cfg.Netcfg))
		maps.Copy(held, r.blocked)
	}
	plan, dropped := plan.Split(held)
	rep.Warnings = append(rep.Warnings, r.blockedWarnings(dropped, obs, rep.ENIs)...)
	return plan, complete
}

// blockedWarnings warns about each add of ops that another program's object
// keeps out, naming both as obs read them back from the kernel, or that the
// kernel refused, naming the reason.
func (r *Reconciler) blockedWarnings(ops []netcfg.Op, obs netcfg.Observed, enis []netcfg.ENIStatus) []netcfg.Warning {
	var out []netcfg.Warning
	for _, c := range netcfg.Attribute(ops, enis, obs.Links) {
		b := obs.Blocked(c.Op)
		w := netcfg.Warning{ENI: c.ENI, Blocked: &b,
			Message: fmt.Sprintf("cannot add %s: held by %s (EEXIST); left alone until it goes", b.Object, b.Holder),
			Hint:    "remove the other object if it is stale, or stop its program from managing this ENI, or exclude the ENI in the configuration"}
		if reason, ok := r.refusals[c.Op.ObjectKey()]; ok {
			b.Holder = "no object: the kernel refuses it (" + reason + ")"
			w.Message = fmt.Sprintf("cannot add %s: %s; tried again when links, addresses or routes change", b.Object, reason)
			w.Hint = "the gateway needs a route in that table: another program may have moved the subnet's route out of it (amazon-ec2-net-utils: mask its policy-routes units, docs/coexistence.md)"
		}
		out = append(out, w)
	}
	return out
}

// apply reports the plan's changes and applies them (unless dryRun), and
// marks the ENIs: drift while changes are pending or failed, configured
// after a successful apply. When it applied anything it reads the kernel
// back (after): adds that did not stick are blocked.
func (r *Reconciler) apply(plan netcfg.Plan, obs netcfg.Observed, dryRun bool, rep *Report) (after netcfg.Observed, applied bool) {
	rep.Changes = netcfg.Attribute(plan.Ops, rep.ENIs, obs.Links)
	touched := map[string]bool{} // ENIs with pending or applied changes
	for _, c := range rep.Changes {
		touched[c.ENI] = true
		if c.ENI != "" && !c.Op.Delete && r.configured[c.ENI] && !dryRun && !r.retrying[c.Op.ObjectKey()] ||
			c.Op.NAT != nil && !c.Op.Delete && !dryRun && c.Op.NAT.Equal(r.nat) {
			rep.Repairs++
		}
	}
	if !dryRun && !plan.Empty() {
		var err error
		rep.Writes, err = r.kernel.Apply(plan)
		refused, err := netcfg.Refusals(err)
		for _, f := range refused { // not retried until Unblock, and not a change
			r.blocked[f.Op.ObjectKey()], r.refusals[f.Op.ObjectKey()] = true, f.Reason()
			rep.Changes = slices.DeleteFunc(rep.Changes, func(c netcfg.Change) bool { return c.Op.ObjectKey() == f.Op.ObjectKey() })
		}
		if err != nil {
			rep.ApplyError = err.Error()
		} else if after, err = r.kernel.Observe(); err == nil {
			applied = true
			r.blockStuck(plan, after, rep)
		}
	}
	for i, e := range rep.ENIs {
		if e.State == netcfg.ENIConfigured && touched[e.Name()] && (dryRun || rep.ApplyError != "") {
			rep.ENIs[i].State = netcfg.ENIDrift
		}
	}
	if !dryRun && rep.ApplyError == "" {
		clear(r.configured)
		for _, e := range rep.ENIs {
			if e.State == netcfg.ENIConfigured {
				r.configured[e.Name()] = true
			}
		}
	}
	return after, applied
}

// blockStuck marks the plan's adds that the kernel, read back after the
// apply, does not hold as blocked, unless their link went away with them
// (an ENI detached right after its attach: nobody blocks those).
func (r *Reconciler) blockStuck(plan netcfg.Plan, after netcfg.Observed, rep *Report) {
	present, links := map[any]bool{}, map[int]bool{}
	for _, rt := range after.Owned.Routes {
		present[rt.Key()] = true
	}
	for _, ru := range after.Owned.Rules {
		present[ru.Key()] = true
	}
	for _, a := range after.Owned.Addrs {
		present[a.Key()] = true
	}
	for _, l := range after.Links {
		links[l.Index] = true
	}
	var stuck []netcfg.Op
	for _, op := range plan.Ops {
		k := op.ObjectKey()
		gone := (op.Route != nil && op.Route.LinkIndex != 0 && !links[op.Route.LinkIndex]) ||
			(op.Addr != nil && !links[op.Addr.LinkIndex])
		if !op.Delete && k != nil && !present[k] && !gone {
			r.blocked[k] = true
			stuck = append(stuck, op)
		}
	}
	rep.Blocked = len(stuck)
	warns := r.blockedWarnings(stuck, after, rep.ENIs)
	for _, w := range warns {
		rep.BlockedObjects = append(rep.BlockedObjects, *w.Blocked)
	}
	rep.Warnings = append(rep.Warnings, warns...)
}
