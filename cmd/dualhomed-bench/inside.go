package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/agent"
	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// bench runs the measurements inside the instance namespace.
type bench struct {
	ctx       context.Context // cancelled by Ctrl-C: the remaining steps are skipped
	o         options
	w         *world
	wt        *watcher
	r         *results
	addrProto bool // iproute2 can set an address's protocol
}

// runInside is the inner process: it measures, then writes the report.
func runInside(o options) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r := newResults(o)
	w, err := newWorld()
	if err != nil {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: setting up the instance namespace: %v\n", err)
		return 1
	}
	defer w.Close()
	wt, err := newWatcher(w.h)
	if err != nil {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: %v\n", err)
		return 1
	}
	defer wt.Close()
	b := &bench{ctx: ctx, o: o, w: w, wt: wt, r: r, addrProto: iproute2AddrProto(ctx)}
	if load := loadAverage(); loadAbove(load, float64(runtime.NumCPU())/2) {
		b.logf("warning: load average %s on %d CPUs: other work on the machine will slow every figure", load, runtime.NumCPU())
	}
	r.AddrProto = b.addrProto

	b.variant(ctx, 1)
	if o.cards > 1 && ctx.Err() == nil {
		// Fewer repetitions for the variant: it shows the effect of a
		// second card, and the figures above carry the comparison.
		b.o.runs, b.o.shellRuns = min(o.runs, 5), min(o.shellRuns, 3)
		b.variant(ctx, o.cards)
		b.o.runs, b.o.shellRuns = o.runs, o.shellRuns
	}
	if ctx.Err() == nil {
		b.daemon(ctx)
	}
	if ctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "dualhomed-bench: interrupted; not writing the report")
		return 130
	}
	r.Finished = time.Now()
	if err := r.write(o.out); err != nil {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: %v\n", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "dualhomed-bench: wrote %s\n", o.out)
	fmt.Print(r.summaryTable())
	if len(r.Failures) > 0 {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: %d measurement(s) failed, see %s\n", len(r.Failures), o.out)
		return 1
	}
	return 0
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "dualhomed-bench: "+format+"\n", args...)
}

// step runs one measurement: its failure (error or panic, e.g. a component
// not written yet) is recorded and the others still run.
func (b *bench) step(name string, fn func() error) {
	if b.ctx.Err() != nil {
		return
	}
	b.logf("%s", name)
	err := func() (err error) {
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("panic: %v\n%s", p, debug.Stack())
			}
		}()
		return fn()
	}()
	if err != nil {
		b.r.Failures = append(b.r.Failures, fmt.Sprintf("%s: %v", name, err))
		b.logf("%s: FAILED: %v", name, err)
	}
}

// reset brings the kernel back to the pristine state of the current world.
func (b *bench) reset() error { return resetKernel(b.w.h, b.w.pristine) }

// settledChanges waits until no rtnetlink notification has arrived for a
// while (the last ones of a burst are still queued when a tool returns) and
// returns the counts.
func (b *bench) settledChanges() changeCounts {
	last, _ := b.wt.Changes()
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		time.Sleep(30 * time.Millisecond)
		now, _ := b.wt.Changes()
		if now == last {
			return now
		}
		last = now
	}
	return last
}

// verify compares the kernel with the reference state of the variant.
func (b *bench) verify(v *variantResult) (stateDiff, error) {
	_, d, err := b.settledDiff(v.reference, false)
	return d, err
}

