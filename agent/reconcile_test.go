package agent

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/netcfg"
)

// atOnce makes rec add the ENIs' primary IPv4 addresses at once: the test
// kernels run no DHCP client to wait for (TestAwaitDHCP here, and
// TestPrimaryAddressIsLeftToDHCP and TestDroppedLeaseIsNotTakenOver in
// cmd/internal/e2e, cover the wait).
func atOnce(rec *Reconciler) *Reconciler {
	rec.cfg.DHCPGrace = 0
	return rec
}

// fakeKernel is an in-memory kernel: Apply changes its owned state, so
// consecutive reconciles see their own effects.
type fakeKernel struct {
	obs     netcfg.Observed
	applied []netcfg.Plan
}

// Observe returns a copy, as the kernel's are fresh on each call.
func (k *fakeKernel) Observe() (netcfg.Observed, error) {
	obs := k.obs
	obs.Links = slices.Clone(obs.Links)
	obs.Addrs = map[int][]netip.Prefix{}
	for i, ps := range k.obs.Addrs {
		obs.Addrs[i] = slices.Clone(ps)
	}
	o := &obs.Owned
	o.Rules, o.Routes, o.Addrs, o.RPFilters = slices.Clone(o.Rules), slices.Clone(o.Routes), slices.Clone(o.Addrs), slices.Clone(o.RPFilters)
	return obs, nil
}
func (k *fakeKernel) NATCounters() (netcfg.NATCounters, error) { return netcfg.NATCounters{}, nil }

func (k *fakeKernel) Apply(p netcfg.Plan) (int, error) {
	k.applied = append(k.applied, p)
	st := &k.obs.Owned
	for _, op := range p.Ops {
		switch {
		case op.Rule != nil && op.Delete:
			st.Rules = removeFunc(st.Rules, func(r netcfg.Rule) bool { return r.Key() == op.Rule.Key() })
		case op.Rule != nil:
			st.Rules = append(st.Rules, *op.Rule)
		case op.Route != nil && op.Delete:
			st.Routes = removeFunc(st.Routes, func(r netcfg.Route) bool { return r.Key() == op.Route.Key() })
		case op.Route != nil && op.Replace:
			st.Routes = removeFunc(st.Routes, func(r netcfg.Route) bool { return r.Key() == op.Route.Key() })
			st.Routes = append(st.Routes, *op.Route)
		case op.Route != nil:
			st.Routes = append(st.Routes, *op.Route)
		case op.Addr != nil && op.Delete:
			st.Addrs = removeFunc(st.Addrs, func(a netcfg.Addr) bool { return a.Key() == op.Addr.Key() })
			k.obs.Addrs[op.Addr.LinkIndex] = removeFunc(k.obs.Addrs[op.Addr.LinkIndex], func(p netip.Prefix) bool { return p == op.Addr.Prefix })
		case op.Addr != nil:
			st.Addrs = append(st.Addrs, *op.Addr)
			k.obs.Addrs[op.Addr.LinkIndex] = append(k.obs.Addrs[op.Addr.LinkIndex], op.Addr.Prefix)
		case op.RPFilter != nil && op.Delete:
			st.RPFilters = removeFunc(st.RPFilters, func(f netcfg.RPFilter) bool { return f.LinkName == op.RPFilter.LinkName })
		case op.RPFilter != nil:
			st.RPFilters = removeFunc(st.RPFilters, func(f netcfg.RPFilter) bool { return f.LinkName == op.RPFilter.LinkName })
			st.RPFilters = append(st.RPFilters, *op.RPFilter)
		}
	}
	st.Sort()
	return len(p.Ops), nil
}

func removeFunc[T any](s []T, del func(T) bool) []T {
	var out []T
	for _, x := range s {
		if !del(x) {
			out = append(out, x)
		}
	}
	return out
}

type fakeIMDS struct {
	snap     imds.Snapshot
	err      error
	reads    int // snapshots and refreshes
	listings int
	listErr  error
}

// event is a kernel event's trigger a second after the last IMDS read:
// past minLinkReadGap, so that it may read IMDS for new links.
func event(rec *Reconciler) Trigger {
	rec.imds.lastRead = time.Time{}
	return TriggerLink
}

