// Command dualhomed-bench measures dualhomed side by side with the way policy
// routing is configured today, in one run on one machine, and writes the
// figures to a Markdown file (docs/benchmarks.md through `make bench`).
//
// It needs root: everything happens in a throwaway network namespace named
// dualhomed-bench-<pid>, with veth pairs as ENIs and the IMDS emulator on
// that namespace's loopback. The tool re-executes itself inside the namespace
// (`ip netns exec`), so that the emulator, curl, ip, the in-process pipeline
// and the dualhomed daemon all share it; the outer process only creates the
// namespace and always deletes it, on success, failure or Ctrl-C.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/dualhomed/dualhomed/agent"
)

// nsPrefix names our namespaces, so that leftovers of a killed run are found
// and removed by the next one.
const nsPrefix = "dualhomed-bench-"

// options are the command-line settings shared by the outer and inner process.
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
	dualhomed  string        // path of the dualhomed binary
	goBench    bool
	goBenchOut string // file with `go test -bench` output, handed to the inner process
	inNS       string // set in the inner process: the namespace it runs in
	daemonLog  string // where to copy the daemon's log (debugging)
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
	flag.DurationVar(&o.pollCPU, "poll-cpu", agent.FullReadEvery*pollCPUInterval, "how long a daemon polling every 3 s is watched to measure the CPU time of one poll (0 skips it; the default holds one cycle of agent.FullReadEvery polls, one full read included)")
	flag.DurationVar(&o.fault, "fault", 10*time.Second, "how long IMDS answers 500 in the failure measurement")
	flag.StringVar(&o.dualhomed, "dualhomed", "", "dualhomed `binary` (default: next to this one)")
	flag.BoolVar(&o.goBench, "go-bench", true, "run the Go micro-benchmarks of imds and netcfg and include them")
	flag.StringVar(&o.goBenchOut, "go-bench-output", "", "internal: go test -bench output to include")
	flag.StringVar(&o.inNS, "in-namespace", "", "internal: set when running inside the benchmark namespace")
	flag.StringVar(&o.daemonLog, "daemon-log", "", "copy the daemon's log to this `file` when it stops")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [flags]\n\n"+
			"Measures dualhomed against shell-style baselines in a throwaway network\n"+
			"namespace and writes the figures to -out. Needs root.\n\n", os.Args[0])
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
	if o.dualhomed == "" {
		if exe, err := os.Executable(); err == nil {
			o.dualhomed = filepath.Join(filepath.Dir(exe), "dualhomed")
		}
	}
	if o.inNS != "" {
		os.Exit(runInside(o))
	}
	os.Exit(runOutside(o))
}

// requiredTools are the programs the baselines run, with the Debian package
// that provides each.
var requiredTools = []struct{ name, pkg string }{
	{"ip", "iproute2"},
	{"curl", "curl"},
	{"sysctl", "procps"},
}

// runOutside creates the namespace, runs the measurements inside it, and
// deletes it whatever happens.
func runOutside(o options) int {
	var missing []string
	for _, t := range requiredTools {
		if _, err := exec.LookPath(t.name); err != nil {
			missing = append(missing, t.pkg)
		}
	}
	if len(missing) > 0 {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: missing tools; install them with:\n  apt-get update && apt-get install -y %s\n",
			strings.Join(missing, " "))
		return 1
	}
	removeStaleNamespaces()

	if o.goBench {
		f, err := os.CreateTemp("", "dualhomed-gobench-*.txt")
		if err == nil {
			defer os.Remove(f.Name())
			o.goBenchOut = f.Name()
			runGoBench(f)
			f.Close()
		}
	}

	name := fmt.Sprintf("%s%d", nsPrefix, os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: creating namespace %s: %v: %s\n", name, err, out)
		return 1
	}
	defer deleteNamespace(name)

	// Ctrl-C reaches the inner process too (same process group): it stops
	// measuring and cleans up. Here we only wait for it, and kill it if it
	// does not finish in time, so that the namespace is always deleted.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)

	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: finding own executable: %v\n", err)
		return 1
	}
	args := []string{"netns", "exec", name, exe, "-in-namespace", name}
	flag.Visit(func(f *flag.Flag) {
		if f.Name != "in-namespace" && f.Name != "go-bench-output" {
			args = append(args, "-"+f.Name+"="+f.Value.String())
		}
	})
	args = append(args, "-go-bench-output="+o.goBenchOut, "-dualhomed="+o.dualhomed)
	cmd := exec.Command("ip", args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: starting the measurements: %v\n", err)
		return 1
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var kill <-chan time.Time
	for {
		select {
		case sig := <-sigs:
			fmt.Fprintf(os.Stderr, "dualhomed-bench: %v: stopping, cleaning up\n", sig)
			_ = cmd.Process.Signal(os.Interrupt)
			if kill == nil {
				kill = time.After(20 * time.Second)
			}
		case <-kill:
			_ = cmd.Process.Kill()
		case err := <-done:
			if err != nil {
				if ee, ok := err.(*exec.ExitError); ok {
					return ee.ExitCode()
				}
				fmt.Fprintf(os.Stderr, "dualhomed-bench: %v\n", err)
				return 1
			}
			return 0
		}
	}
}

func deleteNamespace(name string) {
	if out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "dualhomed-bench: deleting namespace %s: %v: %s\n", name, err, out)
	}
}

// removeStaleNamespaces deletes namespaces left by runs whose process is gone
// (killed with SIGKILL, machine crash while /run survived).
func removeStaleNamespaces() {
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(strings.TrimPrefix(e.Name(), nsPrefix))
		if !strings.HasPrefix(e.Name(), nsPrefix) || err != nil {
			continue
		}
		if err := syscall.Kill(pid, 0); err == syscall.ESRCH {
			fmt.Fprintf(os.Stderr, "dualhomed-bench: removing namespace %s left by an earlier run\n", e.Name())
			deleteNamespace(e.Name())
		}
	}
}

// runGoBench runs the Go micro-benchmarks of imds and netcfg from the module
// root (where `make bench` runs us) and saves their output for the report.
func runGoBench(out *os.File) {
	if _, err := os.Stat("go.mod"); err != nil {
		fmt.Fprintln(out, "not run: the current directory is not the module root")
		return
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		fmt.Fprintln(out, "not run: go is not in PATH")
		return
	}
	fmt.Fprintln(os.Stderr, "dualhomed-bench: running the Go micro-benchmarks of imds and netcfg")
	cmd := exec.Command(goBin, "test", "-run", "^$", "-bench", ".", "-benchmem", "-count", "1", "./imds/...", "./netcfg/...")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(out, "go test -bench failed: %v\n", err)
	}
}
