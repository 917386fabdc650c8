package chaos

import (
	"context"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// maxCPUShare is a sanity bound on the daemon's CPU use during a fight
// (a fraction of one core), not a timing test: a daemon in a hot loop
// against another program would use a whole core. Half a core leaves room
// for the shortest fight (300 ms), whose share measured 10-26 % on a
// loaded 2-core machine, and still catches a hot loop.
const maxCPUShare = 0.50

// fighter runs fn every interval until stopped, counting what it did.
type fighter struct {
	stop   chan struct{}
	wg     sync.WaitGroup
	mu     sync.Mutex
	rounds int // rounds that found something to undo
	undone int // objects removed in total
	err    error
}

func fight(interval time.Duration, fn func() (int, error)) *fighter {
	f := &fighter{stop: make(chan struct{})}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-f.stop:
				return
			case <-tick.C:
			}
			n, err := fn()
			f.mu.Lock()
			if n > 0 {
				f.rounds++
				f.undone += n
			}
			if err != nil && f.err == nil {
				f.err = err
			}
			f.mu.Unlock()
		}
	}()
	return f
}

func (f *fighter) end() (rounds, undone int, err error) {
	close(f.stop)
	f.wg.Wait()
	return f.rounds, f.undone, f.err
}

// deleteOurRules removes every policy rule carrying our protocol, as
// systemd-networkd does with foreign rules.
func deleteOurRules(w *simworld.World) (int, error) {
	rules, err := w.OurRules()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range rules {
		if err := w.Instance.NL.RuleDel(&r); err == nil {
			n++
		}
	}
	return n, nil
}

// flushTable is `ip route flush table <table>` for both families; it
// returns how many routes were there.
func flushTable(w *simworld.World, table int) (int, error) {
	n := 0
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := w.Instance.NL.RouteListFiltered(fam, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return n, err
		}
		n += len(routes)
	}
	if n == 0 {
		return 0, nil
	}
	for _, f := range []string{"-4", "-6"} {
		if out, err := w.Instance.IP(f, "route", "flush", "table", fmt.Sprint(table)); err != nil {
			return n, fmt.Errorf("ip route flush: %v %s", err, out)
		}
	}
	return n, nil
}

// fightFigures is one line of the closing note.
type fightFigures struct {
	name                        string
	window                      time.Duration
	rounds, undone              int
	reconciles, repairs, writes float64
	cpu                         time.Duration
	share                       float64
	converged                   time.Duration
}

func (f fightFigures) String() string {
	return fmt.Sprintf("%-32s %s: fighter undid %d objects in %d rounds; daemon %.0f reconciles, %.0f repairs, %.0f changes; CPU %s = %.1f%% of a core; in sync %s after the fight",
		f.name, f.window, f.undone, f.rounds, f.reconciles, f.repairs, f.writes, f.cpu.Round(time.Millisecond), 100*f.share, f.converged.Round(100*time.Millisecond))
}

