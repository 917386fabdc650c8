// Command dualhomed-bench measures dualhomed side by side with the way policy
// routing is configured today, in one run on one machine, and writes the
// figures to a Markdown file (docs/benchmarks.md through `make bench`).
//
// It needs root: everything happens in simulated instances
// (cmd/internal/simworld: network namespaces, veth pairs as ENIs, the IMDS
// emulator on the instance's loopback), removed at the end, on failure and
// on Ctrl-C. The in-process pipeline works in the instance through netlink
// handles and threads inside it; curl, ip, `dualhomed apply` and the daemon
// are started inside it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// options are the command-line settings.
type options struct {
	out        string
	runs       int // repetitions of the in-process and batch measurements
	shellRuns  int // repetitions of the slow shell baseline
	enis       int
	ipv4       int
	ipv6       int
	prefixes   int
	cards      int // network cards of the variant (0 skips it)
	attaches   int
	drifts     int
	idle       time.Duration
	fault      time.Duration
	pollCPU    time.Duration // window of the CPU-per-poll measurement (0 skips it)
	dualhomed  string        // path of the dualhomed binary: next to this one
	goBench    bool
	goBenchOut string // what the report quotes of the `go test -bench` output
}

func main() {
	var o options
	flag.StringVar(&o.out, "out", "docs/benchmarks.md", "Markdown `file` to write the results to")
	flag.IntVar(&o.runs, "runs", 7, "repetitions of each fast measurement (median, min, max)")
	flag.IntVar(&o.shellRuns, "shell-runs", 5, "repetitions of the one-process-per-object shell baseline")
	flag.IntVar(&o.enis, "enis", 15, "ENIs of the instance (the first is the primary)")
	flag.IntVar(&o.ipv4, "ipv4", 50, "private IPv4 addresses per ENI")
	flag.IntVar(&o.ipv6, "ipv6", 50, "IPv6 addresses per ENI")
	flag.IntVar(&o.prefixes, "prefixes", 4, "delegated IPv4 (and IPv6) prefixes per ENI")
	flag.IntVar(&o.cards, "cards", 2, "network cards of the multi-card variant (0 skips it)")
	flag.IntVar(&o.attaches, "attaches", 20, "hot attaches measured")
	flag.IntVar(&o.drifts, "drifts", 20, "drift repairs measured")
	flag.DurationVar(&o.idle, "idle", 60*time.Second, "how long the daemon is watched at rest")
	flag.DurationVar(&o.pollCPU, "poll-cpu", fullReadEvery*pollCPUInterval, "how long a daemon polling every 3 s is watched to measure the CPU time of one poll (0 skips it; the default holds one cycle of agent.FullReadEvery polls, one full read included)")
	flag.DurationVar(&o.fault, "fault", 10*time.Second, "how long IMDS answers 500 in the failure measurement")
	flag.BoolVar(&o.goBench, "go-bench", true, "run the Go micro-benchmarks of imds and netcfg and include them")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [flags]\n\n"+
			"Measures dualhomed against shell-style baselines in simulated instances\n"+
			"(network namespaces) and writes the figures to -out. Needs root.\n\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: unexpected argument %q\n", flag.Arg(0))
		flag.Usage()
		os.Exit(2)
	}
	if o.runs < 1 || o.shellRuns < 1 || o.enis < 2 || o.attaches < 1 || o.drifts < 1 {
		fmt.Fprintln(os.Stderr, "dualhomed-bench: -runs, -shell-runs, -attaches and -drifts must be at least 1, -enis at least 2")
		os.Exit(2)
	}
	if o.pollCPU != 0 && o.pollCPU < 2*pollCPUInterval {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: -poll-cpu must be 0 (skip) or at least %v (two polls of the daemon it watches)\n", 2*pollCPUInterval)
		os.Exit(2)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "dualhomed-bench: needs root to create network namespaces; run `sudo make bench`")
		os.Exit(1)
	}
	exe, _ := os.Executable()
	o.dualhomed = filepath.Join(filepath.Dir(exe), "dualhomed")
	os.Exit(run(o))
}

// run checks what the measurements need, runs the Go micro-benchmarks, then
// the measurements.
func run(o options) int {
	for _, tool := range []string{"ip", "curl", "sysctl"} { // the baselines'
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "dualhomed-bench: %v; install it with: apt-get install -y iproute2 curl procps\n", err)
			return 1
		}
	}
	if _, err := os.Stat(o.dualhomed); err != nil {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: %v (run `make build`)\n", err)
		return 1
	}
	if removed, err := simworld.Sweep(); err != nil {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: removing leftovers of earlier runs: %v\n", err)
	} else if len(removed) > 0 {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: removed namespaces left by an earlier run: %s\n", strings.Join(removed, " "))
	}
	if o.goBench {
		o.goBenchOut = runGoBench()
	}

	// A first Ctrl-C skips the remaining steps and removes the world; a
	// second one ends the process, and the next run sweeps what it left.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop)
	return measure(ctx, o)
}

// runGoBench runs the Go micro-benchmarks of imds and netcfg from the module
// root (where `make bench` runs us) and returns the lines of their output
// the report quotes: headers, results and failures.
func runGoBench() string {
	if _, err := os.Stat("go.mod"); err != nil {
		return "not run: the current directory is not the module root\n"
	}
	fmt.Fprintln(os.Stderr, "dualhomed-bench: running the Go micro-benchmarks of imds and netcfg")
	out, err := exec.Command("go", "test", "-run", "^$", "-bench", ".", "-benchmem", "-count", "1", "./imds/...", "./netcfg/...").CombinedOutput()
	if err != nil {
		out = fmt.Appendf(out, "go test -bench failed: %v\n", err)
	}
	var b strings.Builder
	for _, line := range strings.Split(string(out), "\n") {
		for _, p := range []string{"Benchmark", "pkg:", "cpu:", "goos:", "goarch:", "FAIL", "go test -bench failed"} {
			if strings.HasPrefix(line, p) {
				b.WriteString(line + "\n")
				break
			}
		}
	}
	return b.String()
}
