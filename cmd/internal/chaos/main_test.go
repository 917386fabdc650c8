package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// The binaries under test, built once per test binary by TestMain.
var (
	dualhomedBin string
	buildErr     error
)

// long is set by CHAOS_LONG=1 (`make chaos`): more iterations, longer windows.
var long = os.Getenv("CHAOS_LONG") == "1"

// seed drives every random choice of the suite (CHAOS_SEED replays a run).
var seed uint64

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	seed = uint64(time.Now().UnixNano())
	if s := os.Getenv("CHAOS_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			fmt.Fprintf(os.Stderr, "chaos: CHAOS_SEED=%q is not a number\n", s)
			return 2
		}
		seed = v
	}
	fmt.Fprintf(os.Stderr, "chaos: seed %d (replay with CHAOS_SEED=%d), long=%v\n", seed, seed, long)
	if os.Geteuid() != 0 {
		return m.Run() // every test skips with a message
	}
	if removed, err := simworld.Sweep(); err != nil {
		fmt.Fprintf(os.Stderr, "chaos: sweeping leftovers of earlier runs: %v\n", err)
	} else if len(removed) > 0 {
		fmt.Fprintf(os.Stderr, "chaos: removed leftovers of crashed runs: %s\n", strings.Join(removed, " "))
	}
	dir, err := os.MkdirTemp("", "dualhomed-chaos-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Built without the race detector: the suite measures CPU and memory
	// of the daemon, which -race would inflate many times over.
	dualhomedBin, buildErr = simworld.Build(dir, simworld.DualhomedPkg, false)
	return m.Run()
}

// rng returns the test's random source: the suite seed mixed with the test
// name, so one test's choices do not depend on which others ran.
func rng(t *testing.T) *rand.Rand {
	h := uint64(14695981039346656037)
	for _, c := range []byte(t.Name()) {
		h = (h ^ uint64(c)) * 1099511628211
	}
	t.Logf("seed %d (replay with CHAOS_SEED=%d)", seed, seed)
	return rand.New(rand.NewPCG(seed, h))
}

// pick returns the short or the long form of a figure.
func pick[T any](short, longer T) T {
	if long {
		return longer
	}
	return short
}

// metricsListen is where the daemon serves Prometheus metrics, inside the instance.
const metricsListen = "127.0.0.1:9810"

// daemonConfig is the YAML the suite's daemons run with (metrics on).
const daemonConfig = "metrics:\n  listen: " + metricsListen + "\n"

// newWorld builds a world for t (of opts, the program aside) with the IMDS
// emulator running, and removes it when t ends.
func newWorld(t *testing.T, opts simworld.Options) *simworld.World {
	t.Helper()
	if buildErr != nil && os.Geteuid() == 0 {
		t.Fatal(buildErr)
	}
	opts.DualhomedBin = dualhomedBin
	w := simworld.ForTestWith(t, opts)
	if err := w.StartIMDS(); err != nil {
		t.Fatal(err)
	}
	return w
}

// startDaemon runs `dualhomed daemon` in w and waits until eth1 and eth2 are configured.
func startDaemon(t *testing.T, w *simworld.World, poll time.Duration) *simworld.Proc {
	t.Helper()
	d, err := w.StartDaemon(simworld.DaemonOptions{PollInterval: poll, ExtraConfig: daemonConfig})
	if err != nil {
		t.Fatal(err)
	}
	waitConfigured(t, w, d, 20*time.Second, "eth1", "eth2")
	return d
}

// waitConfigured fails t unless the links' ENIs are configured (kernel view) within limit.
func waitConfigured(t *testing.T, w *simworld.World, d *simworld.Proc, limit time.Duration, links ...string) {
	t.Helper()
	var enis []*simworld.ENI
	for _, l := range links {
		enis = append(enis, w.ENI(l))
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	if err := w.WaitConfigured(ctx, d, enis...); err != nil {
		t.Fatalf("waiting for dualhomed to configure %v: %v", links, err)
	}
}

// waitInSync waits until `dualhomed plan` exits 0 (the kernel holds exactly
// the desired state) and returns how long it took.
func waitInSync(t *testing.T, w *simworld.World, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	var last error
	err := simworld.WaitFor(ctx, func() error {
		out, err := w.Dualhomed(ctx, "plan")
		if err != nil {
			last = fmt.Errorf("%w\n%s", err, out)
			time.Sleep(200 * time.Millisecond)
		}
		return err
	})
	if err != nil {
		t.Fatalf("`dualhomed plan` not in sync after %s: %v", limit, last)
	}
	return time.Since(start)
}