// TestFights pits the daemon against programs that undo its work. For each
// fight: the daemon stays up, backs off (fewer reconciles than the
// fighter's rounds), uses little CPU, and converges once the fight ends; the
// primary guard runs throughout.
func TestFights(t *testing.T) {
	r := rng(t)
	const poll = 2 * time.Second
	window := pick(4*time.Second, 20*time.Second)
	// After a fight the repair backoff (up to 30 s) may still run.
	const settle = 45 * time.Second
	var figures []string

	// Each fight gets its own world: the daemon's repair backoff outlives a
	// fight by a minute, and would slow the next one down.
	var w *simworld.World
	var d *simworld.Proc
	setup := func(t *testing.T) {
		t.Helper()
		w = newWorld(t, simworld.Options{})
		d = startDaemon(t, w, poll)
		startPrimaryGuard(t, w)
		waitInSync(t, w, 20*time.Second)
	}
	measure := func(t *testing.T, name string, body func() (rounds, undone int)) fightFigures {
		t.Helper()
		daemonAlive(t, d)
		c0, cpu := readCounters(t, w), startCPU(t, d)
		start := time.Now()
		rounds, undone := body()
		elapsed := time.Since(start)
		share, used := cpu.share(t)
		c := readCounters(t, w).sub(c0)
		daemonAlive(t, d)
		fig := fightFigures{name: name, window: elapsed.Round(100 * time.Millisecond), rounds: rounds, undone: undone,
			reconciles: c.Reconciles, repairs: c.Repairs, writes: c.Changes, cpu: used, share: share}
		if share > maxCPUShare {
			t.Errorf("daemon CPU %.1f%% of a core during the fight (bound %.0f%%)", 100*share, 100*maxCPUShare)
		}
		return fig
	}
	converge := func(t *testing.T, fig *fightFigures, links ...string) {
		t.Helper()
		start := time.Now()
		waitConfigured(t, w, d, settle, links...)
		waitInSync(t, w, settle)
		fig.converged = time.Since(start)
		t.Log(fig)
		figures = append(figures, fig.String())
	}

	t.Run("rules_deleted_every_100ms", func(t *testing.T) {
		setup(t)
		fig := measure(t, "rules deleted every 100 ms", func() (int, int) {
			f := fight(100*time.Millisecond, func() (int, error) { return deleteOurRules(w) })
			time.Sleep(window)
			rounds, undone, err := f.end()
			if err != nil {
				t.Errorf("fighter: %v", err)
			}
			return rounds, undone
		})
		if fig.repairs == 0 {
			t.Errorf("the daemon never repaired the deleted rules")
		}
		if fig.reconciles > float64(window/(100*time.Millisecond))/2 {
			t.Errorf("%.0f reconciles in %s against a fighter every 100 ms: no backoff", fig.reconciles, window)
		}
		converge(t, &fig, "eth1", "eth2")
	})

	t.Run("table_flushed_every_100ms", func(t *testing.T) {
		setup(t)
		table := tableOf(t, w, w.ENI("eth1").Primary4().String())
		fig := measure(t, fmt.Sprintf("ip route flush table %d every 100 ms", table), func() (int, int) {
			f := fight(100*time.Millisecond, func() (int, error) { return flushTable(w, table) })
			time.Sleep(window)
			rounds, undone, err := f.end()
			if err != nil {
				t.Errorf("fighter: %v", err)
			}
			return rounds, undone
		})
		if fig.repairs == 0 {
			t.Errorf("the daemon never repaired the flushed table")
		}
		if fig.reconciles > float64(window/(100*time.Millisecond))/2 {
			t.Errorf("%.0f reconciles in %s against a fighter every 100 ms: no backoff", fig.reconciles, window)
		}
		converge(t, &fig, "eth1", "eth2")
	})

	t.Run("link_renamed_during_apply", func(t *testing.T) {
		setup(t)
		// New addresses in IMDS and a reload make the daemon apply; the link
		// is renamed at a random point of that apply, then renamed back.
		eth2 := w.ENI("eth2")
		rounds := pick(3, 6)
		fig := measure(t, "link renamed during apply", func() (int, int) {
			for i := range rounds {
				a := eth2.Subnet4.Addr().As4()
				a[3] = byte(100 + i)
				if err := w.AddIP(eth2, netipAddr4(a)); err != nil {
					t.Fatal(err)
				}
				if err := d.Signal(sighup); err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Duration(r.Int64N(int64(60 * time.Millisecond))))
				renameLink(t, w, "eth2", "eth2-renamed")
				// Renamed, the ENI is still the same MAC: it must be configured all the same.
				waitInSyncQuiet(t, w, settle)
				renameLink(t, w, "eth2-renamed", "eth2")
			}
			return rounds, rounds
		})
		converge(t, &fig, "eth1", "eth2")
	})

	t.Run("link_deleted_during_apply", func(t *testing.T) {
		setup(t)
		// An ENI with many addresses is attached; its link is deleted at a
		// random point of the daemon's apply. Then EC2 detaches it in IMDS.
		rounds := pick(3, 10)
		before := dump(t, w)
		fig := measure(t, "link deleted during apply", func() (int, int) {
			for i := range rounds {
				e := extraENI(4, 50, 2)
				if err := w.IMDS.AttachENI(e); err != nil {
					t.Fatal(err)
				}
				l := addLink(t, w, e)
				time.Sleep(time.Duration(r.Int64N(int64(150 * time.Millisecond))))
				if err := w.Instance.NL.LinkDel(l); err != nil {
					t.Fatalf("round %d: deleting eth4: %v", i, err)
				}
				time.Sleep(500 * time.Millisecond)
				daemonAlive(t, d)
				if err := w.IMDS.DetachENI(e.MAC); err != nil {
					t.Fatal(err)
				}
				waitInSyncQuiet(t, w, settle)
			}
			return rounds, rounds
		})
		converge(t, &fig, "eth1", "eth2")
		if left := dump(t, w).Grep("20004"); len(left) > 0 {
			t.Errorf("objects of the deleted, detached ENI left behind:\n  %s", strings.Join(head(left, 10), "\n  "))
		}
		removedSince(t, "after the deleted link's ENI was detached", before, dump(t, w))
	})

	t.Run("foreign_route_added_first", func(t *testing.T) {
		setup(t)
		// Before IMDS lists the new ENI, another program adds the very routes
		// dualhomed will want: the VPC route in main and the default route
		// in the ENI's table. Neither may be modified or deleted.
		e := extraENI(5, 5, 0)
		addLink(t, w, e)
		gw := e.SubnetIPv4CIDR.Addr().Next().String()
		foreign := [][]string{
			{"-4", "route", "add", e.VPCIPv4CIDRs[0].String(), "via", gw, "dev", "eth5", "proto", "static"},
			{"-4", "route", "add", "default", "via", gw, "dev", "eth5", "table", "20005", "proto", "static"},
		}
		for _, args := range foreign {
			if out, err := w.Instance.IP(args...); err != nil {
				t.Fatalf("ip %s: %v %s", strings.Join(args, " "), err, out)
			}
		}
		placed := dump(t, w).Grep("proto 4", "eth5") // proto static
		if err := w.IMDS.AttachENI(e); err != nil {
			t.Fatal(err)
		}
		// Let the daemon configure the rest of the ENI, then watch it idle.
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := simworld.WaitFor(ctx, func() error {
			if len(dump(t, w).Grep("lookup 20005", "proto 210")) < 2*len(e.LocalIPv4s) {
				return fmt.Errorf("eth5's rules are not all there")
			}
			return nil
		}); err != nil {
			t.Fatalf("the daemon did not configure eth5 beside the foreign routes: %v", err)
		}
		time.Sleep(time.Second)
		fig := measure(t, "foreign routes added first", func() (int, int) {
			time.Sleep(window)
			return 0, 0
		})
		now := dump(t, w)
		for _, line := range placed {
			if !slices.Contains(now, line) {
				t.Errorf("the foreign route %q was modified or deleted; eth5's routes now: %v", line, now.Grep("eth5", "route"))
			}
		}
		out, err := w.Dualhomed(context.Background(), "plan")
		t.Logf("plan with the foreign routes in place: exit %d\n%s", simworld.ExitCode(err), simworld.Tail(out, 8))
		// The daemon cannot add what the foreign routes block; it says so
		// (plan's warnings) and must then leave it: a reconcile with nothing
		// it can change makes zero netlink writes, and nobody removed
		// anything, so there is nothing to repair.
		if fig.writes > 0 || fig.repairs > 0 {
			t.Errorf("with foreign routes holding the keys of two of its routes, the idle daemon applied %.0f changes and counted %.0f repairs in %s "+
				"(re-adding blocked routes on every poll: EEXIST, a false repair, and a false warning that another program keeps removing its routes)",
				fig.writes, fig.repairs, fig.window)
		}
		// Whatever else, it must not spin: at most a few reconciles per poll interval.
		if limit := 3 * (window.Seconds()/poll.Seconds() + 2); fig.reconciles > limit {
			t.Errorf("%.0f reconciles in %s (limit %.0f): the daemon loops on the foreign routes", fig.reconciles, window, limit)
		}
		t.Log(fig)
		figures = append(figures, fig.String())
		if err := w.IMDS.DetachENI(e.MAC); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("nat_table_flushed_every_100ms", func(t *testing.T) {
		if _, err := exec.LookPath("nft"); err != nil {
			t.Skip("skipping: needs nft to play the other program (apt-get install nftables)")
		}
		w = newWorld(t, simworld.Options{NAT: true})
		var err error
		if d, err = w.StartDaemon(simworld.DaemonOptions{PollInterval: poll, ExtraConfig: daemonConfig + natConfig}); err != nil {
			t.Fatal(err)
		}
		waitConfigured(t, w, d, 20*time.Second, "eth1", "eth2")
		startPrimaryGuard(t, w)
		waitInSync(t, w, 20*time.Second)
		// The other program has a table of its own, which must never change.
		nft(t, w, "table inet other {\n chain forward {\n type filter hook forward priority 10; policy accept;\n iifname \"docker0\" accept\n }\n}")
		other := nft(t, w, "list table inet other")
		fig := measure(t, "nft flush table inet dualhomed every 100 ms", func() (int, int) {
			f := fight(100*time.Millisecond, func() (int, error) {
				out, err := w.Instance.Command(context.Background(), "nft", "-a", "list", "table", "inet", "dualhomed").Output()
				rules := strings.Count(string(out), "# handle") - strings.Count(string(out), "chain ")
				if err != nil || rules == 0 {
					return 0, nil // not there, or still empty: nothing to undo
				}
				out, err = w.Instance.Command(context.Background(), "nft", "flush", "table", "inet", "dualhomed").CombinedOutput()
				if err != nil {
					return 0, fmt.Errorf("nft flush: %v %s", err, out)
				}
				return rules, nil
			})
			time.Sleep(window)
			rounds, undone, err := f.end()
			if err != nil {
				t.Errorf("fighter: %v", err)
			}
			return rounds, undone
		})
		if fig.repairs == 0 {
			t.Errorf("the daemon never repaired the flushed table")
		}
		if fig.reconciles > float64(window/(100*time.Millisecond))/2 {
			t.Errorf("%.0f reconciles in %s against a fighter every 100 ms: no backoff", fig.reconciles, window)
		}
		converge(t, &fig, "eth1", "eth2")
		if now := nft(t, w, "list table inet other"); now != other {
			t.Errorf("the other program's table changed:\nbefore\n%s\nafter\n%s", other, now)
		}
	})

	t.Logf("fights:\n  %s", strings.Join(figures, "\n  "))
}

// natConfig makes eth1 and eth2 sources of the shared NAT.
const natConfig = "enis:\n  - match: {device_number: 1}\n    nat: true\n  - match: {device_number: 2}\n    nat: true\n"

// nft runs `nft <script>` in the instance, failing t on error, and returns its output.
func nft(t *testing.T, w *simworld.World, script string) string {
	t.Helper()
	out, err := w.Instance.Command(context.Background(), "nft", script).CombinedOutput()
	if err != nil {
		t.Fatalf("nft %s: %v\n%s", script, err, out)
	}
	return string(out)
}

// tableOf returns the table that our source rule for addr points at.
func tableOf(t *testing.T, w *simworld.World, addr string) int {
	t.Helper()
	rules, err := w.OurRules()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if r.Src != nil && r.Src.IP.String() == addr {
			return r.Table
		}
	}
	t.Fatalf("no rule of ours from %s", addr)
	return 0
}

func renameLink(t *testing.T, w *simworld.World, from, to string) {
	t.Helper()
	for _, args := range [][]string{{"link", "set", from, "down"}, {"link", "set", from, "name", to}, {"link", "set", to, "up"}} {
		if out, err := w.Instance.IP(args...); err != nil {
			t.Fatalf("ip %s: %v %s", strings.Join(args, " "), err, out)
		}
	}
}

// waitInSyncQuiet is waitInSync without the time it took.
func waitInSyncQuiet(t *testing.T, w *simworld.World, limit time.Duration) { waitInSync(t, w, limit) }
