package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// startDualhomed starts the IMDS emulator and `dualhomed daemon` in w, and
// waits until the kernel shows eth1 and eth2 configured.
func startDualhomed(t *testing.T, w *simworld.World, poll time.Duration) *simworld.Proc {
	t.Helper()
	needBinaries(t)
	if w.IMDS == nil {
		if err := w.StartIMDS(); err != nil {
			t.Fatal(err)
		}
	}
	d, err := w.StartDaemon(simworld.DaemonOptions{PollInterval: poll})
	if err != nil {
		t.Fatal(err)
	}
	waitConfigured(t, w, d, "eth1", "eth2")
	return d
}

// waitConfigured fails t unless the links' ENIs get configured within 20s.
func waitConfigured(t *testing.T, w *simworld.World, d *simworld.Proc, links ...string) {
	t.Helper()
	var enis []*simworld.ENI
	for _, l := range links {
		enis = append(enis, w.ENI(l))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := w.WaitConfigured(ctx, d, enis...); err != nil {
		t.Fatalf("waiting for dualhomed to configure %v: %v", links, err)
	}
}

// expectAllWork fails t for every probe that does not get both its ICMP and TCP replies.
func expectAllWork(t *testing.T, ps []probe) {
	t.Helper()
	results := runAll(ps, 2*time.Second)
	for _, p := range ps {
		if errs := results[p.name]; errs[0] != nil || errs[1] != nil {
			t.Errorf("%s: ping: %v; tcp: %v", p, errs[0], errs[1])
		}
	}
}

// waitWorks retries the probe (TCP then ICMP) until both succeed within limit.
func waitWorks(t *testing.T, p probe, limit time.Duration) {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	err := simworld.WaitFor(ctx, func() error {
		if err := p.tcp(200 * time.Millisecond); err != nil {
			return err
		}
		return p.ping(500 * time.Millisecond)
	})
	if err != nil {
		t.Fatalf("%s: still failing after %s: %v", p, time.Since(start).Round(time.Millisecond), err)
	}
}

// Scenario 2: with the daemon, every VPC's client reaches its ENI's addresses,
// IPv4 and IPv6, the two clients with the same address at the same time, and
// a secondary IP assigned later in IMDS works within one poll.
func TestDaemonRepliesLeaveThroughTheirENI(t *testing.T) {
	w := newWorld(t)
	const poll = time.Second
	startDualhomed(t, w, poll)

	expectAllWork(t, clientProbes(w, "eth0", "eth1", "eth2"))
	expectInSync(t, w)

	// VPC A's and VPC C's clients are both 10.0.100.50: hold one connection
	// from each open and talk over both at once. Each reply can only reach
	// its client through its own ENI's router.
	a, c := w.VPCs["A"], w.VPCs["C"]
	connA, err := simworld.StartStream(a.Client, netip.AddrPortFrom(w.ENI("eth0").Primary4(), simworld.EchoPort), 10*time.Millisecond)
	if err != nil {
		t.Fatalf("VPC A client: %v", err)
	}
	connC, err := simworld.StartStream(c.Client, netip.AddrPortFrom(w.ENI("eth2").Primary4(), simworld.EchoPort), 10*time.Millisecond)
	if err != nil {
		connA.Stop()
		t.Fatalf("VPC C client (same address as VPC A's): %v", err)
	}
	pingA := make(chan error, 1)
	go func() {
		r, err := simworld.PingRun(context.Background(), a.Client, w.ENI("eth0").Primary4(), 10, 20*time.Millisecond, time.Second)
		if err == nil && r.Received != r.Sent {
			err = fmt.Errorf("%d of %d echo replies", r.Received, r.Sent)
		}
		pingA <- err
	}()
	r, err := simworld.PingRun(context.Background(), c.Client, w.ENI("eth2").Primary4(), 10, 20*time.Millisecond, time.Second)
	if err == nil && r.Received != r.Sent {
		err = fmt.Errorf("%d of %d echo replies", r.Received, r.Sent)
	}
	if err != nil {
		t.Errorf("VPC C client pinging eth2 while VPC A's client pings eth0: %v", err)
	}
	if err := <-pingA; err != nil {
		t.Errorf("VPC A client pinging eth0 while VPC C's client pings eth2: %v", err)
	}
	nA, errA := connA.Stop()
	nC, errC := connC.Stop()
	if errA != nil || errC != nil || nA == 0 || nC == 0 {
		t.Errorf("same-address clients at once: A %d round trips (%v), C %d round trips (%v)", nA, errA, nC, errC)
	}
	t.Logf("same-address clients at once: A %d, C %d TCP round trips, 10/10 pings each", nA, nC)

	// Secondary IPs assigned in IMDS (the OS is not told) work within one poll.
	eth1 := w.ENI("eth1")
	sec4, sec6 := netip.MustParseAddr("10.1.1.11"), netip.MustParseAddr("fd00:b:0:1::11")
	assigned := time.Now()
	if err := w.AddIP(eth1, sec4); err != nil {
		t.Fatal(err)
	}
	if err := w.AddIP(eth1, sec6); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{sec4, sec6} {
		waitWorks(t, probe{"VPC B client -> secondary " + a.String(), w.VPCs["B"].Client, a}, 2*poll+5*time.Second)
		t.Logf("secondary IP %s assigned in IMDS answered %s after the assignment (poll interval %s)", a, time.Since(assigned).Round(time.Millisecond), poll)
	}
	// Replies to VPC B would also find eth1 through the main-table VPC route;
	// the source rules are what serve clients beyond VPC B's CIDR.
	if err := w.ConfiguredCheck(eth1); err != nil {
		t.Errorf("secondary IPs answer, but: %v", err)
	}
	expectAllWork(t, clientProbes(w, "eth1"))
}

// expectInSync fails t unless `dualhomed plan` finds nothing to change (exit 0).
func expectInSync(t *testing.T, w *simworld.World) {
	t.Helper()
	out, err := w.Dualhomed(context.Background(), "plan")
	if err != nil {
		t.Errorf("dualhomed plan with the daemon's work done: exit %d, want 0 (in sync): %v\n%s", simworld.ExitCode(err), err, out)
	}
}

// With IMDS failing, `dualhomed status` shows the daemon's last report from
// status.json (ENIs and warnings), says that IMDS could not be read live and
// how old the report is, and exits 4; without the fallback it printed no
// ENI at all and exited 1.
func TestStatusFallsBackToTheDaemonsReport(t *testing.T) {
	w := newWorld(t)
	startDualhomed(t, w, time.Hour)
	if err := w.IMDS.SetFaults(emulator.Faults{Status: 500}); err != nil {
		t.Fatal(err)
	}
	out, err := w.Dualhomed(context.Background(), "status")
	if code := simworld.ExitCode(err); code != 4 {
		t.Errorf("status with IMDS failing: exit %d (%v), want 4", code, err)
	}
	t.Logf("dualhomed status:\n%s", out)
	eth1 := w.ENI("eth1")
	for _, want := range []string{"status: IMDS could not be read live (", "showing the daemon's last report instead, from ", " ago)",
		eth1.MAC, eth1.Primary4().String(), "configured"} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q", want)
		}
	}
	out, err = w.Dualhomed(context.Background(), "status", "--json")
	if code := simworld.ExitCode(err); code != 4 {
		t.Errorf("status --json with IMDS failing: exit %d (%v), want 4", code, err)
	}
	var sj struct {
		Live       bool      `json:"live"`
		LiveError  string    `json:"live_error"`
		ReportTime time.Time `json:"report_time"`
		ENIs       []struct {
			MAC   string `json:"mac"`
			State string `json:"state"`
		} `json:"enis"`
	}
	if err := json.Unmarshal([]byte(out), &sj); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	configured := 0
	for _, e := range sj.ENIs {
		if e.State == "configured" {
			configured++
		}
	}
	if sj.Live || !strings.Contains(sj.LiveError, "IMDS") || sj.ReportTime.IsZero() || time.Since(sj.ReportTime) > time.Minute || configured != 2 {
		t.Errorf("status --json: live %v, live_error %q, report_time %v, %d ENIs configured; want the daemon's report (eth1, eth2 configured) flagged as not live",
			sj.Live, sj.LiveError, sj.ReportTime, configured)
	}
}
