package main

import (
	"bytes"
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"text/template"
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

//go:embed report.md.tmpl
var reportTemplate string

// report is the Markdown page of a run: report.md.tmpl holds its layout,
// the details tables and the method.
var report = template.Must(template.New("report").Funcs(template.FuncMap{
	"mr":         series.medianRange,
	"pct":        series.percentiles,
	"ints":       intRange,
	"dur":        fmtDur,
	"secs":       seconds,
	"objects":    (*variantResult).objects,
	"faultBound": faultBound,
	"sub":        func(a, b int) int { return a - b },
	"indent":     func(s string) string { return strings.ReplaceAll(strings.TrimSpace(s), "\n", "\n  ") },
	"noopReads": func(v *variantResult) []namedRuns {
		return []namedRuns{
			{"No-op poll (" + pollReadName + ": IMDS + kernel)", v.Poll},
			{"No-op reconcile with a full snapshot (" + fullReadName + ")", v.Full},
		}
	},
}).Parse(reportTemplate))

type namedRuns struct {
	What string
	Runs runs
}

// quoted are the production settings the method quotes.
var quoted = struct {
	PollInterval, PollCPUInterval, PollRest, BucketRefill time.Duration
	FullReadEvery, IMDSPace, IMDSBurst, IMDSMaxAttempt    int
	PollRead, FullRead                                    string
}{pollInterval, pollCPUInterval, pollInterval - pollCPUInterval, bucketRefill,
	fullReadEvery, imdsPace, imdsBurst, imdsMaxAttempt, pollReadName, fullReadName}

// write renders the report to path.
func (r *results) write(path string) error {
	o := r.o
	page := struct {
		*results
		Facts                      [][2]string
		LoadEnd, Command, Summary  string
		GoBench                    string
		ENIs, IPv4, IPv6, Prefixes int
		Set                        any
	}{r, machineFacts(), loadAverage(), commandLine(o), r.summaryTable(), goBenchLines(o.goBenchOut),
		o.enis, o.ipv4, o.ipv6, o.prefixes, quoted}
	var b bytes.Buffer
	if err := report.Execute(&b, page); err != nil {
		return fmt.Errorf("rendering the report: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		return fmt.Errorf("writing the report: %w", err)
	}
	return nil
}

// seconds formats a whole number of seconds as "15 s".
func seconds(d time.Duration) string { return fmt.Sprintf("%.0f s", d.Seconds()) }

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
