package agent

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
	"github.com/dualhomed/dualhomed/netcfg"
)

// refreshWorld is a Reconciler reading the IMDS emulator through the real
// client, with an in-memory kernel whose links match the instance.
func refreshWorld(t *testing.T, inst emulator.Instance) (*emulator.Server, *imds.Client, *fakeKernel, *Reconciler) {
	t.Helper()
	srv := emulator.New(inst)
	url, err := srv.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	client, err := imds.New(imds.Options{Endpoint: url, MaxRequestsPerSecond: -1})
	if err != nil {
		t.Fatal(err)
	}
	k := &fakeKernel{obs: netcfg.Observed{Addrs: map[int][]netip.Prefix{}}}
	for i, e := range inst.ENIs {
		k.obs.Links = append(k.obs.Links, netcfg.Link{Index: 10 + i, Name: "eth" + string(rune('0'+i)), MAC: e.MAC})
	}
	return srv, client, k, atOnce(NewReconciler(client, k, DefaultConfig()))
}

func mustReconcile(t *testing.T, rec *Reconciler, trigger Trigger) Report {
	t.Helper()
	rep, err := rec.Reconcile(context.Background(), trigger, false)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("reconcile not OK: %s (IMDS: %s, apply: %s)", rep.Summary(), rep.IMDSError, rep.ApplyError)
	}
	return rep
}

func hasRuleFrom(st netcfg.State, src netip.Addr, table int) bool {
	for _, r := range st.Rules {
		if r.Src == netip.PrefixFrom(src, src.BitLen()) && r.Table == table {
			return true
		}
	}
	return false
}

// The poll reads only what changes while ENIs stay attached, sees such a
// change at once, and takes a full snapshot every FullReadEvery polls.
func TestReconcilePollReadsDynamicKeysAndSometimesAll(t *testing.T) {
	inst := emulator.ExampleInstance(4, 3, 2, 1, 1)
	srv, _, k, rec := refreshWorld(t, inst)
	full := mustReconcile(t, rec, TriggerStart).IMDSRequests

	added := netip.MustParseAddr("10.2.0.99")
	if err := srv.UpdateENI(inst.ENIs[2].MAC, func(e *imds.ENI) { e.LocalIPv4s = append(e.LocalIPv4s, added) }); err != nil {
		t.Fatal(err)
	}
	rep := mustReconcile(t, rec, TriggerPoll)
	if rep.IMDSRequests >= full-len(inst.ENIs) {
		t.Errorf("poll: %d requests, want well under a snapshot's %d", rep.IMDSRequests, full)
	}
	table := netcfg.DefaultTableBase + inst.ENIs[2].DeviceNumber
	if !hasRuleFrom(k.obs.Owned, added, table) {
		t.Errorf("poll did not add the rule for the new secondary IP %s (table %d)", added, table)
	}
	requests := []int{rep.IMDSRequests}
	for range FullReadEvery {
		requests = append(requests, mustReconcile(t, rec, TriggerPoll).IMDSRequests)
	}
	fulls := 0
	for _, n := range requests {
		if n >= full-1 { // a full read; its token may be cached (one request less)
			fulls++
		}
	}
	if fulls != 1 {
		t.Errorf("%d polls cost %v requests: want exactly one full read among them (a snapshot costs %d)", len(requests), requests, full)
	}
}

// A hot-attached ENI costs the MAC listing and its own keys, not a snapshot
// of every ENI, and is configured; the others keep their state.
func TestReconcileHotAttachReadsOnlyTheNewENI(t *testing.T) {
	inst := emulator.ExampleInstance(6, 20, 20, 2, 1)
	all := inst.ENIs
	inst.ENIs = all[:5]
	srv, _, k, rec := refreshWorld(t, inst)
	full := mustReconcile(t, rec, TriggerStart).IMDSRequests
	before := len(k.obs.Owned.Rules)

	if err := srv.AttachENI(all[5]); err != nil {
		t.Fatal(err)
	}
	k.obs.Links = append(k.obs.Links, netcfg.Link{Index: 30, Name: "eth5", MAC: all[5].MAC})
	rep := mustReconcile(t, rec, event(rec))
	if rep.IMDSRequests > full/len(inst.ENIs)+2 {
		t.Errorf("hot attach: %d requests; want about one ENI's share of a %d-request snapshot", rep.IMDSRequests, full)
	}
	table := netcfg.DefaultTableBase + all[5].DeviceNumber
	if !hasRuleFrom(k.obs.Owned, all[5].LocalIPv4s[0], table) {
		t.Errorf("hot-attached ENI not configured: no rule from %s in table %d", all[5].LocalIPv4s[0], table)
	}
	for _, c := range rep.Changes {
		if c.Op.Delete {
			t.Errorf("hot attach deleted %s", c)
		}
	}
	if got, want := len(k.obs.Owned.Rules), before+rulesOf(k.obs.Owned, table); got != want {
		t.Errorf("%d rules after the attach, want %d (the others' %d plus the new ENI's)", got, want, before)
	}
}