// backingOff is a kernel event's trigger while IMDS backs off after a
// failure: it reads nothing, and repairs from the last good snapshot.
func backingOff(rec *Reconciler) Trigger {
	rec.imds.retryAt = time.Now().Add(time.Hour)
	return TriggerDrift
}

func (f *fakeIMDS) Snapshot(context.Context) (imds.Snapshot, error) {
	f.reads++
	if f.err != nil {
		return imds.Snapshot{}, f.err
	}
	snap := f.snap // like the real client, every snapshot has its own slices
	snap.ENIs = append([]imds.ENI(nil), f.snap.ENIs...)
	return snap, nil
}

// Refresh reads everything again, as a Snapshot would.
func (f *fakeIMDS) Refresh(ctx context.Context, _ imds.Snapshot, _ imds.Update) (imds.Snapshot, error) {
	return f.Snapshot(ctx)
}

const (
	macPrimary = "02:00:00:00:00:00"
	macB       = "02:00:00:00:00:01"
	macC       = "02:00:00:00:00:02"
)

func eni(mac string, device int, vpc string, ip string) imds.ENI {
	a := netip.MustParseAddr(ip)
	return imds.ENI{
		MAC: mac, Ready: true, DeviceNumber: device, InterfaceID: "eni-" + mac[len(mac)-2:], VPCID: vpc,
		SubnetIPv4CIDR: netip.PrefixFrom(a, 24).Masked(), VPCIPv4CIDRs: []netip.Prefix{netip.PrefixFrom(a, 16).Masked()},
		LocalIPv4s: []netip.Addr{a},
	}
}

func testWorld() (*fakeIMDS, *fakeKernel) {
	src := &fakeIMDS{snap: imds.Snapshot{PrimaryMAC: macPrimary, ENIs: []imds.ENI{
		eni(macPrimary, 0, "vpc-a", "10.0.0.10"),
		eni(macB, 1, "vpc-b", "10.1.0.10"),
		eni(macC, 2, "vpc-b", "10.1.1.10"),
	}}}
	k := &fakeKernel{obs: netcfg.Observed{
		Links: []netcfg.Link{{Index: 1, Name: "lo", MAC: "00:00:00:00:00:00"}, {Index: 2, Name: "eth0", MAC: macPrimary},
			{Index: 3, Name: "eth1", MAC: macB}, {Index: 4, Name: "eth2", MAC: macC}},
		Addrs: map[int][]netip.Prefix{2: {netip.MustParsePrefix("10.0.0.10/24")}},
	}}
	return src, k
}

// configured counts the report's ENIs in the configured state.
func configured(rep Report) int {
	n := 0
	for _, e := range rep.ENIs {
		if e.State == netcfg.ENIConfigured {
			n++
		}
	}
	return n
}

func rulesOf(st netcfg.State, table int) int {
	n := 0
	for _, r := range st.Rules {
		if r.Table == table {
			n++
		}
	}
	return n
}

func TestReconcileConfiguresThenIsANoOp(t *testing.T) {
	src, k := testWorld()
	rec := atOnce(NewReconciler(src, k, DefaultConfig()))
	rep, err := rec.Reconcile(context.Background(), TriggerStart, false)
	if err != nil || !rep.OK() || rep.Duration <= 0 {
		t.Fatalf("first reconcile: %v %+v", err, rep)
	}
	if rep.Writes == 0 || configured(rep) < 2 || rulesOf(k.obs.Owned, 20001) == 0 || rulesOf(k.obs.Owned, 20002) == 0 {
		t.Fatalf("nothing configured: %s, owned %+v", rep.Summary(), k.obs.Owned)
	}
	for _, c := range rep.Changes {
		if c.ENI == "" || c.Text == "" {
			t.Errorf("change not attributed: %+v", c)
		}
	}
	rep, err = rec.Reconcile(context.Background(), TriggerStart, false)
	if err != nil || rep.Writes != 0 || len(rep.Changes) != 0 || rep.Repairs != 0 {
		t.Fatalf("second reconcile must be a no-op: %v writes=%d changes=%v", err, rep.Writes, rep.Changes)
	}
}

