package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// bench runs the measurements in one simulated instance at a time.
type bench struct {
	ctx      context.Context // cancelled by Ctrl-C: the remaining steps are skipped
	o        options
	w        *simworld.World // the instance of the step under way
	wt       *watcher        // its rtnetlink notifications
	pristine simworld.State  // its kernel after boot: links up, the primary ENI's DHCP address and default route
	r        *results
}

// measure runs every measurement, then writes the report.
func measure(ctx context.Context, o options) int {
	r := &results{o: o, Started: time.Now(), LoadStart: loadAverage()}
	b := &bench{ctx: ctx, o: o, r: r}
	defer b.closeWorld()

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

// step runs one measurement: its failure is recorded and the others still run.
func (b *bench) step(name string, fn func() error) {
	if b.ctx.Err() != nil {
		return
	}
	b.logf("%s", name)
	if err := fn(); err != nil {
		b.r.Failures = append(b.r.Failures, fmt.Sprintf("%s: %v", name, err))
		b.logf("%s: FAILED: %v", name, err)
	}
}

// minimalImage is the daemon's configuration for the bench's instance, a
// minimal image on which nothing runs DHCP on the secondary ENIs: dualhomed
// adds their primary IPv4 itself, at once, as docs/config.md says to
// configure such an image (the default dhcp_grace waits 3 s for a DHCP
// client).
const minimalImage = "dhcp_grace: 0s\n"

// build replaces the world with a freshly booted instance inst (as a
// minimal image boots: dualhomed configures every secondary ENI), its IMDS
// emulator running and its rtnetlink notifications watched, and records
// its pristine state.
func (b *bench) build(inst emulator.Instance) error {
	b.closeWorld()
	w, err := simworld.New(simworld.Options{Instance: &inst, MinimalBoot: true, DualhomedBin: b.o.dualhomed})
	if err != nil {
		return err
	}
	b.w = w
	if err := w.StartIMDS(); err != nil {
		return err
	}
	if b.wt, err = newWatcher(w.Instance); err != nil {
		return err
	}
	b.pristine, err = b.settle()
	return err
}

func (b *bench) closeWorld() {
	if b.wt != nil {
		b.wt.Close()
		b.wt = nil
	}
	if b.w == nil {
		return
	}
	if err := b.w.Close(); err != nil {
		b.logf("removing the simulated instance: %v", err)
	}
	b.w = nil
}

// settle waits until the kernel has finished reacting to new links (IPv6
// link-local addresses and multicast routes appear a moment after a link
// comes up) and returns the settled state.
func (b *bench) settle() (simworld.State, error) {
	prev, err := simworld.ReadState(b.w.Instance)
	deadline := time.Now().Add(5 * time.Second)
	for err == nil {
		time.Sleep(100 * time.Millisecond)
		var cur simworld.State
		if cur, err = simworld.ReadState(b.w.Instance); err != nil {
			break
		}
		if compareStates(prev, cur).Empty() && linkLocalsReady(cur) {
			return cur, nil
		}
		if time.Now().After(deadline) {
			return simworld.State{}, errors.New("the kernel did not settle within 5 s after creating the links")
		}
		prev = cur
	}
	return simworld.State{}, err
}

// linkLocalsReady reports whether every ENI link has its IPv6 link-local address.
func linkLocalsReady(s simworld.State) bool {
	have := map[int]bool{}
	for _, a := range s.Addrs {
		have[a.LinkIndex] = have[a.LinkIndex] || a.Prefix.Addr().IsLinkLocalUnicast()
	}
	for i, name := range s.LinkNames {
		if strings.HasPrefix(name, "eth") && !have[i] {
			return false
		}
	}
	return true
}

// reset brings the kernel back to the pristine state of the current world,
// unless the run is interrupted.
func (b *bench) reset() error {
	if err := b.ctx.Err(); err != nil {
		return err
	}
	return resetKernel(b.w.Instance, b.pristine)
}

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

// until reads the kernel until it matches want or timeout passes, and
// returns how they differ last (empty once they match): the kernel finishes
// some work a moment after a tool returns (IPv6 local routes of new
// addresses), and a daemon converges over a while. With ignoreAddrProto the
// addresses' protocols are left out, for tools that cannot set them. It
// stops early when the run is interrupted or daemon (when not nil) exits.
func (b *bench) until(want simworld.State, timeout time.Duration, daemon *simworld.Proc, ignoreAddrProto bool) (stateDiff, error) {
	if ignoreAddrProto {
		want = want.WithoutAddrProto()
	}
	d := stateDiff{OnlyB: []string{"(the kernel changed during every read)"}}
	for deadline := time.Now().Add(timeout); ; time.Sleep(10 * time.Millisecond) {
		if daemon != nil {
			if err := alive(daemon); err != nil {
				return d, err
			}
		}
		got, err := simworld.ReadState(b.w.Instance)
		switch {
		case errors.Is(err, netlink.ErrDumpInterrupted):
			// Changing faster than a dump completes: not there yet.
		case err != nil:
			return d, err
		case ignoreAddrProto:
			d = compareStates(want, got.WithoutAddrProto())
		default:
			d = compareStates(want, got)
		}
		if d.Empty() || time.Now().After(deadline) || b.ctx.Err() != nil {
			return d, b.ctx.Err()
		}
	}
}

// match is until as a check: an error unless the kernel reaches want,
// which the error calls wantName.
func (b *bench) match(want simworld.State, wantName string, timeout time.Duration, daemon *simworld.Proc) error {
	d, err := b.until(want, timeout, daemon, false)
	if err == nil && !d.Empty() {
		err = fmt.Errorf("the kernel differs from %s after %v: %s", wantName, timeout, d.Summary(wantName, "the kernel"))
	}
	return err
}

// variant measures dualhomed and the baselines on the full-scale instance
// with the given number of network cards.
func (b *bench) variant(ctx context.Context, cards int) {
	o := b.o
	v := &variantResult{Name: fmt.Sprintf("%d network card", cards), Objects: map[string]int{}}
	if cards > 1 {
		v.Name += "s"
	}
	b.r.Variants = append(b.r.Variants, v)
	v.inst = emulator.ExampleInstance(o.enis, o.ipv4, o.ipv6, o.prefixes, cards)
	var built bool
	b.step(v.Name+": building the instance", func() error {
		err := b.build(v.inst)
		built = err == nil
		return err
	})
	if !built {
		return
	}

	// Cold reconciles with the client as the daemon builds it (default IMDS
	// pacing); the last run's pipeline then makes the no-op reconciles the
	// daemon's next poll and next netlink event make.
	b.step(v.Name+": cold and no-op reconcile (in-process agent.Reconciler)", func() error {
		for i := range o.runs {
			p, run, notified, err := b.cold(v, 0)
			if err != nil {
				return fmt.Errorf("run %d: %w", i+1, err)
			}
			v.Cold.add(run, emulator.Stats{Requests: int64(run.Requests)}, notified)
			if i < o.runs-1 {
				p.Close()
				continue
			}
			defer p.Close()
			return b.noops(v, p)
		}
		return nil
	})
	if v.reference.Rules == nil {
		b.r.Failures = append(b.r.Failures, v.Name+": no reference state (dualhomed's cold reconcile failed): baselines skipped")
		return
	}
	script := scriptFor(b.pristine, v.reference)
	script.IMDSPaths = v.imdsPaths
	for _, c := range script.Commands {
		v.Objects[c.Args[0]]++ // rule, route, addr
	}
	v.Objects["rp_filter"], v.ShellCurls = len(script.Sysctls), 1+len(script.IMDSPaths)

	b.step(v.Name+": cold reconcile with IMDS unpaced (in-process)", func() error {
		for range o.runs {
			p, run, _, err := b.cold(v, -1)
			if err != nil {
				return err
			}
			p.Close()
			v.ColdUnpaced.add(run, emulator.Stats{}, 0)
		}
		return nil
	})

	b.step(v.Name+": cold reconcile with the `dualhomed apply` process", func() error {
		for range o.runs {
			if err := b.reset(); err != nil {
				return err
			}
			dir, err := os.MkdirTemp("", "dualhomed-bench-apply-*")
			if err != nil {
				return err
			}
			if err := os.WriteFile(dir+"/dualhomed.yaml", []byte(minimalImage), 0o644); err != nil {
				return err
			}
			c0 := b.settledChanges()
			var out []byte
			var elapsed time.Duration
			err = b.w.Instance.Do(func() (err error) {
				start := time.Now()
				out, err = exec.CommandContext(ctx, o.dualhomed, "apply", "--imds-endpoint", simworld.IMDSEndpoint,
					"--state-dir", dir, "--config", dir+"/dualhomed.yaml").CombinedOutput()
				elapsed = time.Since(start)
				return err
			})
			os.RemoveAll(dir)
			if err != nil {
				return fmt.Errorf("dualhomed apply: %w: %s", err, simworld.Tail(strings.TrimSpace(string(out)), 10))
			}
			c1 := b.settledChanges()
			if err := b.match(v.reference, "the in-process run", time.Second, nil); err != nil {
				return err
			}
			v.Apply.add(reconcileRun{Total: elapsed}, emulator.Stats{}, c1.sub(c0).Total())
		}
		return nil
	})

	// The baselines' processes are forked by a thread inside the instance.
	for _, bl := range []struct {
		name string
		n    int
		runs *baselineRuns
		run  func(context.Context, baselineScript) (baselineRun, error)
	}{
		{"baseline (b), one ip -batch", o.runs, &v.Batch, batchBaseline},
		{"baseline (a), one curl per IMDS key and one ip per object", o.shellRuns, &v.Shell, shellBaseline},
	} {
		b.step(v.Name+": "+bl.name, func() error {
			for range bl.n {
				if err := b.reset(); err != nil {
					return err
				}
				var run baselineRun
				err := b.w.Instance.Do(func() (err error) {
					run, err = bl.run(ctx, script)
					return err
				})
				if err != nil {
					return err
				}
				bl.runs.Time, bl.runs.IMDS = append(bl.runs.Time, run.Elapsed), append(bl.runs.IMDS, run.IMDS)
				bl.runs.Processes, bl.runs.Writes = run.Processes, run.Writes
			}
			bl.runs.State = b.endState()
			return nil
		})
	}
	if err := b.reset(); err != nil {
		b.r.Failures = append(b.r.Failures, v.Name+": final reset: "+err.Error())
	}
}

// cold runs one cold reconcile on the reset kernel with a new pipeline
// (newPipeline's IMDS pacing), and checks its end state against the
// variant's reference, which the first run makes. It returns the pipeline,
// open, the run and the rtnetlink notifications it caused.
func (b *bench) cold(v *variantResult, requestsPerSecond float64) (*pipeline, reconcileRun, int, error) {
	if err := b.reset(); err != nil {
		return nil, reconcileRun{}, 0, err
	}
	p, err := newPipeline(b.w.Instance, requestsPerSecond)
	if err != nil {
		return nil, reconcileRun{}, 0, err
	}
	c0 := b.settledChanges()
	run, err := p.reconcile(b.ctx, readFull)
	notified := b.settledChanges().sub(c0).Total()
	switch {
	case err != nil:
	case v.reference.Rules == nil:
		v.reference, err = simworld.ReadState(b.w.Instance)
	default:
		err = b.match(v.reference, "the first cold run", time.Second, nil)
	}
	if err != nil {
		p.Close()
		return nil, run, notified, err
	}
	return p, run, notified, nil
}

// noops measures the no-op reconciles on p, which holds a good snapshot:
// the poll as the daemon's timer runs it, the full snapshot a start, a
// reload and every so many polls read (each with its IMDS cost counted by
// the emulator), the kernel pass a netlink event runs, and that pass's
// steps one by one.
func (b *bench) noops(v *variantResult, p *pipeline) error {
	for range b.o.runs {
		run, st, notified, err := b.measuredRead(p, readPoll)
		if err != nil {
			return fmt.Errorf("no-op poll: %w", err)
		}
		v.Poll.add(run, st, notified)
	}
	for range b.o.runs {
		run, st, notified, err := b.measuredRead(p, readFull)
		if err != nil {
			return fmt.Errorf("no-op reconcile with a full snapshot: %w", err)
		}
		v.Full.add(run, st, notified)
		// Baseline (a) curls every key a full snapshot reads: a shell tool
		// configuring an instance has no earlier read.
		v.imdsPaths = slices.Sorted(maps.Keys(st.ByPath))
		v.imdsPaths = slices.DeleteFunc(v.imdsPaths, func(path string) bool { return path == emulator.TokenPath })
	}
	for range b.o.runs {
		c0 := b.settledChanges()
		run, err := p.reconcile(b.ctx, readNone)
		if err != nil {
			return fmt.Errorf("no-op on a netlink event: %w", err)
		}
		v.NoopKernel.add(run, emulator.Stats{}, b.settledChanges().sub(c0).Total())
	}
	v.Breakdown = map[string]series{}
	for range b.o.runs {
		steps, err := p.breakdown()
		if err != nil {
			return fmt.Errorf("timing the no-op's steps: %w", err)
		}
		for name, d := range steps {
			v.Breakdown[name] = append(v.Breakdown[name], d)
		}
	}
	return nil
}

// measuredRead runs one reconcile that reads IMDS on the warm pipeline p,
// after the client's request burst has refilled (as between two polls of the
// daemon), and returns it with the emulator's counts for it and the number
// of rtnetlink notifications it caused.
func (b *bench) measuredRead(p *pipeline, r read) (reconcileRun, emulator.Stats, int, error) {
	if err := simworld.Sleep(b.ctx, bucketRefill); err != nil {
		return reconcileRun{}, emulator.Stats{}, 0, err
	}
	b.w.IMDS.ResetStats()
	c0 := b.settledChanges()
	run, err := p.reconcile(b.ctx, r)
	st := b.w.IMDS.Stats()
	return run, st, b.settledChanges().sub(c0).Total(), err
}

// endState describes how the kernel compares with the variant's reference,
// the addresses' protocols left out.
func (b *bench) endState() string {
	v := b.r.Variants[len(b.r.Variants)-1]
	d, err := b.until(v.reference, time.Second, nil, true)
	switch {
	case err != nil:
		return "not compared: " + err.Error()
	case d.Empty():
		return "identical except the addresses' protocol (IFA_PROTO), which the baselines do not set"
	}
	return "DIFFERENT (besides the addresses' protocol): " + d.Summary("dualhomed", "baseline")
}