// An ENI detached and attached again at another device index comes back
// as a new link with a MAC IMDS already had: it is read in full, so its new
// device number (and table) is used, not the remembered one.
func TestReconcileReattachedENIIsReadInFull(t *testing.T) {
	inst := emulator.ExampleInstance(3, 2, 0, 0, 1)
	srv, _, k, rec := refreshWorld(t, inst)
	mustReconcile(t, rec, TriggerStart)
	mac := inst.ENIs[2].MAC
	if err := srv.UpdateENI(mac, func(e *imds.ENI) { e.DeviceNumber = 7 }); err != nil {
		t.Fatal(err)
	}
	k.obs.Links[2].Index = 40 // the link came back with a new index
	mustReconcile(t, rec, event(rec))
	if !hasRuleFrom(k.obs.Owned, inst.ENIs[2].LocalIPv4s[0], netcfg.DefaultTableBase+7) {
		t.Errorf("re-attached ENI not configured with its new device number 7: rules %v", k.obs.Owned.Rules)
	}
}

// Device 0 on a card other than 0 is configured at once, but IMDS may be
// answering a 0 it has not corrected yet: the link stays pending and its
// MAC is re-read in full on the quick schedule, so a lagging 0 is
// corrected within seconds (the configuration moves to the real table), and
// a true 0 is trusted once the re-reads are done.
func TestReconcileRereadsDeviceZeroOnOtherCards(t *testing.T) {
	all := emulator.ExampleInstance(4, 1, 0, 0, 2) // card 0: devices 0, 1; card 1: devices 0, 1
	for _, lagging := range []bool{false, true} {
		inst := all
		inst.ENIs = []imds.ENI{all.ENIs[0], all.ENIs[1]} // the primary, card 1 device 0
		if lagging {
			inst.ENIs[1] = all.ENIs[3] // card 1 device 1, answered as device 0 at first
		}
		srv, _, k, rec := refreshWorld(t, inst)
		e := inst.ENIs[1]
		if lagging {
			if err := srv.SetFaults(emulator.Faults{DeviceNumberZeroReads: map[string]int{e.MAC: 1}}); err != nil {
				t.Fatal(err)
			}
		}
		card1 := netcfg.DefaultTableBase + netcfg.DefaultCardStride
		rep := mustReconcile(t, rec, TriggerStart)
		if !hasRuleFrom(k.obs.Owned, e.LocalIPv4s[0], card1) || len(rep.PendingLinks) != 1 {
			t.Fatalf("lagging %v: device 0 on card 1 not configured in table %d at once, or not pending (%v): rules %v",
				lagging, card1, rep.PendingLinks, k.obs.Owned.Rules)
		}
		rereads := 0
		for rec.imds.next(time.Now()) > 0 && rereads < 10 { // as the daemon schedules them
			mustReconcile(t, rec, TriggerRecheck)
			rereads++
		}
		want, wantRereads := card1, maxLinkRetries-1 // a true 0: re-read until trusted
		if lagging {
			want, wantRereads = card1+1, 1 // corrected by the first re-read
		}
		if rereads != wantRereads || !hasRuleFrom(k.obs.Owned, e.LocalIPv4s[0], want) || len(k.obs.Owned.Rules) != rulesOf(k.obs.Owned, want) {
			t.Errorf("lagging %v: after %d re-reads (want %d) rules %v, want the ENI's in table %d only",
				lagging, rereads, wantRereads, k.obs.Owned.Rules, want)
		}
		if rep, _ = rec.Reconcile(context.Background(), TriggerRecheck, false); len(rep.PendingLinks) != 0 || rep.Fresh {
			t.Errorf("lagging %v: once trusted, a recheck read IMDS (fresh %v) or found links pending %v", lagging, rep.Fresh, rep.PendingLinks)
		}
	}
}
