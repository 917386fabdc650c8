package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// daemon measures the `dualhomed daemon` process on the 1-card instance:
// start to converged, rest, drift repair, IMDS failure and hot attach.
func (b *bench) daemon(ctx context.Context) {
	o := b.o
	d := &daemonResult{}
	b.r.Daemon = d
	v := b.r.Variants[0]
	if v.reference.Rules == nil {
		b.r.Failures = append(b.r.Failures, "daemon: skipped (no reference state)")
		return
	}
	var proc *simworld.Proc
	// start replaces the daemon with a fresh one (poll: its poll_interval,
	// 0 for the default), waits until the kernel is in the reference state
	// (on a configured kernel, the daemon makes no change) and the daemon
	// watches netlink, and returns how long the kernel took.
	start := func(poll time.Duration) (time.Duration, error) {
		if proc != nil {
			_ = proc.Stop(10 * time.Second)
		}
		t0 := time.Now()
		var err error
		if proc, err = b.w.StartDaemon(simworld.DaemonOptions{PollInterval: poll, ExtraConfig: minimalImage}); err == nil {
			err = b.match(v.reference, "dualhomed's state", 60*time.Second, proc)
		}
		if err != nil {
			return 0, fmt.Errorf("starting the daemon (poll_interval %v): %w", poll, err)
		}
		converged := time.Since(t0)
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		return converged, logContext(proc, proc.WaitLog(wctx, `"msg":"ready"`))
	}

	b.step("daemon: start to fully configured", func() (err error) {
		if err = b.build(v.inst); err == nil {
			d.Converge, err = start(0)
		}
		return err
	})
	if d.Converge == 0 {
		return
	}

	b.step(fmt.Sprintf("daemon: at rest for %v", o.idle), func() error {
		time.Sleep(2 * time.Second) // let the start-up settle (logs, first poll timer)
		b.w.IMDS.ResetStats()
		c0 := b.settledChanges()
		cpu0, err1 := proc.CPUTime()
		ticks0, err2 := proc.CPUTicks()
		if err := errors.Join(err1, err2); err != nil {
			return err
		}
		start := time.Now()
		if err := simworld.Sleep(ctx, o.idle); err != nil {
			return err
		}
		cpu1, err1 := proc.CPUTime()
		ticks1, err2 := proc.CPUTicks()
		st := b.w.IMDS.Stats()
		if err := errors.Join(err1, err2); err != nil {
			return errors.Join(err, alive(proc))
		}
		d.IdleWall = time.Since(start)
		d.IdleCPU = cpu1 - cpu0
		d.IdleCPUTicks = ticks1 - ticks0
		c1, lost := b.wt.Changes()
		d.IdleChanges = c1.sub(c0)
		d.IdleChangesLost = lost > 0
		d.IdleRequests, d.IdleBytes = st.Requests, st.BytesSent
		d.IdlePolls = st.ByPath[macListingPath]
		var err error
		d.RSSPeakKiB, d.RSSKiB, err = proc.Memory()
		return err
	})

	// Each drift is isolated: the daemon deliberately backs off when drift
	// repeats within a minute (another manager fighting it), so every
	// sample after the first is taken on a freshly started daemon.
	b.step("daemon: drift repair", func() error {
		var ours []string
		for k, r := range v.reference.Rules {
			if _, ok := b.pristine.Rules[k]; !ok && r.Protocol != 0 {
				ours = append(ours, k)
			}
		}
		if len(ours) == 0 {
			return errors.New("no rule of ours to delete")
		}
		slices.Sort(ours)
		rng := rand.New(rand.NewPCG(1, 2))
		for n := range o.drifts {
			if err := ctx.Err(); err != nil {
				return err
			}
			if n > 0 {
				if _, err := start(0); err != nil {
					return err
				}
			}
			k := ours[rng.IntN(len(ours))]
			rule := v.reference.Rules[k]
			gone, id := false, ruleID(rule)
			back := b.wt.expect(func(have map[string]bool) bool {
				gone = gone || !have[id]
				return gone && have[id]
			})
			t0 := time.Now()
			if err := b.w.Instance.NL.RuleDel(&rule); err != nil {
				return fmt.Errorf("deleting rule %s: %w", k, err)
			}
			select {
			case t := <-back:
				d.Drift = append(d.Drift, t.Sub(t0))
			case <-time.After(10 * time.Second):
				return logContext(proc, errors.Join(fmt.Errorf("rule %s not restored within 10 s", k), alive(proc)))
			}
		}
		return nil
	})

	b.step(fmt.Sprintf("daemon: IMDS answering 500 for %v", o.fault), func() error {
		if _, err := start(0); err != nil {
			return err
		}
		before, err := simworld.ReadState(b.w.Instance)
		if err != nil {
			return err
		}
		b.w.IMDS.ResetStats()
		if err := b.w.IMDS.SetFaults(emulator.Faults{Status: 500}); err != nil {
			return err
		}
		start := time.Now()
		// A reload makes the daemon read IMDS now rather than at its next
		// poll, so the whole window is spent failing and backing off.
		if err := proc.Signal(syscall.SIGHUP); err != nil {
			return err
		}
		_ = simworld.Sleep(ctx, o.fault) // an interrupted run ends the window early
		st := b.w.IMDS.Stats()
		elapsed := time.Since(start)
		b.w.IMDS.ClearFaults()
		d.FaultRequests, d.FaultWall = st.Requests, elapsed
		diff, err := b.until(before, time.Second, nil, false)
		if err != nil {
			return err
		}
		d.FaultKept = diff.Empty()
		d.FaultDiff = diff.Summary("before", "after")
		if d.FaultRequests == 0 {
			return logContext(proc, errors.New("the daemon sent no IMDS request during the failure: it did not react to SIGHUP"))
		}
		return alive(proc)
	})

	b.step("daemon: hot attach", func() error {
		if _, err := start(0); err != nil {
			return err
		}
		if err := b.hotAttach(ctx, proc, v, d); err != nil {
			return logContext(proc, err)
		}
		if d.HotPingFailures > 0 {
			return logContext(proc, fmt.Errorf("%d of %d attaches got no ping reply; the first: %s", d.HotPingFailures, o.attaches, d.HotPingFailure))
		}
		return nil
	})

	if o.pollCPU <= 0 {
		return
	}
	b.step(fmt.Sprintf("daemon: CPU per poll (poll_interval %v, for %v)", pollCPUInterval, o.pollCPU), func() error {
		// The hot attaches end in the configured instance (the last ENI
		// with a new MAC); when they did not, start again from the boot.
		_ = proc.Stop(10 * time.Second)
		if b.match(v.reference, "dualhomed's state", 0, nil) != nil {
			if err := b.build(v.inst); err != nil {
				return err
			}
		}
		if _, err := start(pollCPUInterval); err != nil {
			return err
		}
		return b.pollCPU(ctx, proc, d)
	})
}

