package matrix

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// attachRounds is the number of hot attaches per tool and address count.
const attachRounds = 20

// TestHotAttachTiming times hot attach for amazon-ec2-net-utils against
// dualhomed in one container (networkd with ec2-net-utils' 80-ec2.network
// giving every ENI DHCP, dualhomed installed), with the same attach method,
// interleaved round by round, with 1 and with 51 IPv4 addresses on the ENI.
// Each round measures, from the link's RTM_NEWLINK in the container: every
// rule of the tool for the ENI's addresses in place, and the first ICMP
// echo reply to a client in the ENI's VPC (pinged every 5 ms).
//
// ec2-net-utils' rounds: dualhomed is stopped and its objects cleaned up;
// the udev stand-in runs its rule's command as the link appears. dualhomed's
// rounds: dualhomed runs; the stand-in skips ec2-net-utils' command.
//
// It is a benchmark, not an assertion: `make matrix-timing` runs it alone
// (MATRIX_TIMING=1), on a machine as quiet as can be had; CI's `make matrix`
// does not (80 rounds took 27 minutes beside the matrix on a loaded 2-core
// machine, and the matrix's containers skew the figures).
func TestHotAttachTiming(t *testing.T) {
	needMatrix(t)
	if os.Getenv("MATRIX_TIMING") != "1" {
		t.Skip("skipping: the hot-attach timing runs with MATRIX_TIMING=1 (`sudo make matrix-timing`)")
	}
	load0 := loadAvg()
	ctx := context.Background()
	dir := filepath.Join(workDir, "timing")
	w, err := newWorld(fmt.Sprintf("mx%dc99-", os.Getpid()), filepath.Join(dir, "world"), 0, t.Logf)
	if err != nil {
		t.Fatalf("building the world: %v", err)
	}
	defer w.close()
	c, err := newContainer("matrixtiming", filepath.Join(dir, "ct"), rootDir, w)
	if err != nil {
		t.Fatal(err)
	}
	defer c.kill()
	s := stacks()[5] // ec2-net-utils as installed
	s.udevAdd = "#!/bin/sh\n# ec2-net-utils' add rule, skipped in dualhomed's rounds\n[ -e /run/matrix-dualhomed-round ] && exit 0\n" + strings.TrimPrefix(s.udevAdd, "#!/bin/sh\n")
	if err := s.prepare(c.root); err != nil {
		t.Fatal(err)
	}
	if err := copyFile(debV1, filepath.Join(c.root, "root", "dualhomed.deb")); err != nil {
		t.Fatal(err)
	}
	r := &run{t: t, s: s, res: newResults(), ctx: ctx, w: w, c: c}
	if err := r.boot("eth0", "eth1", "eth2"); err != nil {
		t.Fatalf("boot: %v", err)
	}
	if err := r.install("/root/dualhomed.deb"); err != nil {
		t.Fatalf("installing dualhomed: %v", err)
	}
	e := w.eni("eth3")
	var table strings.Builder
	table.WriteString("| IPv4 addresses on the ENI | tool | n | link → every rule: min / median / p90 / max (ms) | link → first reply: min / median / p90 / max (ms) |\n|---|---|---|---|---|\n")
	var ratios []string
	for _, n := range []int{1, 51} {
		e.extra = nil
		for k := 0; k < n-1; k++ {
			a := e.subnet.Addr().As4()
			a[3] = byte(100 + k)
			e.extra = append(e.extra, netip.AddrFrom4(a))
		}
		rule := map[string][]time.Duration{}
		reply := map[string][]time.Duration{}
		for i := 0; i < attachRounds; i++ {
			for _, tool := range []string{"ec2-net-utils", "dualhomed"} {
				dr, dp, err := r.timeAttach(e, tool)
				if err != nil {
					t.Errorf("%d addresses, %s, round %d: %v", n, tool, i, err)
					continue
				}
				rule[tool] = append(rule[tool], dr)
				reply[tool] = append(reply[tool], dp)
			}
		}
		for _, tool := range []string{"ec2-net-utils", "dualhomed"} {
			fmt.Fprintf(&table, "| %d | %s | %d | %s | %s |\n", n, tool, len(rule[tool]), stats(rule[tool]), stats(reply[tool]))
		}
		if len(reply["dualhomed"]) > 0 && len(reply["ec2-net-utils"]) > 0 {
			ratios = append(ratios, fmt.Sprintf("%d address(es): ec2-net-utils / dualhomed, medians: %.1f× to every rule, %.1f× to the first reply",
				n, float64(median(rule["ec2-net-utils"]))/float64(median(rule["dualhomed"])),
				float64(median(reply["ec2-net-utils"]))/float64(median(reply["dualhomed"]))))
		}
	}
	table.WriteString("\nRatio of medians: " + strings.Join(ratios, "; ") + ".\n")
	page := fmt.Sprintf("Written by `sudo make matrix-timing` (cmd/internal/matrix, TestHotAttachTiming) on %s, %s; "+
		"%d cores, load average (1, 5, 15 min) %s at the start, %s at the end. "+
		"In one booted container (the matrix's Debian 12 root, amazon-ec2-net-utils 2.3 as installed, dualhomed from its .deb), "+
		"the ENI is a veth moved into the container's namespace; %d attaches per tool and address count, the tools interleaved; "+
		"times from the link's RTM_NEWLINK to every rule of the tool for the ENI's addresses, and to the first ICMP echo reply "+
		"to a client in the ENI's VPC (pinged every 5 ms).\n\n%s",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), commitOf(), runtime.NumCPU(), load0, loadAvg(), attachRounds, table.String())
	if err := os.WriteFile(timingOut, []byte(page), 0o644); err != nil {
		t.Errorf("writing %s: %v", timingOut, err)
	}
	t.Logf("hot attach, ec2-net-utils against dualhomed:\n%s", page)
}

