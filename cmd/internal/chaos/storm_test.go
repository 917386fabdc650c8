package chaos

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// TestLinkFlapStorm sets an ENI's link down and up 1,000 times, in a burst
// as fast as netlink allows (overflowing event sockets) and paced one flap
// every 5 ms (events the daemon can read one by one); the long form repeats
// each. The daemon's memory
// stays bounded (VmRSS after each storm within a generous margin of the
// first), its reconciles coalesce (far fewer than the flaps), and it
// converges once the storm ends.
func TestLinkFlapStorm(t *testing.T) {
	w := newWorld(t, simworld.Options{})
	d := startDaemon(t, w, 2*time.Second)
	startPrimaryGuard(t, w)
	waitInSync(t, w, 20*time.Second)
	const flaps = 1000
	storms := pick(2, 6)
	// Bounds: generous sanity limits, not measurements.
	const rssGrowthLimitKiB = 32 << 10
	eth2, err := w.Instance.NL.LinkByName("eth2")
	if err != nil {
		t.Fatal(err)
	}
	rss0, hwm0 := memory(t, d)
	var figures []string
	for s := range storms {
		c0, cpu := readCounters(t, w), startCPU(t, d)
		paced := s%2 == 1
		start := time.Now()
		for i := range flaps {
			if paced {
				time.Sleep(5 * time.Millisecond)
			}
			if err := w.Instance.NL.LinkSetDown(eth2); err != nil {
				t.Fatalf("flap %d: %v", i, err)
			}
			if err := w.Instance.NL.LinkSetUp(eth2); err != nil {
				t.Fatalf("flap %d: %v", i, err)
			}
		}
		took := time.Since(start)
		// The storm is over when the daemon has repaired what it can.
		waitConfigured(t, w, d, 60*time.Second, "eth1", "eth2")
		waitInSync(t, w, 60*time.Second)
		settled := time.Since(start)
		share, used := cpu.share(t)
		c := readCounters(t, w).sub(c0)
		rss, hwm := memory(t, d)
		daemonAlive(t, d)
		kind := "burst"
		if paced {
			kind = "paced"
		}
		fig := fmt.Sprintf("storm %d (%s): %d flaps of eth2 in %s; %.0f reconciles (%.0f repairs, %.0f changes) until in sync %s after the start; CPU %s = %.1f%% of a core; VmRSS %d -> %d KiB, VmHWM %d -> %d KiB",
			s+1, kind, flaps, took.Round(time.Millisecond), c.Reconciles, c.Repairs, c.Changes, settled.Round(100*time.Millisecond), used.Round(time.Millisecond), 100*share, rss0, rss, hwm0, hwm)
		t.Log(fig)
		figures = append(figures, fig)
		if c.Reconciles > flaps/10 {
			t.Errorf("storm %d: %.0f reconciles for %d flaps: events do not coalesce", s+1, c.Reconciles, flaps)
		}
		if rss-rss0 > rssGrowthLimitKiB {
			t.Errorf("storm %d: VmRSS grew from %d to %d KiB (limit +%d KiB)", s+1, rss0, rss, rssGrowthLimitKiB)
		}
	}
	t.Logf("link flap storms:\n  %s", strings.Join(figures, "\n  "))
}
