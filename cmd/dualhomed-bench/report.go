package main

import (
	"bytes"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// Targets of issue 7.
const (
	targetColdVsBatch  = 1.5 // cold reconcile at most 1.5 × baseline (b)
	targetColdVsShell  = 20  // and at least 20 × faster than baseline (a)
	targetNoop         = 5 * time.Millisecond
	targetHotAttach    = 50 * time.Millisecond
	targetDrift        = 100 * time.Millisecond
	targetIdleCPU      = 0.001 // fraction of one core
	targetRSSBytes     = 30e6
	daemonIMDSBackoff0 = time.Second      // agent/daemon.go: first retry delay after a failed IMDS read
	daemonIMDSBackoffM = 15 * time.Second // capped by the poll interval (agent.DefaultPollInterval)
)

// results are every figure of one run.
type results struct {
	o         options
	Started   time.Time
	Finished  time.Time
	AddrProto bool
	Variants  []*variantResult
	Daemon    *daemonResult
	Failures  []string
	LoadStart string // /proc/loadavg when the measurements started
}

type variantResult struct {
	Name string

	inst      emulator.Instance
	reference simworld.State // dualhomed's end state: what every tool must reach
	imdsPaths []string

	Objects map[string]int // objects dualhomed made, by kind: rule, route, addr, rp_filter

	Cold, ColdUnpaced runs              // cold reconciles, with the client's pacing and without
	Poll              runs              // no-op reconciles as the poll timer runs them (readPoll)
	Full              runs              // no-op reconciles reading a full snapshot (readFull)
	NoopKernel        runs              // no-op reconciles as a netlink event runs them (readNone)
	Apply             runs              // `dualhomed apply` processes (time and notifications)
	Breakdown         map[string]series // steps of the no-op kernel pass
	ShellCurls        int
	Shell, Batch      baselineRuns // (a) and (b)
}

// runs are reconciles of one kind: their time, of which reading IMDS, the
// writes Apply counted and the rtnetlink notifications seen, and the IMDS
// requests and response bytes of each.
type runs struct {
	Total, IMDS                       series
	Writes, Observed, Requests, Bytes []int
}

func (r *runs) add(run reconcileRun, st emulator.Stats, observed int) {
	r.Total = append(r.Total, run.Total)
	r.IMDS = append(r.IMDS, run.IMDS)
	r.Writes = append(r.Writes, run.Writes)
	r.Observed = append(r.Observed, observed)
	r.Requests = append(r.Requests, int(st.Requests))
	r.Bytes = append(r.Bytes, int(st.BytesSent))
}

type daemonResult struct {
	Converge        time.Duration
	IdleWall        time.Duration
	IdleCPU         time.Duration // from the process CPU-time clock (ns)
	IdleCPUTicks    time.Duration // utime+stime from /proc/<pid>/stat (10 ms ticks)
	IdleChanges     changeCounts
	IdleChangesLost bool
	IdleRequests    int64
	IdlePolls       int64 // IMDS MAC listings in the window: one per poll
	IdleBytes       int64
	RSSPeakKiB      int
	RSSKiB          int
	Drift           series
	HotRules        series // link arrival (RTM_NEWLINK in the instance) → last rule
	HotPing         series // link arrival → first ping reply
	HotMove         series // move started → link arrival: the veth move's own cost
	HotMoveRules    series // move started → last rule
	HotMovePing     series // move started → first ping reply
	HotPingFailures int    // attaches whose ENI never answered a ping
	HotPingFailure  string // why the first of them did not
	FaultRequests   int64
	FaultWall       time.Duration
	FaultKept       bool
	FaultDiff       string

	// A daemon polling every PollCPUInterval, watched for PollCPUWall.
	PollCPUInterval time.Duration
	PollCPUWall     time.Duration
	PollCPU         time.Duration
	PollCPUPolls    int64 // IMDS MAC listings: one per poll
	PollCPURequests int64
	PollCPUBytes    int64
	PollCPUChanges  changeCounts
}

func newResults(o options) *results {
	return &results{o: o, Started: time.Now(), LoadStart: loadAverage()}
}

// loadAbove reports whether the 1-minute figure of a loadAverage exceeds limit.
func loadAbove(load string, limit float64) bool {
	f := strings.Fields(load)
	if len(f) == 0 {
		return false
	}
	v, err := strconv.ParseFloat(f[0], 64)
	return err == nil && v > limit
}

// loadAverage is the 1, 5 and 15 minute load average: other work on the
// machine during the run makes every figure slower.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func (v *variantResult) objects() int {
	return v.Objects["rule"] + v.Objects["route"] + v.Objects["addr"] + v.Objects["rp_filter"]
}