// alive returns an error, with the end of the daemon's log, if it exited.
func alive(p *simworld.Proc) error {
	if done, err := p.Exited(); done {
		return fmt.Errorf("the daemon exited (%v); its log ends with:\n%s", err, simworld.Tail(p.Log(), 15))
	}
	return nil
}

// logContext adds the end of the daemon's log to err.
func logContext(p *simworld.Proc, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w\n  the daemon's log ends with:\n%s", err, simworld.Tail(p.Log(), 15))
}

// pollCPUInterval is the poll interval of the daemon that measures the CPU
// cost of one poll: short, so that a window of half a minute holds about
// ten polls and the figure rests on more than a few scheduler ticks.
const pollCPUInterval = 3 * time.Second

// pollCPU watches a daemon polling every pollCPUInterval for about
// o.pollCPU and records the CPU time and IMDS requests per poll. Polls are
// seen as the IMDS listing of MACs, which every poll reads once, and the
// window runs from just after one poll to just after the last: it holds
// whole poll cycles, so no poll is cut in two at either end.
func (b *bench) pollCPU(ctx context.Context, proc *simworld.Proc, d *daemonResult) error {
	want := max(1, int(b.o.pollCPU/pollCPUInterval))
	// Counts start from zero twice: to see the first poll, then for the window.
	b.w.IMDS.ResetStats()
	if _, err := b.afterNextPoll(ctx, proc, 0); err != nil {
		return err
	}
	b.w.IMDS.ResetStats()
	c0, _ := b.wt.Changes()
	cpu0, err := proc.CPUTime()
	if err != nil {
		return err
	}
	start := time.Now()
	var polls int64
	for polls < int64(want) {
		if polls, err = b.afterNextPoll(ctx, proc, polls); err != nil {
			return err
		}
	}
	cpu1, err := proc.CPUTime()
	if err != nil {
		return errors.Join(err, alive(proc))
	}
	d.PollCPUWall = time.Since(start)
	st := b.w.IMDS.Stats()
	c1, _ := b.wt.Changes()
	d.PollCPU = cpu1 - cpu0
	d.PollCPUPolls = st.ByPath[macListingPath]
	d.PollCPURequests, d.PollCPUBytes = st.Requests, st.BytesSent
	d.PollCPUChanges = c1.sub(c0)
	return alive(proc)
}