// settledDiff compares the kernel with want, allowing the kernel up to a
// second to finish what it does asynchronously (IPv6 local routes of new
// addresses appear a moment after the address). Without addrProto, the
// addresses' protocols are ignored as a second-best match.
func (b *bench) settledDiff(want kernelState, ignoreAddrProto bool) (kernelState, stateDiff, error) {
	deadline := time.Now().Add(time.Second)
	for {
		got, err := dumpKernel(b.w.h)
		if err != nil {
			return got, stateDiff{}, err
		}
		d := compareStates(want, got)
		if ignoreAddrProto {
			d = compareStates(withoutAddrProto(want), withoutAddrProto(got))
		}
		if d.Empty() || time.Now().After(deadline) {
			return got, d, nil
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// variant measures dualhomed and the baselines on the full-scale instance
// with the given number of network cards.
func (b *bench) variant(ctx context.Context, cards int) {
	o := b.o
	v := &variantResult{Cards: cards}
	v.Name = fmt.Sprintf("%d network card", cards)
	if cards > 1 {
		v.Name += "s"
	}
	b.r.Variants = append(b.r.Variants, v)
	inst := emulator.ExampleInstance(o.enis, o.ipv4, o.ipv6, o.prefixes, cards)
	v.inst = inst
	var built bool
	b.step(v.Name+": building the instance", func() error {
		if err := b.w.build(inst); err != nil {
			return err
		}
		built = true
		return nil
	})
	if !built {
		return
	}

	// Cold reconcile with the client as the daemon builds it (default IMDS
	// pacing), then no-op reconciles with the same pipeline, as the daemon's
	// next poll and next netlink event do.
	b.step(v.Name+": cold and no-op reconcile (in-process agent.Reconciler)", func() error {
		for i := range o.runs {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := b.reset(); err != nil {
				return err
			}
			p, err := newPipeline(b.w.url, 0)
			if err != nil {
				return err
			}
			c0 := b.settledChanges()
			run, err := p.reconcile(ctx, agent.TriggerStart)
			if err != nil {
				p.Close()
				return err
			}
			c1 := b.settledChanges()
			v.Cold = append(v.Cold, run.Total)
			v.ColdIMDS = append(v.ColdIMDS, run.IMDS)
			v.ColdWrites = append(v.ColdWrites, run.Writes)
			v.ColdObserved = append(v.ColdObserved, c1.sub(c0).Total())
			v.ColdRequests = run.Requests
			if v.reference.Rules == nil {
				ref, err := dumpKernel(b.w.h)
				if err != nil {
					p.Close()
					return err
				}
				v.reference = ref
				v.countObjects(b.w.pristine)
			} else if d, err := b.verify(v); err != nil || !d.Empty() {
				p.Close()
				return errors.Join(err, fmt.Errorf("run %d ended in another state than run 1: %s", i+1, d.Summary("run 1", "this run")))
			}
			if i < o.runs-1 {
				p.Close()
				continue
			}
			defer p.Close()
			// The no-op poll as the daemon's timer does it (agent.TriggerPoll,
			// on a pipeline with a good snapshot), then the full snapshot a
			// start, a reload and every so many polls read, each with its
			// IMDS cost counted by the emulator.
			for range o.runs {
				run, st, obs, err := b.measuredRead(ctx, p, agent.TriggerPoll)
				if err != nil {
					return fmt.Errorf("no-op poll: %w", err)
				}
				v.Poll.add(run, st, obs)
			}
			for range o.runs {
				run, st, obs, err := b.measuredRead(ctx, p, agent.TriggerStart)
				if err != nil {
					return fmt.Errorf("no-op reconcile with a full snapshot: %w", err)
				}
				v.Full.add(run, st, obs)
				// Baseline (a) curls every key a full snapshot reads: a
				// shell tool configuring an instance has no earlier read.
				v.imdsPaths = v.imdsPaths[:0]
				for path := range st.ByPath {
					if path != emulator.TokenPath {
						v.imdsPaths = append(v.imdsPaths, path)
					}
				}
				slices.Sort(v.imdsPaths)
			}
			for range o.runs {
				c0 := b.settledChanges()
				run, err := p.reconcile(ctx, agent.TriggerDrift)
				if err != nil {
					return fmt.Errorf("no-op on a netlink event: %w", err)
				}
				c1 := b.settledChanges()
				v.NoopKernel = append(v.NoopKernel, run.Total)
				v.NoopKernelWrites = append(v.NoopKernelWrites, run.Writes)
				v.NoopKernelObserved = append(v.NoopKernelObserved, c1.sub(c0).Total())
			}
			v.Breakdown = map[string]series{}
			for range o.runs {
				steps, err := p.breakdown()
				if err != nil {
					return fmt.Errorf("timing the no-op's steps: %w", err)
				}
				for name, d := range steps {
					v.Breakdown[name] = append(v.Breakdown[name], d)
				}
			}
		}
		return nil
	})
	if v.reference.Rules == nil {
		b.r.Failures = append(b.r.Failures, v.Name+": no reference state (dualhomed's cold reconcile failed): baselines skipped")
		return
	}

	b.step(v.Name+": cold reconcile with IMDS unpaced (in-process)", func() error {
		for range o.runs {
			if err := b.reset(); err != nil {
				return err
			}
			p, err := newPipeline(b.w.url, -1)
			if err != nil {
				return err
			}
			run, err := p.reconcile(ctx, agent.TriggerStart)
			p.Close()
			if err != nil {
				return err
			}
			if d, err := b.verify(v); err != nil || !d.Empty() {
				return errors.Join(err, fmt.Errorf("end state differs: %s", d.Summary("paced", "unpaced")))
			}
			v.ColdUnpaced = append(v.ColdUnpaced, run.Total)
			v.ColdUnpacedIMDS = append(v.ColdUnpacedIMDS, run.IMDS)
		}
		return nil
	})

	b.step(v.Name+": cold reconcile with the `dualhomed apply` process", func() error {
		if _, err := os.Stat(o.dualhomed); err != nil {
			return fmt.Errorf("no dualhomed binary at %s (run `make build`)", o.dualhomed)
		}
		for range o.runs {
			if err := b.reset(); err != nil {
				return err
			}
			dir, err := os.MkdirTemp("", "dualhomed-bench-apply-*")
			if err != nil {
				return err
			}
			c0 := b.settledChanges()
			start := time.Now()
			out, err := exec.CommandContext(ctx, o.dualhomed, "apply", "--imds-endpoint", b.w.url,
				"--state-dir", dir, "--config", dir+"/absent.yaml").CombinedOutput()
			elapsed := time.Since(start)
			os.RemoveAll(dir)
			if err != nil {
				return fmt.Errorf("dualhomed apply: %w: %s", err, lastLines(string(out), 10))
			}
			c1 := b.settledChanges()
			if d, err := b.verify(v); err != nil || !d.Empty() {
				return errors.Join(err, fmt.Errorf("end state differs: %s", d.Summary("in-process", "dualhomed apply")))
			}
			v.Apply = append(v.Apply, elapsed)
			v.ApplyObserved = append(v.ApplyObserved, c1.sub(c0).Total())
		}
		return nil
	})

	script, err := scriptFor(b.w.pristine, v.reference, b.addrProto)
	if err != nil {
		b.r.Failures = append(b.r.Failures, v.Name+": scripting the baselines: "+err.Error())
		return
	}
	script.IMDSPaths = v.imdsPaths
	v.ScriptCommands = len(script.Commands)
	v.ScriptSysctls = len(script.Sysctls)
	v.ShellCurls = 1 + len(script.IMDSPaths)

	b.step(v.Name+": baseline (b), one ip -batch", func() error {
		for range o.runs {
			if err := b.reset(); err != nil {
				return err
			}
			run, err := runBatchBaseline(ctx, script)
			if err != nil {
				return err
			}
			v.Batch = append(v.Batch, run.Elapsed)
			v.BatchProcesses = run.Processes
			v.BatchWrites = run.Writes
		}
		v.BatchState = b.endState()
		return nil
	})

	b.step(v.Name+": baseline (a), one curl per IMDS key and one ip per object", func() error {
		for range o.shellRuns {
			if err := b.reset(); err != nil {
				return err
			}
			run, err := runShellBaseline(ctx, script, b.w.url)
			if err != nil {
				return err
			}
			v.Shell = append(v.Shell, run.Elapsed)
			v.ShellIMDS = append(v.ShellIMDS, run.IMDS)
			v.ShellProcesses = run.Processes
			v.ShellWrites = run.Writes
		}
		v.ShellState = b.endState()
		return nil
	})
	if err := b.reset(); err != nil {
		b.r.Failures = append(b.r.Failures, v.Name+": final reset: "+err.Error())
	}
}

// measuredRead runs one reconcile that reads IMDS on the warm pipeline p,
// after the client's request burst has refilled (as between two polls of the
// daemon), and returns it with the emulator's counts for it and the number
// of rtnetlink notifications it caused.
func (b *bench) measuredRead(ctx context.Context, p *pipeline, refresh agent.Trigger) (reconcileRun, emulator.Stats, int, error) {
	select {
	case <-ctx.Done():
		return reconcileRun{}, emulator.Stats{}, 0, ctx.Err()
	case <-time.After(bucketRefill):
	}
	if err := b.w.srv.ResetStats(); err != nil {
		return reconcileRun{}, emulator.Stats{}, 0, err
	}
	c0 := b.settledChanges()
	run, err := p.reconcile(ctx, refresh)
	st := b.w.srv.Stats()
	c1 := b.settledChanges()
	return run, st, c1.sub(c0).Total(), err
}

// endState describes how the kernel compares with the variant's reference.
func (b *bench) endState() string {
	v := b.r.Variants[len(b.r.Variants)-1]
	_, d, err := b.settledDiff(v.reference, !b.addrProto)
	if err != nil {
		return "not compared: " + err.Error()
	}
	if b.addrProto {
		if d.Empty() {
			return "identical"
		}
		return "DIFFERENT: " + d.Summary("dualhomed", "baseline")
	}
	if d.Empty() {
		return "identical except the addresses' protocol (IFA_PROTO), which this iproute2 cannot set"
	}
	return "DIFFERENT (besides the addresses' protocol, which this iproute2 cannot set): " + d.Summary("dualhomed", "baseline")
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

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
	var proc *daemonProc
	defer func() {
		if proc != nil {
			proc.stop(o.daemonLog)
		}
	}()
	// restart replaces the daemon with a fresh one and waits until it has
	// checked the kernel (already configured: it makes no change).
	restart := func(config string) error {
		if proc != nil {
			proc.stop(o.daemonLog)
			proc = nil
		}
		var err error
		if proc, err = startDaemon(o.dualhomed, b.w.url, config); err != nil {
			return err
		}
		if err := b.waitState(ctx, proc, v.reference, 30*time.Second); err != nil {
			return err
		}
		return proc.waitReady(ctx, 30*time.Second)
	}

	b.step("daemon: start to fully configured", func() error {
		if err := b.w.build(v.inst); err != nil {
			return err
		}
		if err := b.reset(); err != nil {
			return err
		}
		start := time.Now()
		var err error
		if proc, err = startDaemon(o.dualhomed, b.w.url, ""); err != nil {
			return err
		}
		if err := b.waitState(ctx, proc, v.reference, 60*time.Second); err != nil {
			return err
		}
		d.Converge = time.Since(start)
		return nil
	})
	if d.Converge == 0 {
		return
	}

	b.step(fmt.Sprintf("daemon: at rest for %v", o.idle), func() error {
		time.Sleep(2 * time.Second) // let the start-up settle (logs, first poll timer)
		if err := b.w.srv.ResetStats(); err != nil {
			return err
		}
		c0 := b.settledChanges()
		cpu0, err1 := proc.cpuTime()
		ticks0, err2 := proc.cpuTicks()
		if err := errors.Join(err1, err2); err != nil {
			return err
		}
		start := time.Now()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(o.idle):
		}
		cpu1, err1 := proc.cpuTime()
		ticks1, err2 := proc.cpuTicks()
		if err := errors.Join(err1, err2); err != nil {
			return errors.Join(err, proc.alive())
		}
		d.IdleWall = time.Since(start)
		d.IdleCPU = cpu1 - cpu0
		d.IdleCPUTicks = ticks1 - ticks0
		c1, lost := b.wt.Changes()
		d.IdleChanges = c1.sub(c0)
		d.IdleChangesLost = lost > 0
		st := b.w.srv.Stats()
		d.IdleRequests, d.IdleBytes = st.Requests, st.BytesSent
		d.IdlePolls = st.ByPath[macListingPath]
		var err error
		d.RSSPeakKiB, d.RSSKiB, err = proc.memory()
		return err
	})

	// Each drift is isolated: the daemon deliberately backs off when drift
	// repeats within a minute (another manager fighting it), so every
	// sample after the first is taken on a freshly started daemon.
	b.step("daemon: drift repair", func() error {
		var ours []string
		for k, r := range v.reference.Rules {
			if _, ok := b.w.pristine.Rules[k]; !ok && r.Protocol != 0 {
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
				if err := restart(""); err != nil {
					return fmt.Errorf("restarting the daemon: %w", err)
				}
			}
			k := ours[rng.IntN(len(ours))]
			rule := v.reference.Rules[k]
			gone := false
			back := b.wt.expect(func(have map[string]bool) bool {
				if !have[k] {
					gone = true
				}
				return gone && have[k]
			})
			t0 := time.Now()
			if err := b.w.h.RuleDel(&rule); err != nil {
				return fmt.Errorf("deleting rule %s: %w", k, err)
			}
			select {
			case t := <-back:
				d.Drift = append(d.Drift, t.Sub(t0))
			case <-time.After(10 * time.Second):
				return proc.logContext(errors.Join(fmt.Errorf("rule %s not restored within 10 s", k), proc.alive()))
			}
		}
		return nil
	})

	b.step(fmt.Sprintf("daemon: IMDS answering 500 for %v", o.fault), func() error {
		if err := restart(""); err != nil {
			return fmt.Errorf("restarting the daemon: %w", err)
		}
		before, err := dumpKernel(b.w.h)
		if err != nil {
			return err
		}
		if err := b.w.srv.ResetStats(); err != nil {
			return err
		}
		if err := b.w.srv.SetFaults(emulator.Faults{Status: 500}); err != nil {
			return err
		}
		start := time.Now()
		// A reload makes the daemon read IMDS now rather than at its next
		// poll, so the whole window is spent failing and backing off.
		if err := proc.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
		case <-time.After(o.fault):
		}
		st := b.w.srv.Stats()
		elapsed := time.Since(start)
		if err := b.w.srv.ClearFaults(); err != nil {
			return err
		}
		d.FaultRequests, d.FaultWall = st.Requests, elapsed
		_, diff, err := b.settledDiff(before, false)
		if err != nil {
			return err
		}
		d.FaultKept = diff.Empty()
		d.FaultDiff = diff.Summary("before", "after")
		if d.FaultRequests == 0 {
			return proc.logContext(errors.New("the daemon sent no IMDS request during the failure: it did not react to SIGHUP"))
		}
		return proc.alive()
	})

	b.step("daemon: hot attach", func() error {
		if err := restart(""); err != nil {
			return fmt.Errorf("restarting the daemon: %w", err)
		}
		if err := b.hotAttach(ctx, proc, v, d); err != nil {
			return proc.logContext(err)
		}
		if d.HotPingFailures > 0 {
			return proc.logContext(fmt.Errorf("%d of %d attaches got no ping reply; the first: %s", d.HotPingFailures, o.attaches, d.HotPingFailure))
		}
		return nil
	})

	if o.pollCPU <= 0 {
		return
	}
	b.step(fmt.Sprintf("daemon: CPU per poll (poll_interval %v, for %v)", pollCPUInterval, o.pollCPU), func() error {
		// The hot attaches end in the configured instance (the last ENI
		// with a new MAC); when they did not, start again from the boot.
		if proc != nil {
			proc.stop(o.daemonLog)
			proc = nil
		}
		if now, err := dumpKernel(b.w.h); err != nil || !compareStates(v.reference, now).Empty() {
			if err := b.w.build(v.inst); err != nil {
				return err
			}
			if err := b.reset(); err != nil {
				return err
			}
		}
		if err := restart(fmt.Sprintf("poll_interval: %v\n", pollCPUInterval)); err != nil {
			return fmt.Errorf("restarting the daemon with poll_interval %v: %w", pollCPUInterval, err)
		}
		return b.pollCPU(ctx, proc, d)
	})
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
func (b *bench) pollCPU(ctx context.Context, proc *daemonProc, d *daemonResult) error {
	want := max(1, int(b.o.pollCPU/pollCPUInterval))
	// Counts start from zero twice: to see the first poll, then for the window.
	if err := b.w.srv.ResetStats(); err != nil {
		return err
	}
	if _, err := b.afterNextPoll(ctx, proc, 0); err != nil {
		return err
	}
	if err := b.w.srv.ResetStats(); err != nil {
		return err
	}
	c0, _ := b.wt.Changes()
	cpu0, err := proc.cpuTime()
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
	cpu1, err := proc.cpuTime()
	if err != nil {
		return errors.Join(err, proc.alive())
	}
	d.PollCPUWall = time.Since(start)
	st := b.w.srv.Stats()
	c1, _ := b.wt.Changes()
	d.PollCPU = cpu1 - cpu0
	d.PollCPUInterval = pollCPUInterval
	d.PollCPUPolls = st.ByPath[macListingPath]
	d.PollCPURequests, d.PollCPUBytes = st.Requests, st.BytesSent
	d.PollCPUChanges = c1.sub(c0)
	return proc.alive()
}

// pollDone is how long after a poll's MAC listing the poll is surely over:
// one takes some 15 ms, and the next comes pollCPUInterval later.
const pollDone = 500 * time.Millisecond

// afterNextPoll waits until the emulator has served more than seen MAC
// listings since its last reset, then until that poll is over, and returns
// the new count.
func (b *bench) afterNextPoll(ctx context.Context, proc *daemonProc, seen int64) (int64, error) {
	deadline := time.Now().Add(2*pollCPUInterval + time.Second)
	for {
		if n := b.w.srv.Stats().ByPath[macListingPath]; n > seen {
			select {
			case <-ctx.Done():
				return n, ctx.Err()
			case <-time.After(pollDone):
			}
			return b.w.srv.Stats().ByPath[macListingPath], nil
		}
		if time.Now().After(deadline) {
			return seen, proc.logContext(errors.Join(fmt.Errorf("no poll (request of %s) within %v", macListingPath, 2*pollCPUInterval+time.Second), proc.alive()))
		}
		select {
		case <-ctx.Done():
			return seen, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// macListingPath is the IMDS listing of the attached ENIs' MACs.
const macListingPath = "/latest/meta-data/network/interfaces/macs/"

// waitState polls the kernel until it matches want.
func (b *bench) waitState(ctx context.Context, proc *daemonProc, want kernelState, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last stateDiff
	for time.Now().Before(deadline) {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := proc.alive(); err != nil {
			return err
		}
		got, err := dumpKernel(b.w.h)
		switch {
		case errors.Is(err, netlink.ErrDumpInterrupted):
			// The daemon is still changing the kernel faster than a dump
			// completes: not there yet.
		case err != nil:
			return err
		default:
			if last = compareStates(want, got); last.Empty() {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("not in the expected state after %v: %s", timeout, last.Summary("expected", "kernel"))
}

// pingTimeout bounds the wait for an attached ENI's rules and first ping
// reply: a working daemon needs a small fraction of it.
const pingTimeout = 5 * time.Second

// hotAttach attaches a new ENI again and again in the place of the last one
// (device number, addresses): its link is deleted and IMDS forgets it, the
// kernel is cleaned of its rules, IMDS learns a new ENI (new MAC), and only
// then does the new link arrive. Timed from the link's arrival (its
// RTM_NEWLINK notification in the instance) to its rules' notification and
// to the first ping answered through it; the move into the instance, which
// a hot-plugged NIC does not go through, is timed apart.
func (b *bench) hotAttach(ctx context.Context, proc *daemonProc, v *variantResult, d *daemonResult) error {
	i := len(v.inst.ENIs) - 1
	eni := v.inst.ENIs[i]
	var want []string
	for k, r := range v.reference.Rules {
		if r.Src != nil && ruleSrcOf(eni, r.Src.IP) {
			want = append(want, k)
		}
	}
	if len(want) == 0 {
		return fmt.Errorf("no rule of ENI %s in the reference state", eni.MAC)
	}
	if len(eni.LocalIPv4s) == 0 || len(eni.VPCIPv4CIDRs) == 0 {
		return errors.New("the hot-attached ENI has no IPv4 to ping")
	}
	// The VPC side: a client in the ENI's VPC but outside its subnet, so
	// that only the ENI's routing (not the subnet's connected route) can
	// carry the reply back.
	subnet := eni.SubnetIPv4CIDR.Masked()
	gw := netip.PrefixFrom(subnet.Addr().Next(), subnet.Bits())
	client := lastHost(eni.VPCIPv4CIDRs[0])
	if subnet.Contains(client) {
		return fmt.Errorf("cannot place a client outside subnet %s in VPC %s", subnet, eni.VPCIPv4CIDRs[0])
	}
	vpcLo, err := b.w.vpcH.LinkByName("lo")
	if err != nil {
		return err
	}
	clientAddr := &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(client, 32))}
	if err := b.w.vpcH.AddrAdd(vpcLo, clientAddr); err != nil {
		return fmt.Errorf("adding the VPC client address: %w", err)
	}
	defer b.w.vpcH.AddrDel(vpcLo, clientAddr)
	ping, err := newPinger(b.w.vpc, client)
	if err != nil {
		return err
	}
	defer ping.Close()

	current := eni
	for n := range b.o.attaches {
		if err := ctx.Err(); err != nil {
			return err
		}
		// Detach: the link goes and IMDS forgets the ENI. The daemon
		// removes a vanished ENI's rules at its next IMDS poll; the bench
		// does it at once so that the next attach starts clean.
		l, err := b.w.h.LinkByName(eniLink(i))
		if err != nil {
			return fmt.Errorf("finding %s: %w", eniLink(i), err)
		}
		gone := b.wt.expect(noRules(want))
		if err := b.w.h.LinkDel(l); err != nil {
			return fmt.Errorf("detaching %s: %w", eniLink(i), err)
		}
		if err := b.w.srv.DetachENI(current.MAC); err != nil {
			return err
		}
		time.Sleep(300 * time.Millisecond)
		for _, k := range want {
			r := v.reference.Rules[k]
			if err := b.w.h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("deleting rule %s: %w", k, err)
			}
		}
		select {
		case <-gone:
		case <-time.After(5 * time.Second):
			return errors.Join(fmt.Errorf("attach %d: the rules of detached %s keep coming back", n+1, eniLink(i)), proc.alive())
		}
		// IMDS knows the new ENI before its link arrives.
		current = eni
		current.MAC = fmt.Sprintf("02:00:00:01:%02x:%02x", n>>8, n&0xff)
		current.InterfaceID = fmt.Sprintf("eni-%017x", 0xa000+n)
		if err := b.w.srv.AttachENI(current); err != nil {
			return err
		}
		// An ENI is attached long after the daemon's last IMDS read: its
		// client's request bucket is full again, as here.
		time.Sleep(bucketRefill)

		// Attach: the veth pair is made and the router side configured in
		// the VPC namespace; the ENI end then arrives in the instance, as a
		// hot-plugged NIC does, and is brought up as udev/networkd would.
		if err := b.w.addENI(i, current.MAC, true); err != nil {
			return err
		}
		peer, err := b.w.vpcH.LinkByName(peerLink(i))
		if err != nil {
			return err
		}
		if err := b.w.vpcH.AddrAdd(peer, &netlink.Addr{IPNet: ipNet(gw)}); err != nil {
			return fmt.Errorf("configuring the VPC router address: %w", err)
		}
		end, err := b.w.vpcH.LinkByName(eniLink(i))
		if err != nil {
			return err
		}
		rules := b.wt.expect(allRules(want))
		arrived := b.wt.expectLink(end.Attrs().HardwareAddr)
		pctx, cancel := context.WithTimeout(ctx, pingTimeout)
		t0 := time.Now()
		if err := b.w.vpcH.LinkSetNsFd(end, int(b.w.self)); err != nil {
			cancel()
			return fmt.Errorf("moving %s into the instance: %w", eniLink(i), err)
		}
		pinged := make(chan time.Time, 1)
		go func() {
			t, err := ping.firstReply(pctx, eni.LocalIPv4s[0], time.Millisecond)
			if err != nil {
				t = time.Time{}
			}
			pinged <- t
		}()
		if l, err := b.w.h.LinkByName(eniLink(i)); err == nil {
			if err := b.w.h.LinkSetUp(l); err != nil {
				cancel()
				return fmt.Errorf("setting %s up: %w", eniLink(i), err)
			}
		}
		var tRules, tArrival time.Time
		select {
		case tRules = <-rules:
		case <-time.After(pingTimeout):
			cancel()
			return errors.Join(fmt.Errorf("attach %d: rules not in place within %v", n+1, pingTimeout), proc.alive())
		}
		// The link's notification is handled before the rules' ones (one
		// socket, in order): it is there unless the socket overran.
		select {
		case tArrival = <-arrived:
		case <-time.After(time.Second):
			cancel()
			return fmt.Errorf("attach %d: no RTM_NEWLINK notification of %s (%s) in the instance", n+1, eniLink(i), current.MAC)
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
				d.HotPingFailure = fmt.Sprintf("attach %d: no ping reply from %s through %s within %v; %s", n+1, eni.LocalIPv4s[0], eniLink(i),
					pingTimeout, routingDiagnosis(eni.LocalIPv4s[0], client, eniLink(i)))
			}
			continue
		}
		d.HotPing = append(d.HotPing, t.Sub(tArrival))
		d.HotMovePing = append(d.HotMovePing, t.Sub(t0))
	}
	return nil
}

// ruleSrcOf reports whether ip is one of the ENI's addresses or prefixes.
func ruleSrcOf(e imds.ENI, ip []byte) bool {
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return false
	}
	a = a.Unmap()
	if slices.Contains(e.LocalIPv4s, a) || slices.Contains(e.IPv6s, a) {
		return true
	}
	for _, p := range slices.Concat(e.IPv4Prefixes, e.IPv6Prefixes) {
		if p.Addr() == a {
			return true
		}
	}
	return false
}

// lastHost is the last usable IPv4 address of p.
func lastHost(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v |= host
	v--
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// routingDiagnosis shows how the instance would answer a client, for the
// error message of a failed ping.
func routingDiagnosis(local, client netip.Addr, link string) string {
	var b strings.Builder
	for _, args := range [][]string{
		{"-4", "addr", "show", "dev", link, "to", local.String() + "/32"},
		{"-4", "route", "get", client.String(), "from", local.String()},
		{"-4", "neigh", "show", "dev", link},
	} {
		out, err := exec.Command("ip", args...).CombinedOutput()
		fmt.Fprintf(&b, "\n  ip %s: %s", strings.Join(args, " "), strings.TrimSpace(string(out)))
		if err != nil {
			fmt.Fprintf(&b, " (%v)", err)
		}
	}
	// Every route of the client's /16 (the ENI's VPC in ExampleInstance).
	out, _ := exec.Command("ip", "-d", "-4", "route", "show", "table", "all").Output()
	p := netip.PrefixFrom(client, 16).Masked()
	prefix := strings.TrimSuffix(p.Addr().String(), "0.0")
	b.WriteString("\n  routes of " + p.String() + ":")
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, prefix) && !strings.Contains(line, "table local") {
			b.WriteString("\n    " + strings.TrimSpace(line))
		}
	}
	return b.String()
}