// timeAttach runs one round for tool and returns link → every rule and
// link → first reply.
func (r *run) timeAttach(e *eni, tool string) (toRule, toReply time.Duration, err error) {
	ctx := r.ctx
	prio := 10000 + e.dev
	if tool == "dualhomed" {
		prio = 20000 + e.dev
		if _, err := r.c.sh(ctx, 30*time.Second, "touch /run/matrix-dualhomed-round && systemctl start dualhomed"); err != nil {
			return 0, 0, err
		}
	} else if _, err := r.c.sh(ctx, 30*time.Second, "rm -f /run/matrix-dualhomed-round; systemctl stop dualhomed; dualhomed cleanup >/dev/null"); err != nil {
		return 0, 0, err
	}
	// A clean start: no rule of either tool left from the previous round
	// (ec2-net-utils' removal runs its bash scripts, which can take longer
	// than the previous round waited for).
	for deadline := time.Now().Add(30 * time.Second); r.rulesAt(10000+e.dev)+r.rulesAt(20000+e.dev) > 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			return 0, 0, fmt.Errorf("rules of the previous round still there 30 s on: %d at %d, %d at %d",
				r.rulesAt(10000+e.dev), 10000+e.dev, r.rulesAt(20000+e.dev), 20000+e.dev)
		}
	}
	want := append([]netip.Addr{e.primary}, e.extra...)
	// The link's arrival: its RTM_NEWLINK in the container's namespace.
	updates, done := make(chan netlink.LinkUpdate, 64), make(chan struct{})
	defer close(done)
	if err := netlink.LinkSubscribeAt(r.w.inst.Handle, updates, done); err != nil {
		return 0, 0, fmt.Errorf("subscribing to links: %w", err)
	}
	// The first echo reply, from a pinger that runs from before the attach.
	pingCtx, stopPing := context.WithCancel(context.Background())
	defer stopPing()
	replied := make(chan time.Time, 1)
	go func() {
		at, err := simworld.FirstReply(pingCtx, e.vpc.client, e.primary, 5*time.Millisecond)
		if err == nil {
			replied <- at
		}
	}()
	if err := r.w.attach(e); err != nil {
		return 0, 0, err
	}
	defer func() {
		if derr := r.w.detach(e); derr != nil && err == nil {
			err = derr
		}
		// ec2-net-utils' rules go with networkd's view of the link; wait
		// so the next round starts clean.
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) && r.rulesAt(10000+e.dev) > 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}()
	var arrived time.Time
	timeout := time.After(5 * time.Second)
	for arrived.IsZero() {
		select {
		case u := <-updates:
			if u.Header.Type == unix.RTM_NEWLINK && u.Attrs().Name == e.link {
				arrived = time.Now()
			}
		case <-timeout:
			return 0, 0, fmt.Errorf("no RTM_NEWLINK for %s", e.link)
		}
	}
	deadline := arrived.Add(60 * time.Second)
	for toRule == 0 || toReply == 0 {
		if time.Now().After(deadline) {
			return toRule, toReply, fmt.Errorf("after 60 s: %d of %d rules at priority %d, reply %v", r.rulesAt(prio), len(want), prio, toReply)
		}
		if toRule == 0 && r.rulesAt(prio) >= len(want) {
			toRule = time.Since(arrived)
		}
		if toReply == 0 {
			select {
			case at := <-replied:
				toReply = at.Sub(arrived)
			default:
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	return toRule, toReply, nil
}

// rulesAt counts the IPv4 rules at a priority in the container.
func (r *run) rulesAt(prio int) int {
	rules, err := r.w.inst.NL.RuleList(unix.AF_INET)
	if err != nil {
		return 0
	}
	n := 0
	for _, x := range rules {
		if x.Priority == prio {
			n++
		}
	}
	return n
}

func median(d []time.Duration) time.Duration { return percentile(d, 50) }

func percentile(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[(len(s)-1)*p/100]
}

func stats(d []time.Duration) string {
	if len(d) == 0 {
		return "–"
	}
	ms := func(x time.Duration) string { return fmt.Sprintf("%.1f", float64(x)/float64(time.Millisecond)) }
	return fmt.Sprintf("%s / %s / %s / %s", ms(percentile(d, 0)), ms(median(d)), ms(percentile(d, 90)), ms(percentile(d, 100)))
}

// timingOut is where the timing's page goes: `make bench` shows it in
// docs/benchmarks.md as it is (one source for these figures).
var timingOut = envOr("MATRIX_TIMING_OUT", "../../../docs/hot-attach-matrix.md")

// loadAvg is /proc/loadavg's three load averages.
func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], ", ")
}

// commitOf names the source tree the run measured.
func commitOf() string {
	out, err := exec.Command("git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return "commit unknown"
	}
	c := "commit " + strings.TrimSpace(string(out))
	if dirty, _ := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); len(dirty) > 0 {
		c += " (with uncommitted changes)"
	}
	return c
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}
