package main

import (
	"bytes"
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
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
	targetNATVsFloor   = 0.8              // the NAT at least 0.8 × the hand-written nft ruleset
	daemonIMDSBackoff0 = time.Second      // agent/daemon.go: first retry delay after a failed IMDS read
	daemonIMDSBackoffM = 15 * time.Second // capped by the poll interval (agent.DefaultPollInterval)
)

// results are every figure of one run.
type results struct {
	o         options
	Started   time.Time
	Finished  time.Time
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

	// A daemon polling every pollCPUInterval, watched for PollCPUWall.
	PollCPUWall     time.Duration
	PollCPU         time.Duration
	PollCPUPolls    int64 // IMDS MAC listings: one per poll
	PollCPURequests int64
	PollCPUBytes    int64
	PollCPUChanges  changeCounts
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

// The summary table's verdicts and derived figures, against the targets above.

// ColdResult judges the cold reconcile against both baselines.
func (v *variantResult) ColdResult() string {
	if len(v.Shell.Time) == 0 || len(v.Batch.Time) == 0 {
		return "—"
	}
	d := float64(v.Cold.Total.median())
	return fmt.Sprintf("vs (b) %s, vs (a) %s", verdict(d <= targetColdVsBatch*float64(v.Batch.Time.median())),
		verdict(float64(v.Shell.Time.median()) >= targetColdVsShell*d))
}

// Ratios compares the median of a dualhomed cold reconcile with the baselines'.
func (v *variantResult) Ratios(s series) string {
	d := s.median()
	return fmt.Sprintf("(a)/dualhomed %s; dualhomed/(b) %s", ratio(v.Shell.Time.median(), d), ratio(d, v.Batch.Time.median()))
}

// Quiet says that no run made a write, as Apply counted them or as notified.
func (r runs) Quiet() bool {
	return !slices.ContainsFunc(slices.Concat(r.Writes, r.Observed), func(n int) bool { return n != 0 })
}

func (v *variantResult) NoopOK() bool {
	return v.NoopKernel.Total.median() < targetNoop && v.NoopKernel.Quiet()
}

func (d *daemonResult) HotOK() bool   { return d.HotRules.quantile(0.5) < targetHotAttach }
func (d *daemonResult) DriftOK() bool { return d.Drift.quantile(0.5) < targetDrift }
func (d *daemonResult) IdleOK() bool  { return d.IdlePercent() < 100*targetIdleCPU }
func (d *daemonResult) RSSOK() bool   { return float64(d.RSSPeakKiB)*1024 < targetRSSBytes }
func (d *daemonResult) RestOK() bool  { return d.IdleChanges.Total() == 0 && !d.IdleChangesLost }

func (d *daemonResult) IdlePercent() float64 { return 100 * d.IdleCPU.Seconds() / d.IdleWall.Seconds() }

func (d *daemonResult) PerPoll() time.Duration { return d.PollCPU / time.Duration(d.PollCPUPolls) }

func (d *daemonResult) RequestsPerPoll() float64 {
	return float64(d.PollCPURequests) / float64(d.PollCPUPolls)
}

// ImpliedIdlePercent is the share of a core one poll per default interval takes.
func (d *daemonResult) ImpliedIdlePercent() float64 {
	return 100 * d.PerPoll().Seconds() / pollInterval.Seconds()
}

func (d *daemonResult) FaultBound() float64 { return faultBound(d.FaultWall) }
func (d *daemonResult) FaultRate() float64  { return float64(d.FaultRequests) / d.FaultWall.Seconds() }

func (d *daemonResult) FaultOK() bool {
	return d.FaultKept && float64(d.FaultRequests) <= d.FaultBound()
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
	if err := report.ExecuteTemplate(&b, "summary", r); err != nil {
		return err.Error()
	}
	return b.String()
}

// natRow is one of the shared NAT's summary rows.
type natRow struct{ What, Dualhomed, Ratios, Target, Result string }

// NATRows compares the shared NAT's table with the same NAT written by hand
// in nft, the floor, from netcfg's BenchmarkNAT in the Go benchmarks'
// output: the same world, the same fwmark rules, one ruleset or the other.
func (r *results) NATRows() []natRow { return natRows(r.o.goBenchOut) }

func natRows(goBenchOut string) []natRow {
	fig := map[string]float64{} // "conns/dualhomed" -> conns/s, "throughput/hand-written" -> MB/s...
	for _, line := range strings.Split(goBenchOut, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		name, ok := strings.CutPrefix(f[0], "BenchmarkNAT/")
		if !ok {
			continue
		}
		name = name[:max(strings.LastIndex(name, "-"), 0)] // the GOMAXPROCS suffix
		for i := 2; i+1 < len(f); i += 2 {
			if v, err := strconv.ParseFloat(f[i], 64); err == nil && (f[i+1] == "conns/s" || f[i+1] == "MB/s") {
				fig[name] = v
			}
		}
	}
	var rows []natRow
	for _, m := range []struct{ kind, unit, what string }{
		{"conns", "conns/s", "Shared NAT: new TCP connections per second, VPC B and C clients to the internet host (BenchmarkNAT)"},
		{"throughput", "MB/s", "Shared NAT: throughput of one TCP connection (BenchmarkNAT)"},
	} {
		d, h := fig[m.kind+"/dualhomed"], fig[m.kind+"/hand-written"]
		if d == 0 || h == 0 {
			continue
		}
		rows = append(rows, natRow{What: m.what, Dualhomed: fmt.Sprintf("%.0f %s", d, m.unit),
			Ratios: fmt.Sprintf("hand-written nft ruleset: %.0f %s; dualhomed/hand-written %.2f", h, m.unit, d/h),
			Target: fmt.Sprintf("≥ %.1f × the hand-written ruleset", targetNATVsFloor), Result: verdict(d >= targetNATVsFloor*h)})
	}
	return rows
}

//go:embed report.md.tmpl
var reportTemplate string

// report is the Markdown page of a run: report.md.tmpl holds its layout,
// the details tables and the method.
var report = template.Must(template.New("report").Funcs(template.FuncMap{
	"mr":          series.medianRange,
	"pct":         series.percentiles,
	"ints":        intRange,
	"dur":         fmtDur,
	"secs":        seconds,
	"objects":     (*variantResult).objects,
	"verdict":     verdict,
	"ratio":       ratio,
	"set":         func() any { return quoted },
	"mb":          func(kib int) float64 { return float64(kib) * 1024 / 1e6 },
	"add":         func(a, b int) int { return a + b },
	"perSecond":   func(d time.Duration, n float64) float64 { return n / d.Seconds() },
	"pingTimeout": func() time.Duration { return pingTimeout },
	"sub":         func(a, b int) int { return a - b },
	"indent":      func(s string) string { return strings.ReplaceAll(strings.TrimSpace(s), "\n", "\n  ") },
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
	hotAttachMatrix, _ := os.ReadFile(filepath.Join(filepath.Dir(path), "hot-attach-matrix.md")) // "" when absent
	page := struct {
		*results
		Facts                      [][2]string
		LoadEnd, Command, GoBench  string
		ENIs, IPv4, IPv6, Prefixes int
		// HotAttachMatrix is the coexistence matrix's own hot-attach
		// timing (`make matrix-timing`), measured in a booted container
		// beside amazon-ec2-net-utils and kept in the file it writes.
		HotAttachMatrix string
	}{r, machineFacts(), loadAverage(), commandLine(o), o.goBenchOut, o.enis, o.ipv4, o.ipv6, o.prefixes,
		string(hotAttachMatrix)}
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
		{"Kernel", firstLine("uname", "-r")},
		{"Go", runtime.Version()},
		{"iproute2", firstLine("ip", "-V")},
		{"curl", firstLine("curl", "--version")},
	}
	commit := firstLine("git", "rev-parse", "--short=12", "HEAD")
	if commit == "" {
		commit = "unknown (not a git checkout)"
	} else if firstLine("git", "status", "--porcelain", "--untracked-files=no") != "" {
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

// firstLine is the first line a command prints, "" if it fails.
func firstLine(name string, args ...string) string {
	out, _ := exec.Command(name, args...).Output()
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}

func commandLine(o options) string {
	return fmt.Sprintf("dualhomed-bench -out %s -runs %d -shell-runs %d -enis %d -ipv4 %d -ipv6 %d -prefixes %d -cards %d -attaches %d -drifts %d -idle %v -poll-cpu %v -fault %v",
		o.out, o.runs, o.shellRuns, o.enis, o.ipv4, o.ipv6, o.prefixes, o.cards, o.attaches, o.drifts, o.idle, o.pollCPU, o.fault)
}