// pollDone is how long after a poll's MAC listing the poll is surely over:
// one takes some 15 ms, and the next comes pollCPUInterval later.
const pollDone = 500 * time.Millisecond

// afterNextPoll waits until the emulator has served more than seen MAC
// listings since its last reset, then until that poll is over, and returns
// the new count.
func (b *bench) afterNextPoll(ctx context.Context, proc *simworld.Proc, seen int64) (int64, error) {
	deadline := time.Now().Add(2*pollCPUInterval + time.Second)
	for {
		if n := b.w.IMDS.Stats().ByPath[macListingPath]; n > seen {
			if err := simworld.Sleep(ctx, pollDone); err != nil {
				return n, err
			}
			return b.w.IMDS.Stats().ByPath[macListingPath], nil
		}
		if time.Now().After(deadline) {
			return seen, logContext(proc, errors.Join(fmt.Errorf("no poll (request of %s) within %v", macListingPath, 2*pollCPUInterval+time.Second), alive(proc)))
		}
		if err := simworld.Sleep(ctx, 10*time.Millisecond); err != nil {
			return seen, err
		}
	}
}

// macListingPath is the IMDS listing of the attached ENIs' MACs.
const macListingPath = "/latest/meta-data/network/interfaces/macs/"

// pingTimeout bounds the wait for an attached ENI's rules and first ping
// reply: a working daemon needs a small fraction of it.
const pingTimeout = 5 * time.Second