func TestReconcileIMDSErrorNeverDeletes(t *testing.T) {
	src, k := testWorld()
	rec := atOnce(NewReconciler(src, k, DefaultConfig()))
	if _, err := rec.Reconcile(context.Background(), TriggerStart, false); err != nil {
		t.Fatal(err)
	}
	before := k.obs.Owned
	// Another program deletes one rule of eni B; then IMDS fails.
	var lost netcfg.Rule
	for _, r := range k.obs.Owned.Rules {
		if r.Table == 20001 {
			lost = r
		}
	}
	k.obs.Owned.Rules = removeFunc(k.obs.Owned.Rules, func(r netcfg.Rule) bool { return r == lost })
	src.err = errors.New("connection refused")
	rep, err := rec.Reconcile(context.Background(), TriggerStart, false)
	if err != nil {
		t.Fatal(err)
	}
	if rep.IMDSError == "" || rep.OK() {
		t.Fatalf("IMDS failure not reported: %+v", rep)
	}
	for _, c := range rep.Changes {
		if c.Op.Delete {
			t.Errorf("deleted while IMDS failed: %s", c.Text)
		}
	}
	if !k.obs.Owned.Equal(before) {
		t.Errorf("drift not repaired from the last good snapshot:\n got %+v\nwant %+v", k.obs.Owned, before)
	}

	// A fresh daemon that never read IMDS changes nothing at all.
	_, k2 := testWorld()
	k2.obs.Owned = before
	rep, err = atOnce(NewReconciler(&fakeIMDS{err: errors.New("timeout")}, k2, DefaultConfig())).Reconcile(context.Background(), TriggerStart, false)
	if err != nil || len(rep.Changes) != 0 || len(k2.applied) != 0 {
		t.Fatalf("without any snapshot: err=%v changes=%v", err, rep.Changes)
	}
	if rep.Summary() == "" || rep.IMDSError == "" {
		t.Errorf("degraded report: %+v", rep)
	}
}

