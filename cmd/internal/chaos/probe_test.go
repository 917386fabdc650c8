package chaos

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/agent"
	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// primaryGuard holds a TCP stream and a continuous ping from VPC A's client
// to eth0's primary address: the primary ENI's traffic, which nothing
// dualhomed does or suffers may ever disturb.
type primaryGuard struct {
	stream *simworld.Stream
	stop   chan struct{}
	done   chan struct{}

	mu             sync.Mutex
	started        time.Time
	sent, received int
	pingErr        error
	losses         []string // when pings were lost, for the failure message
}

// startPrimaryGuard starts the guard; its check runs when t ends (before the
// world is torn down, as cleanups run last-in first-out).
func startPrimaryGuard(t *testing.T, w *simworld.World) *primaryGuard {
	t.Helper()
	a, eth0 := w.VPCs["A"], w.ENI("eth0").Primary4()
	s, err := simworld.StartStream(a.Client, netip.AddrPortFrom(eth0, simworld.EchoPort), 50*time.Millisecond)
	if err != nil {
		t.Fatalf("primary guard: opening the TCP stream to eth0: %v", err)
	}
	g := &primaryGuard{stream: s, stop: make(chan struct{}), done: make(chan struct{}), started: time.Now()}
	go func() {
		defer close(g.done)
		for {
			select {
			case <-g.stop:
				return
			default:
			}
			at := time.Since(g.started)
			// A generous linger: a reply delayed by a loaded host (the test
			// binary runs with -race beside other suites) is not a lost one.
			r, err := simworld.PingRun(context.Background(), a.Client, eth0, 10, 100*time.Millisecond, 3*time.Second)
			g.mu.Lock()
			if r.Received != r.Sent {
				g.losses = append(g.losses, fmt.Sprintf("%d of 10 lost at +%s (%s)", r.Sent-r.Received, at.Round(100*time.Millisecond), time.Now().Add(-time.Since(g.started)+at).Format("15:04:05.0")))
			}
			g.sent += r.Sent
			g.received += r.Received
			if err != nil && g.pingErr == nil {
				g.pingErr = err
			}
			g.mu.Unlock()
		}
	}()
	t.Cleanup(func() { g.check(t) })
	return g
}

// check stops the guard and fails t if a ping was lost or the stream broke.
func (g *primaryGuard) check(t *testing.T) {
	select {
	case <-g.stop:
		return // already checked
	default:
	}
	close(g.stop)
	<-g.done
	n, err := g.stream.Stop()
	g.mu.Lock()
	defer g.mu.Unlock()
	if err != nil || n == 0 {
		t.Errorf("primary ENI: TCP stream to eth0 broke after %d round trips: %v", n, err)
	}
	if g.pingErr != nil || g.received != g.sent || g.sent == 0 {
		t.Errorf("primary ENI: ping through eth0 got %d of %d replies (%v); losses: %v", g.received, g.sent, g.pingErr, g.losses)
	}
	t.Logf("primary ENI: %d TCP round trips unbroken, %d/%d pings answered", n, g.received, g.sent)
}

// pingFor pings addr from ns for d, one echo every 100 ms, and returns
// the result on the channel when done.
func pingFor(ns *simworld.NS, addr netip.Addr, d time.Duration) <-chan simworld.PingResult {
	ch := make(chan simworld.PingResult, 1)
	go func() {
		r, _ := simworld.PingRun(context.Background(), ns, addr, max(int(d/(100*time.Millisecond)), 1), 100*time.Millisecond, 3*time.Second)
		ch <- r
	}()
	return ch
}

