package chaos

import (
	"context"
	"fmt"
	"math"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// The IMDS client's documented retry policy (imds/client.go): each key is
// tried at most MaxAttempts times; every retry, and the first request of a
// snapshot that follows a failed one, takes a token from one bucket of
// retryBurst tokens refilled at retriesPerSecond. The daemon waits at least
// minSnapshotGap between snapshots after a failure (its IMDS backoff starts
// at 1 s; the poll timer is >= 0.9 x poll_interval >= 0.9 s), and re-reads
// IMDS for not-ready links no sooner than every firstLinkRetry.
const (
	retryBurst       = 4
	retriesPerSecond = 2
	fetchConcurrency = 4 // imds.DefaultConcurrency: first attempts in flight before a failure is seen
	minSnapshotGap   = 900 * time.Millisecond
	firstLinkRetry   = 500 * time.Millisecond
)

// requestBound is the most requests IMDS may see in a fault window of
// length window. Every attempt that follows a failure draws a retry token,
// so at most 1+retryBurst+retriesPerSecond*window of them, each costing
// perAttempt requests (a GET, plus a token PUT when the token was lost, and
// twice that when a 401 makes the client refresh its token once). On top
// come the first attempts of every snapshot: fetchConcurrency when every
// request fails, all keysPerSnapshot when only some keys fail.
func requestBound(window time.Duration, perAttempt, keysPerSnapshot int, gap time.Duration) int {
	budget := 1 + retryBurst + retriesPerSecond*window.Seconds()
	snapshots := 1 + math.Ceil(window.Seconds()/gap.Seconds())
	return int(float64(perAttempt)*budget + snapshots*float64(keysPerSnapshot))
}

type imdsFault struct {
	name string
	// inject starts the fault; it may start goroutines that stop with ctx.
	inject func(ctx context.Context, w *simworld.World) error
	// every says whether the fault hits every request (else only some keys).
	every bool
	// perAttempt is the worst number of requests per attempt (see requestBound).
	perAttempt int
	// wantError: the daemon must report the fault in its status
	// (degraded, last_error holding these words: the key and value).
	wantError []string
	// planError: `dualhomed plan` must fail (exit 1) naming these words.
	planError []string
	// newENI: the fault concerns an ENI being attached; it must not be
	// configured during the fault and must be once IMDS recovers.
	newENI string
	// waitingMAC: the MAC whose keys the fault hides; the daemon must read it.
	waitingMAC string
	// deleteRules: another program deletes all our rules once the fault is
	// on; the daemon must put them back from its last good snapshot while
	// IMDS still fails.
	deleteRules bool
	// restart: the daemon is restarted once the fault is on; the new one
	// has never read IMDS and must change nothing.
	restart bool
}

func setFaults(f emulator.Faults) func(context.Context, *simworld.World) error {
	return func(_ context.Context, w *simworld.World) error { return w.IMDS.SetFaults(f) }
}

func imdsFaults(w *simworld.World) []imdsFault {
	eth1, eth3 := w.ENI("eth1").MAC, w.ENI("eth3").MAC
	huge := strings.Repeat("fd00:b:0:1::10\n", 8000) // ~120 KiB, above imds.MaxBodySize
	return []imdsFault{
		{name: "500", inject: setFaults(emulator.Faults{Status: 500}), every: true, perAttempt: 2,
			wantError: []string{"500"}},
		{name: "429 throttling", inject: setFaults(emulator.Faults{Status: 429, RetryAfter: time.Second}), every: true, perAttempt: 2,
			wantError: []string{"429"}},
		{name: "2s latency", inject: setFaults(emulator.Faults{Latency: 2 * time.Second}), every: true, perAttempt: 2},
		{name: "dropped connections", inject: setFaults(emulator.Faults{DropConnections: true}), every: true, perAttempt: 4},
		{name: "token expiry mid-snapshot", perAttempt: 4, inject: func(ctx context.Context, w *simworld.World) error {
			// Slow reads make snapshots long; tokens expire every 150 ms inside them.
			if err := w.IMDS.SetFaults(emulator.Faults{Match: "meta-data/", Latency: 40 * time.Millisecond}); err != nil {
				return err
			}
			go func() {
				for ctx.Err() == nil {
					w.IMDS.ExpireTokens()
					time.Sleep(150 * time.Millisecond)
				}
			}()
			return nil
		}},
		{name: "tokens rejected", inject: setFaults(emulator.Faults{RejectTokens: true}), every: true, perAttempt: 4,
			wantError: []string{"401"}},
		{name: "configured MAC listed with its keys missing", inject: setFaults(emulator.Faults{PendingMACs: []string{eth1}}), perAttempt: 2, waitingMAC: eth1},
		{name: "device-number 0 for a configured MAC", inject: setFaults(emulator.Faults{DeviceNumberZeroReads: map[string]int{eth1: 1 << 20}}), perAttempt: 2, waitingMAC: eth1},
		{name: "not an IP", perAttempt: 2, inject: func(_ context.Context, w *simworld.World) error {
			return w.IMDS.SetRawKey(eth1, "local-ipv4s", "10.1.1.10\nnot-an-ip")
		}, wantError: []string{"local-ipv4s", "not-an-ip"}, planError: []string{"local-ipv4s", "not-an-ip"}},
		{name: "huge body", perAttempt: 2, inject: func(_ context.Context, w *simworld.World) error {
			return w.IMDS.SetRawKey(eth1, "ipv6s", huge)
		}, wantError: []string{"ipv6s"}, planError: []string{"ipv6s"}},
		// A key the poll reads (a static one, such as subnet-ipv4-cidr-block,
		// is read again only by every 20th poll, a reload or `plan`).
		{name: "binary junk", perAttempt: 2, inject: func(_ context.Context, w *simworld.World) error {
			return w.IMDS.SetRawKey(eth1, "vpc-ipv4-cidr-blocks", "\x00\x01\x7f\xfe\xffjunk")
		}, wantError: []string{"vpc-ipv4-cidr-blocks"}, planError: []string{"vpc-ipv4-cidr-blocks"}},
		{name: "binary junk in a static key (seen by plan)", perAttempt: 2, inject: func(_ context.Context, w *simworld.World) error {
			return w.IMDS.SetRawKey(eth1, "subnet-ipv4-cidr-block", "\x00\x01\x7f\xfe\xffjunk")
		}, planError: []string{"subnet-ipv4-cidr-block"}},
		{name: "unknown MAC listed with no keys", inject: setFaults(emulator.Faults{PendingMACs: []string{"02:00:00:00:0f:0f"}}), perAttempt: 2},
		{name: "500 while another program deletes our rules", inject: setFaults(emulator.Faults{Status: 500}), every: true, perAttempt: 2,
			deleteRules: true, wantError: []string{"500"}},
		{name: "daemon restarted while IMDS answers 500", inject: setFaults(emulator.Faults{Status: 500}), every: true, perAttempt: 2,
			restart: true},
		{name: "device-number 0 for a new MAC", perAttempt: 2, newENI: "eth3", inject: func(_ context.Context, w *simworld.World) error {
			if err := w.IMDS.SetFaults(emulator.Faults{DeviceNumberZeroReads: map[string]int{eth3: 1 << 20}}); err != nil {
				return err
			}
			_, err := w.HotAttach(w.ENI("eth3"))
			return err
		}},
	}
}

// TestIMDSFaults injects each IMDS fault into a running daemon's emulator
// while VPC B's client pings eth1 and the primary guard runs, and checks that
// nothing is removed, the request rate stays within the retry budget, and
// the daemon converges once the fault is cleared.
func TestIMDSFaults(t *testing.T) {
	w := newWorld(t, simworld.Options{})
	const poll = 2 * time.Second
	d := startDaemon(t, w, poll)
	startPrimaryGuard(t, w)
	waitInSync(t, w, 20*time.Second)
	// What a full snapshot costs: a reload reads one. (The start's report
	// is gone by now: the kernel echoes the start's writes, the altnames'
	// among them, and the reconcile they trigger reads no IMDS.)
	if err := d.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	var keys int
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := simworld.WaitFor(ctx, func() error {
		h := health(t, w)
		if keys = h.Report.IMDSRequests; !strings.Contains(h.Report.Trigger, "reload") || keys <= 0 {
			return fmt.Errorf("the last reconcile (%s) read %d IMDS requests", h.Report.Trigger, keys)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("waiting for the reload's snapshot in the daemon's status: %v", err)
	}
	window := pick(3*time.Second, 10*time.Second)
	t.Logf("a healthy snapshot costs %d requests; fault window %s; poll interval %s", keys, window, poll)

	var figures []string
	for _, f := range imdsFaults(w) {
		ok := t.Run(strings.ReplaceAll(f.name, " ", "_"), func(t *testing.T) {
			fig := runIMDSFault(t, w, &d, f, window, keys)
			figures = append(figures, fmt.Sprintf("%-45s %s", f.name, fig))
		})
		if !ok {
			break // the world may be left broken: later faults would only repeat the failure
		}
	}
	t.Logf("IMDS faults, requests during a %s window:\n  %s", window, strings.Join(figures, "\n  "))
}

func runIMDSFault(t *testing.T, w *simworld.World, dp **simworld.Proc, f imdsFault, window time.Duration, keys int) string {
	d := *dp
	daemonAlive(t, d)
	before := dump(t, w)
	w.IMDS.ResetStats()
	ctx, stop := context.WithCancel(context.Background())
	var injectors sync.WaitGroup
	defer func() { stop(); injectors.Wait() }()
	start := time.Now()
	if err := f.inject(ctx, w); err != nil {
		t.Fatalf("injecting: %v", err)
	}
	clients := 1 // IMDS clients whose retry budgets count (a restart brings a new one)
	if f.restart {
		if err := d.Stop(10 * time.Second); err != nil {
			t.Fatalf("stopping the daemon: %v", err)
		}
		nd, err := w.StartDaemon(simworld.DaemonOptions{PollInterval: 2 * time.Second, ExtraConfig: daemonConfig})
		if err != nil {
			t.Fatal(err)
		}
		d, *dp = nd, nd
		clients++
	}
	if f.deleteRules {
		time.Sleep(500 * time.Millisecond) // let the daemon see IMDS fail first
		if n, err := deleteOurRules(w); err != nil || n == 0 {
			t.Fatalf("deleting our rules: %d deleted, %v", n, err)
		}
	}
	var eth1 <-chan simworld.PingResult
	if !f.deleteRules {
		eth1 = pingFor(w.VPCs["B"].Client, w.ENI("eth1").Primary4(), window)
	}

	// During the window nothing may disappear, and a new ENI must stay unconfigured.
	for time.Since(start) < window {
		time.Sleep(250 * time.Millisecond)
		if f.deleteRules {
			continue // removed on purpose; checked below
		}
		if removedSince(t, "during the fault", before, dump(t, w)) {
			break
		}
		if f.newENI != "" {
			if err := w.ConfiguredCheck(w.ENI(f.newENI)); err == nil {
				t.Errorf("%s was configured while IMDS answers device-number 0 for it", f.newENI)
				break
			}
			if rules := dump(t, w).Grep("lookup", "proto 210", w.ENI(f.newENI).Primary4().String()); len(rules) > 0 {
				t.Errorf("rules for %s while IMDS answers device-number 0 for it: %v", f.newENI, rules)
				break
			}
		}
	}
	stats := w.IMDS.Stats()
	elapsed := time.Since(start)
	daemonAlive(t, d)

	perSnapshot, gap := keys, firstLinkRetry
	if f.every {
		perSnapshot, gap = fetchConcurrency, minSnapshotGap
	}
	bound := clients * requestBound(elapsed, f.perAttempt, perSnapshot, gap)
	rate := float64(stats.Requests) / elapsed.Seconds()
	if stats.Requests > int64(bound) {
		t.Errorf("IMDS got %d requests in %s (%.1f/s), more than the retry budget allows: %d", stats.Requests, elapsed.Round(time.Millisecond), rate, bound)
	}
	if eth1 != nil {
		if r := <-eth1; r.Received != r.Sent || r.Sent == 0 {
			t.Errorf("VPC B client -> eth1: %d of %d pings answered during the fault (lost %v)", r.Received, r.Sent, r.Lost)
		}
	}
	if f.deleteRules {
		// IMDS still fails: the rules must come back from the last good snapshot.
		wctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := simworld.WaitFor(wctx, func() error {
			if removed, _ := before.Diff(dump(t, w)); len(removed) > 0 {
				return fmt.Errorf("%d objects still missing: %v", len(removed), head(removed, 5))
			}
			return nil
		})
		cancel()
		if err != nil {
			t.Errorf("the deleted rules were not repaired while IMDS failed: %v", err)
		}
	}

	if len(f.wantError) > 0 {
		// The user-facing report: status.json says degraded and names the key (and value).
		wctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		var last string
		err := simworld.WaitFor(wctx, func() error {
			h, err := degradedHealth(w)
			if err != nil {
				return err
			}
			last = h
			for _, word := range f.wantError {
				if !strings.Contains(h, word) {
					return fmt.Errorf("missing %q", word)
				}
			}
			return nil
		})
		cancel()
		if err != nil {
			t.Errorf("status.json does not report the fault (want degraded and %q): %s", f.wantError, last)
		}
	}
	if f.waitingMAC != "" {
		// The fault must have been seen: the daemon read the ENI's directory
		// during the window. (Its status keeps saying "configured": a
		// not-ready ENI keeps its last good description, by design.)
		seen := int64(0)
		for path, n := range stats.ByPath {
			if strings.Contains(path, "/macs/"+f.waitingMAC) {
				seen += n
			}
		}
		if seen == 0 {
			t.Errorf("the daemon did not read %s's keys during the fault: it cannot have seen it (paths read: %v)", f.waitingMAC, stats.ByPath)
		}
	}
	if len(f.planError) > 0 {
		out, err := w.Dualhomed(context.Background(), "plan")
		if simworld.ExitCode(err) != 1 {
			t.Errorf("`dualhomed plan` during the fault: exit %d, want 1\n%s", simworld.ExitCode(err), out)
		}
		for _, word := range f.planError {
			if err == nil || !strings.Contains(err.Error(), word) {
				t.Errorf("`dualhomed plan` error does not name %q: %v", word, err)
			}
		}
	}
	if removedSince(t, "during the fault", before, dump(t, w)) {
		return ""
	}

	// Recovery.
	stop()
	injectors.Wait()
	w.IMDS.ClearFaults()
	w.IMDS.ClearOverrides()
	recovered := time.Now()
	links := []string{"eth1", "eth2"}
	if f.newENI != "" {
		links = append(links, f.newENI)
	}
	waitConfigured(t, w, d, 30*time.Second, links...)
	waitInSync(t, w, 30*time.Second)
	if f.newENI == "" {
		removedSince(t, "after recovery", before, dump(t, w))
		if _, added := before.Diff(dump(t, w)); len(added) > 0 {
			t.Errorf("after recovery, objects that were not there before:\n  %s", strings.Join(head(added, 20), "\n  "))
		}
	}
	fig := fmt.Sprintf("%4d requests in %5.1fs = %5.1f/s (bound %d = %.1f/s); in sync %s after recovery",
		stats.Requests, elapsed.Seconds(), rate, bound, float64(bound)/elapsed.Seconds(), time.Since(recovered).Round(100*time.Millisecond))
	t.Log(fig)
	return fig
}

// degradedHealth returns the daemon's status as one string when it is
// degraded (summary and last error), or an error while it is not.
func degradedHealth(w *simworld.World) (string, error) {
	h, err := readHealth(w)
	if err != nil {
		return "", err
	}
	s := fmt.Sprintf("degraded=%v last_error=%q summary=%q", h.Degraded, h.LastError, h.Summary)
	if !h.Degraded {
		return s, fmt.Errorf("not degraded: %s", s)
	}
	return s, nil
}
