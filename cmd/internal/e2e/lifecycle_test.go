package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// Scenario 4: a hot-attached ENI (IMDS lists it, then its link appears) is
// reachable from its VPC without waiting for the poll timer (one hour here).
func TestHotAttachWithoutWaitingForThePoll(t *testing.T) {
	w := newWorld(t)
	startDualhomed(t, w, time.Hour)
	// A real attach comes long after the daemon's start; the daemon spaces
	// the IMDS reads that new links cause at least 1s apart, so attaching
	// right after the start would measure that spacing, not the reaction.
	time.Sleep(1500 * time.Millisecond)
	eth3 := w.ENI("eth3")
	arrived, err := w.HotAttach(eth3)
	if err != nil {
		t.Fatal(err)
	}
	p := probe{"VPC D client -> hot-attached eth3 " + eth3.Primary4().String(), eth3.VPC.Client, eth3.Primary4()}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// The kernel's view, polled alongside: when our rules and table were in place.
	configured := make(chan time.Duration, 1)
	go func() {
		if simworld.WaitFor(ctx, func() error { return w.ConfiguredCheck(eth3) }) == nil {
			configured <- time.Since(arrived)
		}
		close(configured)
	}()
	err = simworld.WaitFor(ctx, func() error { return p.tcp(25 * time.Millisecond) })
	took := time.Since(arrived)
	if err != nil {
		t.Fatalf("%s: no reply %s after the link arrived (poll interval 1h): %v", p, took, err)
	}
	t.Logf("hot attach: eth3's rules and table in place %s, first TCP reply %s after its link arrived (poll interval 1h)",
		(<-configured).Round(time.Millisecond), took.Round(time.Millisecond))
	expectAllWork(t, clientProbes(w, "eth1", "eth2", "eth3"))
}

// Scenario 5: unassigning eth1's secondary IPs removes their rules and the
// addresses dualhomed added; detaching eth1 then removes its rules (IPv4 and
// IPv6), its table's routes and its main-table VPC routes. Nothing else in
// the instance changes at either step.
func TestDetachRemovesOnlyThatENIsState(t *testing.T) {
	w := newWorld(t)
	needBinaries(t)
	if err := w.StartIMDS(); err != nil {
		t.Fatal(err)
	}
	eth1 := w.ENI("eth1")
	if err := w.AddIP(eth1, netip.MustParseAddr("10.1.1.11")); err != nil {
		t.Fatal(err)
	}
	if err := w.AddIP(eth1, netip.MustParseAddr("fd00:b:0:1::11")); err != nil {
		t.Fatal(err)
	}
	d := startDualhomed(t, w, time.Second)

	// First a secondary IP of each family goes (unassigned in IMDS, the link
	// stays): its rule and the address dualhomed added go, nothing else.
	withSecondaries, err := simworld.DumpState(w.Instance)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"10.1.1.11", "fd00:b:0:1::11"} {
		if err := w.RemoveIP(eth1, netip.MustParseAddr(a)); err != nil {
			t.Fatal(err)
		}
	}
	before := waitDump(t, d, w, func(dump simworld.Dump) error {
		if left := append(dump.Grep("10.1.1.11"), dump.Grep("fd00:b:0:1::11")...); len(left) > 0 {
			return fmt.Errorf("unassigned secondary IPs still in the kernel: %q", left)
		}
		return nil
	})
	removed, added := withSecondaries.Diff(before)
	if len(added) > 0 {
		t.Errorf("unassigning secondary IPs added state:\n%s", strings.Join(added, "\n"))
	}
	if len(removed) < 4 {
		t.Errorf("unassigning secondary IPs removed only %q; want at least their 2 rules and 2 addresses", removed)
	}
	for _, l := range removed {
		if !strings.Contains(l, "10.1.1.11") && !strings.Contains(l, "fd00:b:0:1::11") {
			t.Errorf("unassigning secondary IPs removed something else: %s", l)
		}
	}
	expectAllWork(t, clientProbes(w, "eth1"))

	// Then the whole ENI goes.
	eth1Rules := append(before.Grep("rule", "from 10.1.1.1"), before.Grep("rule", "from fd00:b:0:1::1")...)
	if len(eth1Rules) != 2 {
		t.Fatalf("want a source rule for each of eth1's 2 remaining addresses, got %q", eth1Rules)
	}
	table := lookupTable(t, eth1Rules[0])
	if err := w.Detach(eth1); err != nil {
		t.Fatal(err)
	}
	after := waitDump(t, d, w, func(dump simworld.Dump) error {
		if left := append(dump.Grep("from 10.1.1.1"), dump.Grep("from fd00:b:0:1::1")...); len(left) > 0 {
			return fmt.Errorf("rules left: %q", left)
		}
		if left := dump.Grep("table " + table + " "); len(left) > 0 {
			return fmt.Errorf("routes left in table %s: %q", table, left)
		}
		return nil
	})
	removed, added = before.Diff(after)
	if len(added) > 0 {
		t.Errorf("detach added state:\n%s", strings.Join(added, "\n"))
	}
	for _, l := range removed {
		if !strings.Contains(l, "eth1") && !strings.Contains(l, "10.1.1.") && !strings.Contains(l, "fd00:b:0:1:") && !strings.Contains(l, "table "+table+" ") {
			t.Errorf("detach removed state that was not eth1's: %s", l)
		}
	}
	t.Logf("detach removed %d lines of eth1 state, added none", len(removed))
	expectAllWork(t, clientProbes(w, "eth0", "eth2"))
	expectInSync(t, w)
}