func TestReconcileNotReadyENIKeepsItsState(t *testing.T) {
	src, k := testWorld()
	rec := atOnce(NewReconciler(src, k, DefaultConfig()))
	if _, err := rec.Reconcile(context.Background(), TriggerStart, false); err != nil {
		t.Fatal(err)
	}
	configured := k.obs.Owned
	// IMDS glitch: eni B's device number reads 0 (not ready).
	src.snap.ENIs[1].Ready, src.snap.ENIs[1].DeviceNumber = false, 0
	rep, err := rec.Reconcile(context.Background(), TriggerStart, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Changes) != 0 || !k.obs.Owned.Equal(configured) {
		t.Fatalf("not-ready ENI changed state: %v", rep.Changes)
	}
	// The same glitch seen by a restarted daemon (no last good snapshot):
	// netcfg keeps the kernel objects of the not-ready ENI.
	rec2 := atOnce(NewReconciler(src, k, DefaultConfig()))
	rep, err = rec2.Reconcile(context.Background(), TriggerStart, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range rep.Changes {
		if c.Op.Delete {
			t.Errorf("restarted daemon deleted a not-ready ENI's object: %s", c.Text)
		}
	}
	// Detach (authoritative: IMDS no longer lists it) removes its state.
	src.snap.ENIs = src.snap.ENIs[:1:1]
	src.snap.ENIs = append(src.snap.ENIs, eni(macC, 2, "vpc-b", "10.1.1.10"))
	if _, err := rec.Reconcile(context.Background(), TriggerStart, false); err != nil {
		t.Fatal(err)
	}
	if n := rulesOf(k.obs.Owned, 20001); n != 0 {
		t.Errorf("detached ENI still has %d rules", n)
	}
	if n := rulesOf(k.obs.Owned, 20002); n == 0 {
		t.Errorf("remaining ENI lost its rules")
	}
}

func TestReconcileRefreshModes(t *testing.T) {
	src, k := testWorld()
	rec := atOnce(NewReconciler(src, k, DefaultConfig()))
	ctx := context.Background()
	reads := func() int { return src.reads + src.listings } // snapshots, refreshes and MAC listings
	if _, err := rec.Reconcile(ctx, event(rec), false); err != nil || reads() != 1 {
		t.Fatalf("first reconcile must read IMDS: reads=%d err=%v", reads(), err)
	}
	if _, err := rec.Reconcile(ctx, event(rec), false); err != nil || reads() != 1 {
		t.Fatalf("drift without new links must not read IMDS: reads=%d", reads())
	}
	k.obs.Links = append(k.obs.Links, netcfg.Link{Index: 9, Name: "eth3", MAC: "02:00:00:00:00:09"})
	rep, err := rec.Reconcile(ctx, event(rec), false)
	if err != nil || reads() != 2 {
		t.Fatalf("a new link must read IMDS: reads=%d", reads())
	}
	if len(rep.PendingLinks) != 1 || rep.PendingLinks[0].Index != 9 {
		t.Errorf("pending links = %+v, want eth3", rep.PendingLinks)
	}
	if _, err := rec.Reconcile(ctx, backingOff(rec), false); err != nil || reads() != 2 {
		t.Fatalf("an event while IMDS backs off read IMDS")
	}
}

func TestReconcileCountsRepairs(t *testing.T) {
	src, k := testWorld()
	rec := atOnce(NewReconciler(src, k, DefaultConfig()))
	ctx := context.Background()
	if rep, _ := rec.Reconcile(ctx, TriggerStart, false); rep.Repairs != 0 {
		t.Fatalf("first configuration counted as repairs: %d", rep.Repairs)
	}
	k.obs.Owned.Rules = removeFunc(k.obs.Owned.Rules, func(r netcfg.Rule) bool { return r.Table == 20002 })
	rep, _ := rec.Reconcile(ctx, event(rec), false)
	if rep.Repairs == 0 || rulesOf(k.obs.Owned, 20002) == 0 {
		t.Fatalf("deleted rule not repaired/counted: repairs=%d", rep.Repairs)
	}
	// Dry run: pending changes mark the ENI as drift.
	k.obs.Owned.Rules = removeFunc(k.obs.Owned.Rules, func(r netcfg.Rule) bool { return r.Table == 20002 })
	rep, _ = rec.Reconcile(ctx, TriggerStart, true)
	drift := false
	for _, e := range rep.ENIs {
		if e.MAC == macC && e.State == netcfg.ENIDrift {
			drift = true
		}
	}
	if !drift || len(rep.Changes) == 0 {
		t.Errorf("dry run: states %+v changes %v", rep.ENIs, rep.Changes)
	}
}

func TestSummary(t *testing.T) {
	rep := Report{HaveSnapshot: true, ENIs: []netcfg.ENIStatus{{State: netcfg.ENIConfigured}, {State: netcfg.ENIConfigured}, {State: netcfg.ENIWaitingIMDS}}}
	if got, want := rep.Summary(), "3 ENIs: 2 configured, 1 waiting for IMDS"; got != want {
		t.Errorf("Summary() = %q, want %q", got, want)
	}
	rep.IMDSError = "x"
	if got := rep.Summary(); got[:8] != "degraded" {
		t.Errorf("degraded summary = %q", got)
	}
}

func TestRepairBackoff(t *testing.T) {
	d := &Daemon{log: nopLogger()}
	var delays []time.Duration
	for range 10 {
		d.trackRepairs(Report{Repairs: 1}, d.log)
		delays = append(delays, d.repairDelay)
	}
	if delays[0] != 0 || delays[1] != time.Second || delays[2] != 2*time.Second {
		t.Errorf("backoff starts %v", delays[:3])
	}
	if last := delays[len(delays)-1]; last != maxRepairBackoff {
		t.Errorf("backoff ends at %v, want the cap %v", last, maxRepairBackoff)
	}
	// A calm minute resets it.
	d.lastRepair = time.Now().Add(-2 * calmAfter)
	d.trackRepairs(Report{}, d.log)
	if d.repairDelay != 0 || d.repairStreak != 0 {
		t.Errorf("backoff not reset after calm: %v", d.repairDelay)
	}
}

func nopLogger() *zap.Logger { return zap.NewNop() }

func (f *fakeIMDS) ListMACs(context.Context) ([]string, int, error) {
	f.listings++
	if f.listErr != nil {
		return nil, 1, f.listErr
	}
	var macs []string
	for _, e := range f.snap.ENIs {
		macs = append(macs, e.MAC)
	}
	return macs, 1, nil
}

// A link whose MAC the last snapshot does not list costs one MAC listing,
// not a snapshot; a snapshot follows only when the listing names a new MAC
// or a link's MAC is listed as not ready. A failed listing is an IMDS error
// (nothing deleted).
func TestReconcileListsMACsBeforeSnapshotForUnknownLinks(t *testing.T) {
	src, k := testWorld()
	enis := src.snap.ENIs
	src.snap.ENIs = enis[:2] // IMDS does not know C yet
	k.obs.Links = k.obs.Links[:3]
	rec := atOnce(NewReconciler(src, k, DefaultConfig()))
	ctx := context.Background()
	if _, err := rec.Reconcile(ctx, TriggerStart, false); err != nil {
		t.Fatal(err)
	}
	reconcile := func(trigger Trigger) Report {
		t.Helper()
		rep, err := rec.Reconcile(ctx, trigger, false)
		if err != nil {
			t.Fatal(err)
		}
		return rep
	}
	check := func(step string, rep Report, snapshots, listings int) {
		t.Helper()
		if src.reads != snapshots || src.listings != listings {
			t.Errorf("%s: %d snapshots and %d listings so far, want %d and %d", step, src.reads, src.listings, snapshots, listings)
		}
		for _, c := range rep.Changes {
			if c.Op.Delete {
				t.Errorf("%s: deleted %s", step, c)
			}
		}
	}

	veth := netcfg.Link{Index: 10, Name: "veth1a2b", MAC: "0a:58:0a:f4:00:01"}
	k.obs.Links = append(k.obs.Links, veth)
	rep := reconcile(event(rec))
	check("container veth", rep, 1, 1)
	if !rep.Listed || rep.Fresh || rep.IMDSRequests != 1 || len(rep.PendingLinks) != 1 {
		t.Errorf("container veth: listed %v, fresh %v, %d requests, pending %v; want a listing of 1 request, veth pending",
			rep.Listed, rep.Fresh, rep.IMDSRequests, rep.PendingLinks)
	}
	rep = reconcile(event(rec))
	check("an event on a link already listed", rep, 1, 1)
	rep = reconcile(TriggerRecheck)
	check("a re-read for the pending veth", rep, 1, 2)

	// The ENI's link appears before IMDS lists it: listings only, until
	// the listing names its MAC.
	k.obs.Links = append(k.obs.Links, netcfg.Link{Index: 4, Name: "eth2", MAC: macC})
	rep = reconcile(event(rec))
	check("hot-attached link unknown to IMDS", rep, 1, 3)
	src.snap.ENIs, src.snap.Requests = enis, 40
	rep = reconcile(TriggerRecheck)
	check("IMDS lists the new MAC", rep, 2, 4)
	if !rep.Fresh || rep.IMDSRequests != 1+40 || rulesOf(k.obs.Owned, netcfg.DefaultTableBase+2) == 0 {
		t.Errorf("after IMDS listed C: fresh %v, %d requests, rules of C %d; want a snapshot that configures C",
			rep.Fresh, rep.IMDSRequests, rulesOf(k.obs.Owned, netcfg.DefaultTableBase+2))
	}

	// A MAC listed but not ready costs a snapshot on each re-read (IMDS is
	// catching up with a real ENI).
	notReady := eni("02:00:00:00:00:03", 3, "vpc-b", "10.1.2.10")
	notReady.Ready, notReady.DeviceNumber = false, imds.DeviceNumberUnknown
	src.snap.ENIs = append(append([]imds.ENI(nil), enis...), notReady)
	reconcile(TriggerStart)
	k.obs.Links = append(k.obs.Links, netcfg.Link{Index: 5, Name: "eth3", MAC: notReady.MAC})
	rep = reconcile(event(rec))
	check("link of a not-ready ENI", rep, 4, 4)
	rep = reconcile(TriggerRecheck)
	check("re-read for the not-ready ENI", rep, 5, 4)

	// A failed listing is an IMDS error: no snapshot, nothing deleted.
	src.listErr = errors.New("IMDS down")
	k.obs.Links = append(k.obs.Links, netcfg.Link{Index: 11, Name: "veth3c4d", MAC: "0a:58:0a:f4:00:02"})
	rep = reconcile(event(rec))
	check("listing fails", rep, 5, 5)
	if rep.IMDSError == "" || rep.Listed || rep.Fresh {
		t.Errorf("failed listing: IMDSError %q, listed %v, fresh %v; want an IMDS error", rep.IMDSError, rep.Listed, rep.Fresh)
	}
}

// detachingKernel is a fakeKernel whose link goes away during Apply, with
// every address and route on it, as when an ENI is detached right after it
// was attached; dropRule makes one rule add not stick (a foreign twin).
type detachingKernel struct {
	*fakeKernel
	link     int
	dropRule netip.Prefix
}

func (k *detachingKernel) Apply(p netcfg.Plan) (int, error) {
	n, err := k.fakeKernel.Apply(p)
	st := &k.obs.Owned
	k.obs.Links = removeFunc(k.obs.Links, func(l netcfg.Link) bool { return l.Index == k.link })
	delete(k.obs.Addrs, k.link)
	st.Addrs = removeFunc(st.Addrs, func(a netcfg.Addr) bool { return a.LinkIndex == k.link })
	st.Routes = removeFunc(st.Routes, func(r netcfg.Route) bool { return r.LinkIndex == k.link })
	st.Rules = removeFunc(st.Rules, func(r netcfg.Rule) bool { return r.Src == k.dropRule })
	return n, err
}

// Adds that vanished with their link are not blocked by anybody: they must
// not be reported as blocked (nor skipped later), while an add that did
// not stick on a link still there is.
func TestReconcileAddsGoneWithTheirLinkAreNotBlocked(t *testing.T) {
	src, fk := testWorld()
	k := &detachingKernel{fakeKernel: fk, link: 4, dropRule: netip.MustParsePrefix("10.1.0.10/32")}
	rec := atOnce(NewReconciler(src, k, DefaultConfig()))
	rep, err := rec.Reconcile(context.Background(), TriggerStart, false)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Blocked != 1 || rec.Blocked() != 1 {
		t.Errorf("blocked %d (reconciler holds %d), want 1: only eth1's rule that did not stick, not eth2's objects that left with their link",
			rep.Blocked, rec.Blocked())
	}
}

// Desired's result is reused only while its inputs are the same: a link
// appearing with the same snapshot must be configured.
func TestReconcileComputesDesiredAgainWhenTheKernelChanged(t *testing.T) {
	src, k := testWorld()
	linkC := k.obs.Links[3]
	k.obs.Links = k.obs.Links[:3]
	rec := atOnce(NewReconciler(src, k, DefaultConfig()))
	ctx := context.Background()
	for _, trigger := range []Trigger{TriggerStart, backingOff(rec)} {
		if _, err := rec.Reconcile(ctx, trigger, false); err != nil {
			t.Fatal(err)
		}
	}
	if n := rulesOf(k.obs.Owned, netcfg.DefaultTableBase+2); n != 0 {
		t.Fatalf("ENI C has %d rules before its link exists", n)
	}
	k.obs.Links = append(k.obs.Links, linkC)
	rep, err := rec.Reconcile(ctx, backingOff(rec), false)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Fresh || rulesOf(k.obs.Owned, netcfg.DefaultTableBase+2) == 0 {
		t.Errorf("after C's link appeared: fresh %v, %d rules for C; want C configured from the same snapshot",
			rep.Fresh, rulesOf(k.obs.Owned, netcfg.DefaultTableBase+2))
	}
}

// quietKernel is a fakeKernel that tells its Reconciler, as the daemon's
// kernel feed does, of every change: its own writes, and the test's.
type quietKernel struct {
	*fakeKernel
	rec      *Reconciler // nil: nobody is told
	observes int
}

func (k *quietKernel) Observe() (netcfg.Observed, error) {
	k.observes++
	return k.fakeKernel.Observe()
}

func (k *quietKernel) Apply(p netcfg.Plan) (int, error) {
	if k.rec != nil {
		defer k.rec.KernelChanged()
	}
	return k.fakeKernel.Apply(p)
}

// A poll reuses the last no-op's observation while the kernel reports no
// change, and dumps again after any change, after its own writes, on
// events, and on every full poll. A Reconciler never told of changes never
// reuses it.
func TestReconcilePollReusesQuietObservation(t *testing.T) {
	src, fk := testWorld()
	k := &quietKernel{fakeKernel: fk}
	rec := atOnce(NewReconciler(src, k, DefaultConfig()))
	k.rec = rec
	ctx := context.Background()
	step := func(name string, trigger Trigger, wantObserves int) Report {
		t.Helper()
		before := k.observes
		rep, err := rec.Reconcile(ctx, trigger, false)
		if err != nil {
			t.Fatal(err)
		}
		if got := k.observes - before; got != wantObserves {
			t.Errorf("%s: %d kernel observations, want %d", name, got, wantObserves)
		}
		return rep
	}
	rec.KernelChanged() // the feed starts
	step("start (configures, then reads its adds back)", TriggerStart, 2)
	step("poll after our writes", TriggerPoll, 1)
	step("quiet poll", TriggerPoll, 0)
	step("another quiet poll", TriggerPoll, 0)
	step("netlink event", TriggerAddr, 1)
	step("quiet poll after a no-op event", TriggerPoll, 0)

	// Another program deletes one of our rules: the kernel says so.
	k.obs.Owned.Rules = k.obs.Owned.Rules[1:]
	rec.KernelChanged()
	rep := step("poll after drift (and the read-back of its add)", TriggerPoll, 2)
	if rep.Writes != 1 {
		t.Errorf("poll after drift: %d writes, want the rule back", rep.Writes)
	}
	step("poll after the repair", TriggerPoll, 1)
	for i := 0; rec.imds.polls%FullReadEvery != FullReadEvery-1; i++ {
		step("quiet poll", TriggerPoll, 0)
	}
	step("full poll", TriggerPoll, 1)

	// Without a kernel feed, nothing says the kernel stayed quiet.
	src2, fk2 := testWorld()
	k = &quietKernel{fakeKernel: fk2}
	rec = atOnce(NewReconciler(src2, k, DefaultConfig()))
	step("start without a feed", TriggerStart, 2)
	step("poll without a feed", TriggerPoll, 1)
	step("another poll without a feed", TriggerPoll, 1)
}

// TestAwaitDHCP walks one link through its life: waited for during the
// grace, the client's once its lease was seen (after the grace and with
// the lease dropped included), forgotten when it goes; a link that never
// had a lease is waited for during the grace only.
func TestAwaitDHCP(t *testing.T) {
	const mac, other = "02:00:00:00:00:03", "02:00:00:00:00:04"
	primary := netip.MustParseAddr("10.3.1.10")
	snap := imds.Snapshot{ENIs: []imds.ENI{
		{MAC: mac, LocalIPv4s: []netip.Addr{primary}},
		{MAC: other, LocalIPv4s: []netip.Addr{netip.MustParseAddr("10.4.1.10")}},
	}}
	links := []netcfg.Link{{Index: 5, Name: "eth3", MAC: mac}, {Index: 6, Name: "eth4", MAC: other}}
	lease := []netcfg.KernelAddr{{LinkIndex: 5, Prefix: netip.PrefixFrom(primary, 24), Dynamic: true}}
	static := []netcfg.KernelAddr{{LinkIndex: 6, Prefix: netip.MustParsePrefix("10.4.1.10/24")}} // permanent, an administrator's: not a lease
	r := &Reconciler{cfg: Config{DHCPGrace: 3 * time.Second}}
	t0 := time.Now()
	for _, step := range []struct {
		name  string
		at    time.Duration
		links []netcfg.Link
		addrs []netcfg.KernelAddr
		want  map[int]bool
	}{
		{"links appear", 0, links, static, map[int]bool{5: true, 6: true}},
		{"lease in the grace", time.Second, links, append(lease, static...), map[int]bool{5: true, 6: true}},
		{"lease after the grace", 4 * time.Second, links, append(lease, static...), map[int]bool{5: true}},
		{"lease dropped", 5 * time.Second, links, static, map[int]bool{5: true}},
		{"eth3 gone", 6 * time.Second, links[1:], static, nil},
		{"eth3 back, new index", 7 * time.Second, []netcfg.Link{{Index: 7, Name: "eth3", MAC: mac}, links[1]}, static, map[int]bool{7: true}},
		{"eth3's grace over", 11 * time.Second, []netcfg.Link{{Index: 7, Name: "eth3", MAC: mac}, links[1]}, static, nil},
	} {
		r.seeLinks(step.links, t0.Add(step.at))
		got := r.awaitDHCP(netcfg.Observed{Links: step.links, ForeignAddrs: step.addrs}, snap, t0.Add(step.at))
		if len(got) != len(step.want) || !maps.Equal(got, step.want) {
			t.Errorf("%s: waiting on %v, want %v", step.name, got, step.want)
		}
	}
	if len(r.leased) != 0 {
		t.Errorf("the gone link's lease is still recorded: %v", r.leased)
	}
}