func verdict(ok bool) string {
	if ok {
		return "pass"
	}
	return "**FAIL**"
}

// row is one line of the summary table.
type row struct {
	what, dualhomed, shell, batch, ratios, target, result string
}

func (r *results) rows() []row {
	var rows []row
	na := "not measured"
	for _, v := range r.Variants {
		if len(v.Cold.Total) == 0 {
			rows = append(rows, row{"Cold reconcile, " + v.Name, na, "", "", "", "", "**FAIL**"})
			continue
		}
		d, a, b := v.Cold.Total.median(), v.Shell.Time.median(), v.Batch.Time.median()
		res := "—"
		if len(v.Shell.Time) > 0 && len(v.Batch.Time) > 0 {
			okB := float64(d) <= targetColdVsBatch*float64(b)
			okA := float64(a) >= targetColdVsShell*float64(d)
			res = fmt.Sprintf("vs (b) %s, vs (a) %s", verdict(okB), verdict(okA))
		}
		rows = append(rows, row{
			what:      fmt.Sprintf("Cold reconcile, %s (IMDS reads included): time", v.Name),
			dualhomed: v.Cold.Total.medianRange(),
			shell:     v.Shell.Time.medianRange(),
			batch:     v.Batch.Time.medianRange(),
			ratios:    fmt.Sprintf("(a)/dualhomed %s; dualhomed/(b) %s", ratio(a, d), ratio(d, b)),
			target:    fmt.Sprintf("≤ %.1f × (b) and ≥ %d × faster than (a)", targetColdVsBatch, targetColdVsShell),
			result:    res,
		})
		rows = append(rows, row{
			what:      fmt.Sprintf("Cold reconcile, %s: writes", v.Name),
			dualhomed: fmt.Sprintf("%s (%d objects)", intRange(v.Cold.Writes), v.objects()),
			shell:     fmt.Sprintf("%d (%d processes)", v.Shell.Writes, v.Shell.Processes),
			batch:     fmt.Sprintf("%d (%d processes)", v.Batch.Writes, v.Batch.Processes),
		})
		if len(v.ColdUnpaced.Total) > 0 {
			d := v.ColdUnpaced.Total.median()
			rows = append(rows, row{
				what:      fmt.Sprintf("Cold reconcile, %s, IMDS client unpaced (informative)", v.Name),
				dualhomed: v.ColdUnpaced.Total.medianRange(),
				ratios:    fmt.Sprintf("(a)/dualhomed %s; dualhomed/(b) %s", ratio(a, d), ratio(d, b)),
			})
		}
	}
	if len(r.Variants) > 0 && len(r.Variants[0].Poll.Total) > 0 {
		v := r.Variants[0]
		zero := func(w []int) bool {
			for _, x := range w {
				if x != 0 {
					return false
				}
			}
			return true
		}
		rows = append(rows,
			row{
				what:      "No-op reconcile on a netlink event (kernel only): time, writes",
				dualhomed: fmt.Sprintf("%s, %s writes", v.NoopKernel.Total.medianRange(), intRange(v.NoopKernel.Writes)),
				target:    "< 5 ms, 0 writes",
				result:    verdict(v.NoopKernel.Total.median() < targetNoop && zero(v.NoopKernel.Writes) && zero(v.NoopKernel.Observed)),
			},
			row{
				what:      "No-op reconcile on the poll timer (" + pollReadName + ": one paced IMDS read + kernel): time, writes",
				dualhomed: fmt.Sprintf("%s, %s writes", v.Poll.Total.medianRange(), intRange(v.Poll.Writes)),
				target:    "0 writes (time: see method)",
				result:    verdict(zero(v.Poll.Writes) && zero(v.Poll.Observed)),
			},
			row{
				what:      "IMDS cost of one poll (" + pollReadName + "): requests, response bytes",
				dualhomed: fmt.Sprintf("%s requests, %s bytes", intRange(v.Poll.Requests), intRange(v.Poll.Bytes)),
				shell:     fmt.Sprintf("%d curl processes", v.ShellCurls),
			},
			row{
				what: "No-op reconcile reading the full snapshot (" + fullReadName + ": start, reload, and every so many polls; informative): time, writes; IMDS requests, response bytes",
				dualhomed: fmt.Sprintf("%s, %s writes; %s requests, %s bytes",
					v.Full.Total.medianRange(), intRange(v.Full.Writes), intRange(v.Full.Requests), intRange(v.Full.Bytes)),
				shell:  fmt.Sprintf("%d curl processes", v.ShellCurls),
				target: "0 writes",
				result: verdict(zero(v.Full.Writes) && zero(v.Full.Observed)),
			},
		)
	}
	d := r.Daemon
	if d == nil {
		return rows
	}
	if len(d.HotRules) > 0 {
		rows = append(rows,
			row{what: "Hot attach: link arrival (RTM_NEWLINK in the instance) → its rules in place", dualhomed: d.HotRules.percentiles(),
				target: "p50 < 50 ms", result: verdict(d.HotRules.quantile(0.5) < targetHotAttach)},
			pingRow(d),
			row{what: "Hot attach from the start of the veth move (the move's own kernel cost included, informative) → rules in place; → first ping reply",
				dualhomed: d.HotMoveRules.percentiles() + "; " + d.HotMovePing.percentiles()})
	} else {
		rows = append(rows, row{what: "Hot attach", dualhomed: na, target: "p50 < 50 ms", result: "**FAIL**"})
	}
	if len(d.Drift) > 0 {
		rows = append(rows, row{what: "Drift repair: rule deleted → back", dualhomed: d.Drift.percentiles(),
			target: "p50 < 100 ms", result: verdict(d.Drift.quantile(0.5) < targetDrift)})
	} else {
		rows = append(rows, row{what: "Drift repair", dualhomed: na, target: "p50 < 100 ms", result: "**FAIL**"})
	}
	if d.IdleWall > 0 {
		frac := d.IdleCPU.Seconds() / d.IdleWall.Seconds()
		rows = append(rows,
			row{what: fmt.Sprintf("Daemon at rest %.0f s: CPU", d.IdleWall.Seconds()),
				dualhomed: fmt.Sprintf("%.3f s (%.3f %% of a core; %d polls in the window)", d.IdleCPU.Seconds(), 100*frac, d.IdlePolls),
				target:    "< 0.1 % of a core", result: verdict(frac < targetIdleCPU)},
			row{what: "Daemon peak RSS (VmHWM)",
				dualhomed: fmt.Sprintf("%.1f MB (now %.1f MB)", float64(d.RSSPeakKiB)*1024/1e6, float64(d.RSSKiB)*1024/1e6),
				target:    "< 30 MB", result: verdict(float64(d.RSSPeakKiB)*1024 < targetRSSBytes)},
			row{what: "Daemon at rest: netlink writes, IMDS requests",
				dualhomed: fmt.Sprintf("%d writes, %d requests (%d bytes)", d.IdleChanges.Total(), d.IdleRequests, d.IdleBytes),
				target:    "0 writes", result: verdict(d.IdleChanges.Total() == 0 && !d.IdleChangesLost)})
	} else {
		rows = append(rows, row{what: "Daemon at rest", dualhomed: na, target: "< 0.1 % CPU, < 30 MB", result: "**FAIL**"})
	}
	if d.PollCPUPolls > 0 {
		perPoll := d.PollCPU / time.Duration(d.PollCPUPolls)
		rows = append(rows, row{
			what: fmt.Sprintf("Daemon polling every %s for %.0f s (informative): CPU per poll; IMDS requests per poll; idle CPU this implies at the default %s interval",
				seconds(d.PollCPUInterval), d.PollCPUWall.Seconds(), seconds(pollInterval)),
			dualhomed: fmt.Sprintf("%s per poll (%d polls); %.0f requests per poll; %.3f %% of a core",
				fmtDur(perPoll), d.PollCPUPolls, float64(d.PollCPURequests)/float64(d.PollCPUPolls),
				100*perPoll.Seconds()/pollInterval.Seconds()),
		})
	}
	if d.FaultWall > 0 {
		rate := float64(d.FaultRequests) / d.FaultWall.Seconds()
		bound := faultBound(d.FaultWall)
		res := verdict(float64(d.FaultRequests) <= bound)
		kept := "kernel state unchanged"
		if !d.FaultKept {
			kept = "kernel state CHANGED: " + d.FaultDiff
			res = "**FAIL**"
		}
		rows = append(rows, row{what: fmt.Sprintf("IMDS answering 500 for %.0f s: requests/s", d.FaultWall.Seconds()),
			dualhomed: fmt.Sprintf("%.2f req/s (%d requests); %s", rate, d.FaultRequests, kept),
			target:    fmt.Sprintf("≤ %.0f requests (%.2f req/s): backoff bound", bound, bound/d.FaultWall.Seconds()),
			result:    res})
	}
	return rows
}