// Scenario 5b: a detached ENI's rules go as soon as its link does, without
// an IMDS read (poll interval one hour): the kernel dropped the table's
// routes with the link. A foreign rule pointing at the same table stays, and
// the rules come back when the ENI is attached again.
func TestDetachedLinksRulesGoWithoutIMDS(t *testing.T) {
	w := newWorld(t)
	eth1 := w.ENI("eth1")
	d := startDualhomed(t, w, time.Hour)
	table, others := eth1Table(t, w)
	if _, err := w.Instance.IP("rule", "add", "from", "192.0.2.99", "lookup", strconv.Itoa(table), "priority", "20001", "protocol", "static"); err != nil {
		t.Fatal(err)
	}
	// Let the reconcile the foreign rule's event triggers pass first.
	time.Sleep(200 * time.Millisecond)
	// Detach returns once the kernel deleted the link (the veth's deletion
	// waits for the network stack to let go of it): the 1 s count starts
	// there, the logged figure at the call.
	detach := time.Now()
	if err := w.Detach(eth1); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := simworld.WaitFor(ctx, func() error {
		if left, _ := eth1Rules(t, w, table); len(left) > 0 {
			return fmt.Errorf("rules of ours still point at table %d: %q", table, left)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("within 1s of eth1's removal (poll interval 1h): %v", err)
	}
	t.Logf("eth1's rules gone %s after the detach began", time.Since(detach).Round(time.Millisecond))
	rules, err := w.Instance.NL.RuleList(netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(rules, func(r netlink.Rule) bool {
		return r.Table == table && r.Src != nil && r.Src.IP.String() == "192.0.2.99"
	}) {
		t.Errorf("the foreign rule pointing at table %d went too: %v", table, rules)
	}
	if _, rest := eth1Rules(t, w, table); !slices.Equal(rest, others) {
		t.Errorf("the other ENIs' rules changed: %q, want %q", rest, others)
	}
	if _, err := w.HotAttach(eth1); err != nil {
		t.Fatal(err)
	}
	waitConfigured(t, w, d, "eth1", "eth2")
	expectAllWork(t, clientProbes(w, "eth1", "eth2"))
}

// eth1Table returns the table of eth1's rules, and the other rules of ours.
func eth1Table(t *testing.T, w *simworld.World) (table int, others []string) {
	t.Helper()
	rules, err := w.OurRules()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if r.Src != nil && r.Src.IP.Equal(w.ENI("eth1").Primary4().AsSlice()) {
			table = r.Table
		}
	}
	if table == 0 {
		t.Fatalf("no rule of ours for eth1: %v", rules)
	}
	_, others = eth1Rules(t, w, table)
	return table, others
}

// eth1Rules returns our rules pointing at table, and our other rules.
func eth1Rules(t *testing.T, w *simworld.World, table int) (in, others []string) {
	t.Helper()
	rules, err := w.OurRules()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		s := fmt.Sprintf("prio %d from %v table %d", r.Priority, r.Src, r.Table)
		if r.Table == table {
			in = append(in, s)
		} else {
			others = append(others, s)
		}
	}
	return in, others
}

// waitDump waits up to 15s for the instance's state to satisfy cond, and returns it.
func waitDump(t *testing.T, d *simworld.Proc, w *simworld.World, cond func(simworld.Dump) error) simworld.Dump {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var dump simworld.Dump
	err := simworld.WaitFor(ctx, func() error {
		if done, err := d.Exited(); done {
			return fmt.Errorf("dualhomed exited: %v", err)
		}
		var err error
		if dump, err = simworld.DumpState(w.Instance); err != nil {
			return err
		}
		return cond(dump)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dump
}

// lookupTable returns N from a rule line "... lookup N ...".
func lookupTable(t *testing.T, rule string) string {
	t.Helper()
	f := strings.Fields(rule)
	i := slices.Index(f, "lookup")
	if i < 0 || i+1 >= len(f) {
		t.Fatalf("no table in rule %q", rule)
	}
	if _, err := strconv.Atoi(f[i+1]); err != nil {
		t.Fatalf("table in rule %q is not a number", rule)
	}
	return f[i+1]
}

// Scenario 6: drift. Our rules deleted with `ip rule del` and our table
// flushed with `ip route flush table` come back (from netlink events: the
// poll timer is one hour); foreign rules, even in our band and pointing at
// our table, are never touched.
func TestDriftIsRepairedForeignRulesUntouched(t *testing.T) {
	w := newWorld(t)
	for _, r := range [][]string{
		{"rule", "add", "from", "192.0.2.98", "lookup", "100", "priority", "1000"},
		{"rule", "add", "from", "192.0.2.99", "lookup", "20001", "priority", "20001"},
		{"-6", "rule", "add", "from", "2001:db8::99", "lookup", "20001", "priority", "20001"},
	} {
		if _, err := w.Instance.IP(r...); err != nil {
			t.Fatal(err)
		}
	}
	startDualhomed(t, w, time.Hour)
	want, err := simworld.DumpState(w.Instance)
	if err != nil {
		t.Fatal(err)
	}
	eth1 := w.ENI("eth1")
	rules := want.Grep("rule", "from "+eth1.Primary4().String()+" ")
	rules6 := want.Grep("rule", "from "+eth1.IPv6s()[0].String()+" ")
	if len(rules) != 1 || len(rules6) != 1 {
		t.Fatalf("want one rule of ours for each eth1 address, got %q %q", rules, rules6)
	}
	table := lookupTable(t, rules[0])
	for _, cmd := range [][]string{
		{"rule", "del", "from", eth1.Primary4().String(), "lookup", table},
		{"-6", "rule", "del", "from", eth1.IPv6s()[0].String(), "lookup", table},
		{"route", "flush", "table", table},
		{"-6", "route", "flush", "table", table},
	} {
		if _, err := w.Instance.IP(cmd...); err != nil {
			t.Fatal(err)
		}
		t.Logf("drift: ip %s", strings.Join(cmd, " "))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var got simworld.Dump
	err = simworld.WaitFor(ctx, func() error {
		got, err = simworld.DumpState(w.Instance)
		if err != nil {
			return err
		}
		if removed, added := want.Diff(got); len(removed)+len(added) > 0 {
			return fmt.Errorf("missing %q, extra %q", removed, added)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("drift not repaired to the exact state before (poll interval 1h): %v", err)
	}
	expectAllWork(t, clientProbes(w, "eth1"))
}

// Scenario 7: SIGTERM and a new start of the daemon while a ping and a TCP
// stream run through eth1: no packet lost, the stream unbroken, no rule twice.
func TestRestartLosesNoPacket(t *testing.T) {
	w := newWorld(t)
	d := startDualhomed(t, w, time.Second)
	rulesBefore := ourRules(t, w)
	b, eth1 := w.VPCs["B"], w.ENI("eth1")
	var streams []*simworld.Stream
	for _, a := range []netip.Addr{eth1.Primary4(), eth1.IPv6s()[0]} {
		s, err := simworld.StartStream(b.Client, netip.AddrPortFrom(a, simworld.EchoPort), 20*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s)
	}
	var wg sync.WaitGroup
	// VPC B's client (IPv4, IPv6) and the on-premises client, whose replies
	// only the source rule brings back.
	pingers := []struct {
		from *simworld.NS
		dst  netip.Addr
	}{{b.Client, eth1.Primary4()}, {b.Client, eth1.IPv6s()[0]}, {b.OnPrem, eth1.Primary4()}}
	pings := make([]simworld.PingResult, len(pingers))
	pingErrs := make([]error, len(pingers))
	for i, p := range pingers {
		wg.Go(func() {
			// ping -i 0.05 -c 80: four seconds around the restart.
			pings[i], pingErrs[i] = simworld.PingRun(context.Background(), p.from, p.dst, 80, 50*time.Millisecond, 2*time.Second)
		})
	}
	time.Sleep(time.Second)
	if err := d.Stop(10 * time.Second); err != nil {
		t.Errorf("dualhomed did not stop cleanly on SIGTERM: %v", err)
	}
	time.Sleep(300 * time.Millisecond)
	d2, err := w.StartDaemon(simworld.DaemonOptions{PollInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	waitConfigured(t, w, d2, "eth1", "eth2")
	wg.Wait()
	var rounds [2]int
	for i, s := range streams {
		var err error
		if rounds[i], err = s.Stop(); err != nil {
			t.Errorf("TCP stream %d through eth1 broke across the restart after %d round trips: %v", i, rounds[i], err)
		}
	}
	for i, r := range pings {
		if pingErrs[i] != nil || r.Received != r.Sent {
			t.Errorf("ping %d: %d/%d replies, lost seq %v (%v)", i, r.Received, r.Sent, r.Lost, pingErrs[i])
		}
	}
	t.Logf("across the restart: IPv4 ping %d/%d, IPv6 ping %d/%d, on-premises ping %d/%d, TCP streams IPv4 %d and IPv6 %d round trips",
		pings[0].Received, pings[0].Sent, pings[1].Received, pings[1].Sent, pings[2].Received, pings[2].Sent, rounds[0], rounds[1])
	// Give the new daemon a poll to add anything twice, if it would.
	time.Sleep(1500 * time.Millisecond)
	if rulesAfter := ourRules(t, w); !slices.Equal(rulesBefore, rulesAfter) {
		t.Errorf("rules changed across the restart:\nbefore %q\nafter  %q", rulesBefore, rulesAfter)
	}
	expectInSync(t, w)
}

// ourRules returns our rules as sorted strings, failing t on a duplicate.
func ourRules(t *testing.T, w *simworld.World) []string {
	t.Helper()
	rules, err := w.OurRules()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range rules {
		out = append(out, fmt.Sprintf("prio %d from %v table %d", r.Priority, r.Src, r.Table))
	}
	slices.Sort(out)
	for i := 1; i < len(out); i++ {
		if out[i] == out[i-1] {
			t.Errorf("duplicate rule: %s", out[i])
		}
	}
	return out
}

// Scenario 8: `dualhomed cleanup` brings rules, the routes of every table,
// addresses and rp_filter back to exactly what they were before the daemon
// first ran.
func TestCleanupRestoresTheStateBeforeDualhomed(t *testing.T) {
	w := newWorld(t)
	needBinaries(t)
	if err := w.StartIMDS(); err != nil {
		t.Fatal(err)
	}
	if err := w.AddIP(w.ENI("eth1"), netip.MustParseAddr("10.1.1.11")); err != nil {
		t.Fatal(err)
	}
	if err := w.AddIP(w.ENI("eth1"), netip.MustParseAddr("fd00:b:0:1::11")); err != nil {
		t.Fatal(err)
	}
	// Strict on eth1, as an administrator may have set it: dualhomed makes it
	// loose (its default) and cleanup must put strict back.
	if err := w.Instance.SetSysctl("net/ipv4/conf/eth1/rp_filter", "1"); err != nil {
		t.Fatal(err)
	}
	pristine, err := simworld.DumpState(w.Instance)
	if err != nil {
		t.Fatal(err)
	}
	d := startDualhomed(t, w, time.Second)
	configured, err := simworld.DumpState(w.Instance)
	if err != nil {
		t.Fatal(err)
	}
	if _, added := pristine.Diff(configured); len(added) == 0 {
		t.Fatal("dualhomed changed nothing: the comparison below would prove nothing")
	}
	if got := configured.Grep("eth1.rp_filter = 2"); len(got) != 1 {
		t.Errorf("dualhomed did not set eth1's rp_filter to loose: %q", configured.Grep("eth1.rp_filter"))
	}
	if err := d.Stop(10 * time.Second); err != nil {
		t.Errorf("stopping dualhomed: %v", err)
	}
	out, err := w.Dualhomed(context.Background(), "cleanup")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Logf("dualhomed cleanup:\n%s", out)
	after, err := simworld.DumpState(w.Instance)
	if err != nil {
		t.Fatal(err)
	}
	removed, added := pristine.Diff(after)
	if len(removed)+len(added) > 0 {
		t.Errorf("cleanup did not restore the state before dualhomed:\nmissing:\n%s\nleft over:\n%s",
			strings.Join(removed, "\n"), strings.Join(added, "\n"))
	}
}