// metrics scrapes the daemon's Prometheus endpoint inside the instance and
// returns each series ("name{labels}") with its value.
func metrics(w *simworld.World) (map[string]float64, error) {
	var conn net.Conn
	err := w.Instance.Do(func() error {
		var err error
		conn, err = net.DialTimeout("tcp", metricsListen, 2*time.Second)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("connecting to the metrics endpoint: %w", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, "GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n"); err != nil {
		return nil, fmt.Errorf("scraping metrics: %w", err)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(conn)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "dualhomed_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[line[:i]] = v
		}
	}
	return out, sc.Err()
}

// counters are the daemon's activity counters, from its metrics.
type counters struct {
	Reconciles float64 // every reconcile, whatever its result
	Repairs    float64 // objects re-added after another program removed them
	Changes    float64 // netlink changes applied
	IMDSErrors float64
}

func (c counters) sub(o counters) counters {
	return counters{c.Reconciles - o.Reconciles, c.Repairs - o.Repairs, c.Changes - o.Changes, c.IMDSErrors - o.IMDSErrors}
}

func readCounters(t *testing.T, w *simworld.World) counters {
	t.Helper()
	m, err := metrics(w)
	if err != nil {
		t.Fatal(err)
	}
	var c counters
	for k, v := range m {
		switch {
		case strings.HasPrefix(k, "dualhomed_reconciles_total"):
			c.Reconciles += v
		case k == "dualhomed_drift_repairs_total":
			c.Repairs = v
		case k == "dualhomed_changes_applied_total":
			c.Changes = v
		case k == "dualhomed_imds_errors_total":
			c.IMDSErrors = v
		}
	}
	return c
}

// cpuMeter measures a program's CPU use over a window.
type cpuMeter struct {
	p     *simworld.Proc
	cpu   time.Duration
	start time.Time
}

func startCPU(t *testing.T, p *simworld.Proc) cpuMeter {
	t.Helper()
	cpu, err := p.CPUTime()
	if err != nil {
		t.Fatal(err)
	}
	return cpuMeter{p, cpu, time.Now()}
}

// share returns the fraction of one core used since start, and the CPU time.
func (m cpuMeter) share(t *testing.T) (float64, time.Duration) {
	t.Helper()
	cpu, err := m.p.CPUTime()
	if err != nil {
		t.Fatal(err)
	}
	cpu -= m.cpu
	return cpu.Seconds() / time.Since(m.start).Seconds(), cpu
}

// memory returns VmRSS and VmHWM of the program in KiB.
func memory(t *testing.T, p *simworld.Proc) (rss, hwm int) {
	t.Helper()
	hwm, rss, err := p.Memory()
	if err != nil {
		t.Fatal(err)
	}
	return rss, hwm
}

// dump returns the instance's routing state.
func dump(t *testing.T, w *simworld.World) simworld.Dump {
	t.Helper()
	d, err := simworld.DumpState(w.Instance)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// removedSince fails t (once per call) when lines of before are gone from now.
func removedSince(t *testing.T, what string, before, now simworld.Dump) bool {
	t.Helper()
	removed, _ := before.Diff(now)
	if len(removed) > 0 {
		t.Errorf("%s: %d objects removed:\n  %s", what, len(removed), strings.Join(head(removed, 20), "\n  "))
		return true
	}
	return false
}

func head(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("... and %d more", len(s)-n))
	}
	return s
}

// daemonAlive fails t if the daemon has exited.
func daemonAlive(t *testing.T, d *simworld.Proc) {
	t.Helper()
	if done, err := d.Exited(); done {
		t.Fatalf("the daemon exited: %v\n%s", err, simworld.Tail(d.Log(), 30))
	}
}

// health reads the daemon's status file.
func health(t *testing.T, w *simworld.World) agent.Health {
	t.Helper()
	h, err := agent.ReadStatus(w.StateDir())
	if err != nil {
		t.Fatalf("reading the daemon's status: %v", err)
	}
	return h
}

func readHealth(w *simworld.World) (agent.Health, error) { return agent.ReadStatus(w.StateDir()) }

const sighup = syscall.SIGHUP

func netipAddr4(a [4]byte) netip.Addr { return netip.AddrFrom4(a) }