// faultBound is the most requests the daemon may send while every IMDS
// request fails for window: one snapshot per step of its backoff (1 s,
// doubling, capped by the poll interval), plus one already under way, each
// with at most imdsMaxAttempt attempts of its first request.
func faultBound(window time.Duration) float64 {
	snapshots := 2 // the one under way when the fault starts, and the first failure
	delay := daemonIMDSBackoff0
	for t := delay; t <= window; t += delay {
		snapshots++
		delay = min(2*delay, daemonIMDSBackoffM)
	}
	return float64(snapshots * imdsMaxAttempt)
}

// summaryTable is the Markdown table of the headline figures.
func (r *results) summaryTable() string {
	var b strings.Builder
	b.WriteString("| Measurement | dualhomed | (a) shell: curl per key, ip per object | (b) ip -batch | Ratios | Target | Result |\n")
	b.WriteString("|---|---|---|---|---|---|---|\n")
	for _, x := range r.rows() {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s |\n", x.what, x.dualhomed, x.shell, x.batch, x.ratios, x.target, x.result)
	}
	return b.String()
}

// write renders the report to path.
func (r *results) write(path string) error {
	var b bytes.Buffer
	o := r.o
	fmt.Fprintf(&b, "# dualhomed benchmarks\n\n")
	fmt.Fprintf(&b, "Generated by `cmd/dualhomed-bench` (run `sudo make bench`); do not edit by hand.\n\n")

	b.WriteString("## Machine and run\n\n| | |\n|---|---|\n")
	for _, kv := range machineFacts() {
		fmt.Fprintf(&b, "| %s | %s |\n", kv[0], kv[1])
	}
	fmt.Fprintf(&b, "| Date | %s |\n", r.Started.UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(&b, "| Duration | %s |\n", r.Finished.Sub(r.Started).Round(time.Second))
	fmt.Fprintf(&b, "| Load average (1, 5, 15 min) at start, at end | %s; %s |\n", r.LoadStart, loadAverage())
	fmt.Fprintf(&b, "| Command | `%s` |\n\n", commandLine(o))

	b.WriteString("## Scale\n\n")
	fmt.Fprintf(&b, "%d ENIs (the primary and %d secondary ENIs, each in its own VPC), each with %d private IPv4 addresses, "+
		"%d IPv6 addresses and %d delegated IPv4 prefixes (plus as many IPv6 prefixes), from `emulator.ExampleInstance`. ",
		o.enis, o.enis-1, o.ipv4, o.ipv6, o.prefixes)
	for _, v := range r.Variants {
		if v.objects() > 0 {
			fmt.Fprintf(&b, "With %s dualhomed creates %d objects: %d rules, %d routes, %d addresses, %d rp_filter values. ",
				v.Name, v.objects(), v.Objects["rule"], v.Objects["route"], v.Objects["addr"], v.Objects["rp_filter"])
		}
	}
	b.WriteString("\n\n## Summary\n\n")
	b.WriteString("Times are median (min–max) over the runs; latencies are percentiles over the events.\n\n")
	b.WriteString(r.summaryTable())

	for _, v := range r.Variants {
		fmt.Fprintf(&b, "\n## Reconcile details, %s\n\n| Figure | Value |\n|---|---|\n", v.Name)
		kv := func(k, val string) { fmt.Fprintf(&b, "| %s | %s |\n", k, val) }
		kv("dualhomed cold reconcile (in-process agent.Reconciler, default IMDS pacing)", fmt.Sprintf("%s over %d runs", v.Cold.Total.medianRange(), len(v.Cold.Total)))
		kv("… of which reading IMDS", v.Cold.IMDS.medianRange())
		kv("… IMDS requests", intRange(v.Cold.Requests))
		kv("… writes counted by Apply / rtnetlink notifications seen", fmt.Sprintf("%s / %s", intRange(v.Cold.Writes), intRange(v.Cold.Observed)))
		kv("dualhomed cold reconcile, IMDS unpaced", v.ColdUnpaced.Total.medianRange())
		kv("… of which reading IMDS", v.ColdUnpaced.IMDS.medianRange())
		kv("`dualhomed apply` process, cold (process start included)", v.Apply.Total.medianRange())
		kv("… rtnetlink notifications seen", intRange(v.Apply.Observed))
		for _, read := range []struct {
			what string
			runs runs
		}{
			{"No-op poll (" + pollReadName + ": IMDS + kernel)", v.Poll},
			{"No-op reconcile with a full snapshot (" + fullReadName + ")", v.Full},
		} {
			kv(read.what, read.runs.Total.medianRange())
			kv("… of which reading IMDS", read.runs.IMDS.medianRange())
			kv("… writes by Apply / notifications", fmt.Sprintf("%s / %s", intRange(read.runs.Writes), intRange(read.runs.Observed)))
			kv("… IMDS requests, response bytes", fmt.Sprintf("%s, %s", intRange(read.runs.Requests), intRange(read.runs.Bytes)))
		}
		kv("No-op on a netlink event (kernel only)", v.NoopKernel.Total.medianRange())
		kv("… writes by Apply / notifications", fmt.Sprintf("%s / %s", intRange(v.NoopKernel.Writes), intRange(v.NoopKernel.Observed)))
		for _, step := range slices.Sorted(maps.Keys(v.Breakdown)) {
			kv("… no-op step: "+step, v.Breakdown[step].medianRange())
		}
		kv("Baseline script", fmt.Sprintf("%d ip commands, %d rp_filter writes, %d curl (token PUT + one per key read by dualhomed)", v.objects()-v.Objects["rp_filter"], v.Objects["rp_filter"], v.ShellCurls))
		kv("(a) shell: curl per key + ip per object", fmt.Sprintf("%s over %d runs", v.Shell.Time.medianRange(), len(v.Shell.Time)))
		kv("… of which curl", v.Shell.IMDS.medianRange())
		kv("… end state vs dualhomed", orDash(v.Shell.State))
		kv("(b) ip -batch", fmt.Sprintf("%s over %d runs", v.Batch.Time.medianRange(), len(v.Batch.Time)))
		kv("… end state vs dualhomed", orDash(v.Batch.State))
	}

	if d := r.Daemon; d != nil {
		b.WriteString("\n## Daemon details (1 network card)\n\n| Figure | Value |\n|---|---|\n")
		kv := func(k, val string) { fmt.Fprintf(&b, "| %s | %s |\n", k, val) }
		if d.Converge > 0 {
			kv("Process start → kernel fully configured", fmtDur(d.Converge))
		}
		if d.IdleWall > 0 {
			kv("At rest: CPU (process CPU clock) / wall", fmt.Sprintf("%.4f s / %.1f s", d.IdleCPU.Seconds(), d.IdleWall.Seconds()))
			kv("At rest: CPU as utime+stime in 10 ms ticks (/proc/<pid>/stat)", fmt.Sprintf("%.2f s", d.IdleCPUTicks.Seconds()))
			kv("At rest: rtnetlink notifications (rules, routes, addresses)", fmt.Sprintf("%d, %d, %d", d.IdleChanges.Rules, d.IdleChanges.Routes, d.IdleChanges.Addrs))
			kv("At rest: IMDS requests, bytes", fmt.Sprintf("%d, %d", d.IdleRequests, d.IdleBytes))
			kv("Peak RSS (VmHWM), RSS at the end of the rest", fmt.Sprintf("%d KiB, %d KiB", d.RSSPeakKiB, d.RSSKiB))
		}
		kv("Drift repair", d.Drift.percentiles())
		kv("Hot attach: link arrival → rules", d.HotRules.percentiles())
		kv("Hot attach: link arrival → ping reply", d.HotPing.percentiles())
		kv("Hot attach: veth move started → link arrival (the move itself, not part of an EC2 attach)", d.HotMove.percentiles())
		kv("Hot attach: veth move started → rules", d.HotMoveRules.percentiles())
		kv("Hot attach: veth move started → ping reply", d.HotMovePing.percentiles())
		if d.PollCPUPolls > 0 {
			kv(fmt.Sprintf("Polling every %s: CPU (process CPU clock) / wall, polls", seconds(d.PollCPUInterval)),
				fmt.Sprintf("%.4f s / %.1f s, %d polls", d.PollCPU.Seconds(), d.PollCPUWall.Seconds(), d.PollCPUPolls))
			kv(fmt.Sprintf("Polling every %s: IMDS requests, bytes", seconds(d.PollCPUInterval)), fmt.Sprintf("%d, %d", d.PollCPURequests, d.PollCPUBytes))
			kv(fmt.Sprintf("Polling every %s: rtnetlink notifications (rules, routes, addresses)", seconds(d.PollCPUInterval)),
				fmt.Sprintf("%d, %d, %d", d.PollCPUChanges.Rules, d.PollCPUChanges.Routes, d.PollCPUChanges.Addrs))
		}
		if d.FaultWall > 0 {
			kv("IMDS failing: requests over the window", fmt.Sprintf("%d in %.1f s (bound %.0f)", d.FaultRequests, d.FaultWall.Seconds(), faultBound(d.FaultWall)))
		}
	}

	b.WriteString("\n## Method\n\n")
	for _, n := range methodNotes(r) {
		fmt.Fprintf(&b, "- %s\n", n)
	}

	b.WriteString("\n## Failures\n\n")
	if len(r.Failures) == 0 {
		b.WriteString("None: every measurement ran.\n")
	}
	for _, f := range r.Failures {
		fmt.Fprintf(&b, "- %s\n", strings.ReplaceAll(strings.TrimSpace(f), "\n", "\n  "))
	}

	b.WriteString("\n## Go micro-benchmarks\n\n")
	if gb := goBenchLines(o.goBenchOut); gb != "" {
		fmt.Fprintf(&b, "`go test -run '^$' -bench . -benchmem ./imds/... ./netcfg/...`:\n\n```text\n%s```\n", gb)
	} else {
		b.WriteString("Not run (`-go-bench=false`, or no output).\n")
	}

	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		return fmt.Errorf("writing the report: %w", err)
	}
	return nil
}