// hotAttach attaches a new ENI again and again in the place of the last one
// (device number, addresses): it is detached (IMDS forgets it, its link
// goes), the kernel is cleaned of its rules, IMDS learns a new ENI (new
// MAC), and only then does the new link arrive. Timed from the link's
// arrival (its RTM_NEWLINK notification in the instance) to its rules'
// notification and to the first ping its VPC's client gets through it; the
// move into the instance, which a hot-plugged NIC does not go through, is
// timed apart.
func (b *bench) hotAttach(ctx context.Context, proc *simworld.Proc, v *variantResult, d *daemonResult) error {
	e := b.w.ENIs[len(b.w.ENIs)-1]
	// Its rules are those from its VPC's addresses (every ENI has a VPC of its own).
	var want []string // ruleIDs
	var rules []netlink.Rule
	for _, r := range v.reference.Rules {
		if r.Src == nil {
			continue
		}
		if src, _ := netip.AddrFromSlice(r.Src.IP); e.VPC.CIDR4.Contains(src.Unmap()) || e.VPC.CIDR6.Contains(src) {
			want, rules = append(want, ruleID(r)), append(rules, r)
		}
	}
	if len(want) == 0 {
		return fmt.Errorf("no rule of ENI %s in the reference state", e.MAC)
	}
	// The client is in the ENI's VPC but outside its subnet, so that only
	// the ENI's routing (not the subnet's connected route) can carry the
	// reply back.
	if len(e.IPv4s()) == 0 || e.Subnet4.Contains(e.VPC.Client4) {
		return fmt.Errorf("no IPv4 of %s to ping from outside its subnet %s", e.Link, e.Subnet4)
	}
	for n := range b.o.attaches {
		if err := ctx.Err(); err != nil {
			return err
		}
		// Detach. The daemon removes a vanished ENI's rules at its next
		// IMDS poll; the bench does it at once so that the next attach
		// starts clean.
		gone := b.wt.expect(rulesAre(false, want))
		if err := b.w.Detach(e); err != nil {
			return err
		}
		time.Sleep(300 * time.Millisecond)
		for _, r := range rules {
			if err := b.w.Instance.NL.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("deleting rule %v: %w", r, err)
			}
		}
		select {
		case <-gone:
		case <-time.After(5 * time.Second):
			return errors.Join(fmt.Errorf("attach %d: the rules of detached %s keep coming back", n+1, e.Link), alive(proc))
		}
		// IMDS knows the new ENI before its link arrives, long after the
		// daemon's last IMDS read: its client's request bucket is full.
		mac := fmt.Sprintf("02:00:00:01:%02x:%02x", n>>8, n&0xff)
		if err := errors.Join(b.w.Reissue(e, mac, fmt.Sprintf("eni-%017x", 0xa000+n)), b.w.ListInIMDS(e)); err != nil {
			return err
		}
		time.Sleep(bucketRefill)

		hw, _ := net.ParseMAC(mac)
		placed, arrived := b.wt.expect(rulesAre(true, want)), b.wt.expectLink(hw)
		pctx, cancel := context.WithTimeout(ctx, pingTimeout)
		pinged := make(chan time.Time, 1)
		go func() {
			t, _ := simworld.FirstReply(pctx, e.VPC.Client, e.Primary4(), time.Millisecond)
			pinged <- t
		}()
		t0, err := b.w.Plug(e)
		if err != nil {
			cancel()
			return err
		}
		var tRules, tArrival time.Time
		select {
		case tRules = <-placed:
		case <-time.After(pingTimeout):
			cancel()
			return errors.Join(fmt.Errorf("attach %d: rules not in place within %v", n+1, pingTimeout), alive(proc))
		}
		// The link's notification is handled before the rules' ones (one
		// socket, in order): it is there unless the socket overran.
		select {
		case tArrival = <-arrived:
		case <-time.After(time.Second):
			cancel()
			return fmt.Errorf("attach %d: no RTM_NEWLINK notification of %s (%s) in the instance", n+1, e.Link, mac)
		}
		d.HotMove = append(d.HotMove, tArrival.Sub(t0))
		d.HotRules = append(d.HotRules, tRules.Sub(tArrival))
		d.HotMoveRules = append(d.HotMoveRules, tRules.Sub(t0))
		t := <-pinged
		cancel()
		if t.IsZero() {
			// Counted, explained once, and the series goes on: the next
			// attach starts from a clean slate anyway.
			d.HotPingFailures++
			if d.HotPingFailure == "" {
				d.HotPingFailure = fmt.Sprintf("attach %d: no ping reply from %s through %s within %v; %s", n+1, e.Primary4(), e.Link,
					pingTimeout, b.routingDiagnosis(e))
			}
			continue
		}
		d.HotPing = append(d.HotPing, t.Sub(tArrival))
		d.HotMovePing = append(d.HotMovePing, t.Sub(t0))
	}
	return nil
}

// routingDiagnosis shows how the instance would answer e's VPC client, for
// the error message of a failed ping.
func (b *bench) routingDiagnosis(e *simworld.ENI) string {
	var s strings.Builder
	local, client := e.Primary4().String(), e.VPC.Client4.String()
	for _, args := range [][]string{
		{"-4", "addr", "show", "dev", e.Link, "to", local + "/32"},
		{"-4", "route", "get", client, "from", local},
		{"-4", "neigh", "show", "dev", e.Link},
		{"-4", "rule", "show", "from", local},
	} {
		out, err := b.w.Instance.IP(args...)
		fmt.Fprintf(&s, "\n  ip %s: %s", strings.Join(args, " "), strings.TrimSpace(out))
		if err != nil {
			fmt.Fprintf(&s, " (%v)", err)
		}
	}
	return s.String()
}