// seconds formats a whole number of seconds as "15 s".
func seconds(d time.Duration) string { return fmt.Sprintf("%.0f s", d.Seconds()) }

func orDash(s string) string {
	if s == "" {
		return "—"
	}
	return s
}

func methodNotes(r *results) []string {
	notes := []string{
		"Everything runs in simulated instances (`cmd/internal/simworld`: throwaway network namespaces `dh<pid>w<n>-…`, deleted at the end, also on Ctrl-C). " +
			"ENIs are veth pairs whose peers live in their VPC's router namespace; each VPC also has a client namespace behind its router. " +
			"The IMDS emulator (`imds/emulator`) runs in the bench's process and serves the instance on the instance's 127.0.0.1; dualhomed's in-process client (dialling from inside the instance), curl and the daemon all read it over HTTP. " +
			"curl, ip, sysctl, `dualhomed apply` and the daemon are forked by a thread inside the instance's namespace (no `ip netns exec`).",
		"The instance starts as after boot: links up, the primary ENI with its DHCP address and default route. " +
			"Before every run the kernel is brought back to exactly that state (every other rule, route, address and rp_filter value removed) and checked.",
		"dualhomed's cold reconcile is the daemon's own `agent.Reconciler` in-process (IMDS snapshot, Observe, Desired, Diff, Apply) with a fresh client, " +
			"kernel handle (on the instance's namespace) and state directory per run, the default configuration and the client's default IMDS pacing " +
			fmt.Sprintf("(%d requests/s after a burst of %d); the unpaced figure shows what the pacing costs. ", imdsPace, imdsBurst) +
			fmt.Sprintf("Each no-op reconcile that reads IMDS starts %v after the previous one, so that the client's burst has refilled as between the daemon's 15 s polls. ", bucketRefill.Round(100*time.Millisecond)) +
			"The `dualhomed apply` figure is the whole process, start-up included.",
		"Writes are counted twice: by `Kernel.Apply` and by an rtnetlink subscription in the namespace (rule, non-kernel route and address notifications).",
		"The baselines create exactly the objects dualhomed created (derived from the kernel dump after dualhomed's run, as `ip` commands: " +
			"addresses, on-link routes, routes via a gateway, rules) and are then compared with dualhomed's end state (rules, routes of every table, addresses with flags and protocol, rp_filter). " +
			"Computing that list is not timed: a shell tool also spends time on its own logic, so the baselines are favoured.",
		"Baseline (a) is what shell tools such as ec2-net-utils do: one `curl` for the IMDSv2 token and one per key that dualhomed's client read in a full snapshot (a tool configuring an instance has no earlier read to build on), " +
			"one `ip` process per object (`ip rule add … protocol 210`, `ip route add … proto 210`, `ip addr add`), one `sysctl -w` per rp_filter value; processes run one after another, " +
			"started from Go (a bash script would add its own interpreter's cost).",
		"Baseline (b) is the floor of any iproute2-driven tool: one `ip -4 -batch -` and one `ip -6 -batch -` process (`ip rule` cannot infer the family and batch lines cannot carry `-6`), " +
			"rp_filter written directly. It reads no IMDS at all.",
		"Daemon figures use `dualhomed daemon` (the binary next to this one) with its default configuration (an empty configuration file), running in the instance. " +
			"CPU is read from the daemon's process CPU-time clock (`clock_gettime` on the clock `clock_getcpuclockid` names: every thread, in nanoseconds); " +
			"utime+stime from /proc/<pid>/stat is the same sum truncated to 10 ms ticks, too coarse against 0.1 % of a core over a minute, and is shown in the details only. " +
			"RSS is VmHWM from /proc/<pid>/status.",
		fmt.Sprintf("Idle CPU is judged as the issue defines it: the daemon with its default configuration (a poll every %s), at rest for the whole window. ", seconds(pollInterval)) +
			"The poll timer has ±10 % jitter, so the number of polls in the window can vary by one (4 or 3 in 60 s); the row says how many, and the figure scales with them. " +
			fmt.Sprintf("To see what one poll costs, a second daemon is started with a configuration file setting `poll_interval: %v` and watched for %d polls (by default), one cycle of `agent.FullReadEvery`: 19 polls that re-read what changes while ENIs stay attached and reuse the kernel view while the kernel announces nothing, and one that reads the full snapshot and dumps the kernel; ", pollCPUInterval, fullReadEvery) +
			"the window runs from just after one poll to just after the last (polls are seen as the emulator's requests of the MAC listing, which every poll reads once), " +
			"so it holds whole poll cycles, and its CPU time divided by the polls in it is the CPU per poll, " +
			fmt.Sprintf("and that divided by %s is the idle CPU it implies at the default interval. ", seconds(pollInterval)) +
			fmt.Sprintf("The per-poll figure includes the daemon's background work of the %s between two polls, so the implied figure slightly overstates a poll's own cost and omits the background of the remaining %s; it is informative.",
				seconds(pollCPUInterval), seconds(pollInterval-pollCPUInterval)),
		"No-op: the 5 ms target is judged on the reconcile a netlink event triggers (the kernel pass with the last good snapshot); " +
			"a poll adds one IMDS read, paced by the client, whose time is shown but not judged against 5 ms. " +
			"The poll is the daemon's timer read, `" + pollReadName + "`, on the pipeline of the last cold run (it holds a good snapshot): it re-reads what can change while an ENI stays attached. " +
			"The full snapshot (`" + fullReadName + "`, read at start, on reload and every so many polls) is measured the same way after the polls and shown as its own row. " +
			"IMDS requests and response bytes are counted by the emulator for each read (median, min–max). All of them must make zero writes.",
		"Drift: one of our rules (chosen at random) is deleted with netlink; timed until the rtnetlink notification of its return. " +
			"The daemon deliberately backs off when drift repeats within a minute (another manager fighting it), so each sample is an isolated drift: " +
			"every sample after the first is taken on a freshly started daemon that has finished its start-up reconcile.",
		"Hot attach (on a freshly started daemon): the last ENI's link is deleted and IMDS forgets it; its rules are removed (the daemon itself does it at its next poll); " +
			"IMDS then lists a new ENI (new MAC, same device number and addresses), and only then (after the IMDS client's burst has refilled, as long after boot) does its link arrive: the veth pair is made in the VPC namespace, " +
			"its router address configured, and the ENI end moved into the instance and set up (as a hot-plugged NIC brought up by udev). " +
			"Timed from the link's arrival to the notification of the last of its rules, and to the first ICMP echo reply to its primary IPv4 from its VPC's client, in the VPC but outside the ENI's subnet " +
			"(pinged every 1 ms from just before the pair is made; the router re-probes ARP every 10 ms). " +
			"The link's arrival is its first RTM_NEWLINK notification in the instance namespace (matched by its new MAC), received by the same rtnetlink subscription that times the rules: " +
			"on EC2 a hot-attached ENI is a new PCI device whose netdev registers, and that registration's RTM_NEWLINK is the first sign of it the daemon can see. " +
			"Moving a veth between namespaces is not part of that: the kernel unregisters the device, waits for an RCU grace period (synchronize_net) and registers it again, " +
			"which takes milliseconds before the link exists in the instance; that cost is shown apart (veth move started → link arrival), and the figures from the start of the move are kept as informative rows.",
		"IMDS failure (on a freshly started daemon): the emulator answers every request with 500, and a SIGHUP makes the daemon read IMDS at once rather than at its next 15 s poll. " +
			"The bound assumes the daemon's backoff (1 s doubling, capped by the 15 s poll) " +
			fmt.Sprintf("and at most %d attempts of a snapshot's first request, plus the snapshot under way. ", imdsMaxAttempt) +
			"The kernel must be unchanged afterwards: an IMDS error is never an answer.",
	}
	if !r.AddrProto {
		notes = append(notes, "This iproute2 cannot set an address's protocol (`ip addr add … proto`), so the baselines' addresses lack IFA_PROTO 210; the comparison reports it.")
	}
	return notes
}

// machineFacts describes the machine and the source tree.
func machineFacts() [][2]string {
	facts := [][2]string{
		{"CPU", fmt.Sprintf("%s, nproc %d", cpuModel(), runtime.NumCPU())},
		{"Kernel", firstLine(cmdOutput("uname", "-r"))},
		{"Go", runtime.Version()},
		{"iproute2", firstLine(cmdOutput("ip", "-V"))},
		{"curl", firstLine(cmdOutput("curl", "--version"))},
	}
	commit := firstLine(cmdOutput("git", "rev-parse", "--short=12", "HEAD"))
	if commit == "" {
		commit = "unknown (not a git checkout)"
	} else if strings.TrimSpace(cmdOutput("git", "status", "--porcelain", "--untracked-files=no")) != "" {
		commit += " (with uncommitted changes)"
	}
	return append(facts, [2]string{"Commit", commit})
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func cmdOutput(name string, args ...string) string {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return ""
	}
	return string(out)
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return line
}

func commandLine(o options) string {
	return fmt.Sprintf("dualhomed-bench -out %s -runs %d -shell-runs %d -enis %d -ipv4 %d -ipv6 %d -prefixes %d -cards %d -attaches %d -drifts %d -idle %v -poll-cpu %v -fault %v",
		o.out, o.runs, o.shellRuns, o.enis, o.ipv4, o.ipv6, o.prefixes, o.cards, o.attaches, o.drifts, o.idle, o.pollCPU, o.fault)
}

// goBenchLines keeps the header and result lines of `go test -bench` output.
func goBenchLines(path string) string {
	if path == "" {
		return ""
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	var b strings.Builder
	for _, line := range strings.Split(string(data), "\n") {
		switch {
		case strings.HasPrefix(line, "Benchmark"), strings.HasPrefix(line, "pkg:"), strings.HasPrefix(line, "cpu:"),
			strings.HasPrefix(line, "goos:"), strings.HasPrefix(line, "goarch:"), strings.HasPrefix(line, "not run"),
			strings.HasPrefix(line, "FAIL"), strings.HasPrefix(line, "go test -bench failed"):
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

func pingRow(d *daemonResult) row {
	r := row{what: "Hot attach: link arrival (RTM_NEWLINK in the instance) → first ping reply from its VPC", dualhomed: d.HotPing.percentiles()}
	if d.HotPingFailures > 0 {
		r.dualhomed += fmt.Sprintf("; %d of %d attaches: no reply within %v", d.HotPingFailures, d.HotPingFailures+len(d.HotPing), pingTimeout)
		r.target, r.result = "every attach answers", "**FAIL**"
	}
	return r
}
