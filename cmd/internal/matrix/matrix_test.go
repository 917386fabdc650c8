package matrix

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// TestMatrix boots every stack configuration in its own container, all in
// parallel (the 60 s quiet windows overlap), and runs the steps in
// order in each, recording every assertion in the result table.
func TestMatrix(t *testing.T) {
	needMatrix(t)
	t.Parallel() // beside TestHotAttachTiming
	res := newResults()
	var order []string
	for i, s := range stacks() {
		if !only.MatchString(s.name) {
			continue
		}
		order = append(order, s.name)
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			r := &run{t: t, s: s, res: res, ctx: context.Background()}
			r.main(i)
		})
	}
	t.Cleanup(func() { res.write(t, order) })
}

// run is one stack configuration's pass through the steps.
type run struct {
	t    *testing.T
	s    stack
	res  *results
	ctx  context.Context
	w    *world
	c    *container
	step string
	// stepStart is when the current step began.
	stepStart time.Time
	// The stack's objects before dualhomed was installed: after a boot, and
	// after the stack's own restart and reload.
	baseline, restarted simworld.Dump
	// primaryUnmanaged: after the hints, networkd no longer manages eth0
	// (daemon change #4's harm).
	primaryUnmanaged bool
}

func (r *run) pass(assertion string) {
	r.res.add(r.s.name, r.step, outcome{assertion: assertion, status: "pass"})
}

func (r *run) fail(assertion, format string, args ...any) {
	r.t.Helper()
	msg := fmt.Sprintf(format, args...)
	r.t.Errorf("%s: %s: %s", r.step, assertion, msg)
	r.res.add(r.s.name, r.step, outcome{assertion: assertion, status: "FAIL", detail: msg})
}

// check records a plain assertion. One that the configuration's stack
// cannot pass (stack.limits) is recorded as the stack's limit, not as a
// failure, except after the hints are followed: then every assertion holds.
func (r *run) check(assertion string, ok bool, format string, args ...any) bool {
	r.t.Helper()
	reason, limited := r.s.limits[assertion]
	limited = limited && r.step != "hints followed"
	switch {
	case ok:
		r.pass(assertion)
	case limited:
		r.t.Logf("STACK LIMIT: %s: %s (%s): %s", r.step, assertion, reason, fmt.Sprintf(format, args...))
		r.res.add(r.s.name, r.step, outcome{assertion: assertion, status: "LIMIT", detail: reason + ": " + fmt.Sprintf(format, args...)})
	default:
		r.fail(assertion, format, args...)
	}
	return ok
}

// known records an assertion that waits for a daemon change: an expected
// failure until MATRIX_DAEMON_FIXED names the change, a plain assertion
// after. An expected failure that passes is an unexpected pass, which the
// run reports loudly (build/matrix/unexpected-passes.md): perhaps the
// change has landed and its assertions can become plain ones.
func (r *run) known(assertion string, change daemonChange, ok bool, format string, args ...any) {
	r.t.Helper()
	msg := fmt.Sprintf(format, args...)
	switch {
	case ok && change.fixed():
		r.pass(assertion)
	case ok:
		r.t.Logf("UNEXPECTED PASS: %s: %s passes although it waits for daemon change #%d", r.step, assertion, change)
		r.res.add(r.s.name, r.step, outcome{assertion: assertion, status: "XPASS", change: change})
	case change.fixed():
		r.t.Errorf("%s: %s (daemon change #%d): %s", r.step, assertion, change, msg)
		r.res.add(r.s.name, r.step, outcome{assertion: assertion, status: "FAIL", change: change, detail: msg})
	default:
		r.t.Logf("EXPECTED FAILURE until daemon change #%d: %s: %s: %s", change, r.step, assertion, msg)
		r.res.add(r.s.name, r.step, outcome{assertion: assertion, status: "XFAIL", change: change, detail: msg})
	}
}

func (r *run) sh(timeout time.Duration, script string) (string, error) {
	return r.c.sh(r.ctx, timeout, script)
}

func (r *run) main(i int) {
	t := r.t
	dir := filepath.Join(workDir, fmt.Sprintf("c%d", i))
	var err error
	// eth3's DHCP offers wait 1 s, so that on hot attach dualhomed, which
	// reads IMDS in milliseconds, always meets the link before its lease
	// (daemon change #1's race, the same in every run), and the lease still
	// comes well inside dualhomed's 3 s grace for a DHCP client.
	r.w, err = newWorld(fmt.Sprintf("mx%dc%d-", os.Getpid(), i), filepath.Join(dir, "world"), time.Second, t.Logf)
	if err != nil {
		t.Fatalf("building the world: %v", err)
	}
	t.Cleanup(r.w.close)
	if err := os.MkdirAll(filepath.Join(dir, "world"), 0o755); err != nil {
		t.Fatal(err)
	}
	r.c, err = newContainer(fmt.Sprintf("matrix%d", i), filepath.Join(dir, "ct"), rootDir, r.w)
	if err != nil {
		t.Fatalf("preparing the container: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("MATRIX_KEEP") != "" {
			r.saveLogs(dir)
		}
		r.c.kill()
	})
	if err := r.s.prepare(r.c.root); err != nil {
		t.Fatalf("configuring %s: %v", r.s.name, err)
	}
	for _, d := range []string{debV1, debV2} {
		if out, err := exec.Command("cp", d, filepath.Join(r.c.root, "root")).CombinedOutput(); err != nil {
			t.Fatalf("copying %s: %v: %s", d, err, out)
		}
	}
	for _, step := range []func(){r.baselineBoot, r.stepBoot, r.stepAttachDetach, r.stepSecondaryIP,
		r.stepRenewal, r.stepRestart, r.stepUpgradeRemovePurge, r.stepReboot, r.stepHints} {
		r.stepStart = time.Now()
		step()
		r.res.took(r.s.name, r.step, time.Since(r.stepStart))
	}
}

// saveLogs copies the container's journal and the world's logs next to the results.
func (r *run) saveLogs(dir string) {
	dst := filepath.Join(outDir, "logs", strings.NewReplacer(" ", "", ",", "-").Replace(r.s.name))
	_ = os.MkdirAll(dst, 0o755)
	if out, err := r.sh(30*time.Second, "journalctl -b --no-pager -o short-monotonic"); err == nil {
		_ = os.WriteFile(filepath.Join(dst, "journal.txt"), []byte(out), 0o644)
	}
	_ = exec.Command("sh", "-c", "cp "+filepath.Join(dir, "world")+"/*.log "+filepath.Join(dir, "ct")+"/console-*.log "+dst+"/ 2>/dev/null").Run()
}

// boot boots the container in a fresh namespace with the given ENIs.
func (r *run) boot(enis ...string) error {
	start := time.Now()
	defer func() { r.res.took(r.s.name, "(container boots)", time.Since(start)) }()
	if err := r.w.newInstance(enis...); err != nil {
		return fmt.Errorf("making the container's namespace: %w", err)
	}
	if err := r.c.boot(r.ctx, 3*time.Minute); err != nil {
		return err
	}
	// Boot is done; network-online.target is part of it for every stack
	// here. Wait for the DHCP addresses the stack manages.
	deadline := time.Now().Add(60 * time.Second)
	for {
		d, err := dumpState(r.w.inst)
		if _, theirs := split(d); err == nil && len(addrLines(theirs, "eth0", r.w.eni("eth0").primary)) > 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("eth0 has no DHCP address 60 s after boot:\n%s", strings.Join(d, "\n"))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// waitAddresses waits until every attached ENI has its primary address, or
// for at most timeout.
func (r *run) waitAddresses(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		d, _ := dumpState(r.w.inst)
		all := true
		for _, e := range r.w.enis {
			if e.attached && len(addrLines(d, e.link, e.primary)) == 0 {
				all = false
			}
		}
		if all {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// baselineBoot boots the configuration without dualhomed, records the
// stack's own objects and which clients get replies, then installs
// dualhomed as an image bake would and powers off.
func (r *run) baselineBoot() {
	t := r.t
	r.step = "baseline"
	if err := r.boot("eth0", "eth1", "eth2"); err != nil {
		t.Fatalf("first boot, without dualhomed: %v", err)
	}
	r.waitAddresses(10 * time.Second) // the secondary ENIs' DHCP too
	d, err := dumpState(r.w.inst)
	if err != nil {
		t.Fatal(err)
	}
	_, r.baseline = split(d)
	t.Logf("before dualhomed, the stack's objects:\n%s", strings.Join(r.baseline, "\n"))
	// What the stack's own restart and reload leave behind differs from a
	// fresh boot (systemd-networkd 252 restarted keeps the DHCP addresses
	// but their prefix routes lose their metric until the next
	// reconfigure): record it too, without dualhomed, for the steps after
	// the restart.
	for _, cmd := range r.s.restart {
		if out, err := r.sh(2*time.Minute, cmd); err != nil {
			t.Fatalf("without dualhomed: %s: %v\n%s", cmd, err, tail(out, 10))
		}
		time.Sleep(5 * time.Second)
	}
	r.waitAddresses(10 * time.Second)
	if d, err = dumpState(r.w.inst); err != nil {
		t.Fatal(err)
	}
	_, r.restarted = split(d)
	if missing, extra := r.baseline.Diff(r.restarted); len(missing)+len(extra) > 0 {
		t.Logf("without dualhomed, the stack's restart changed its objects:\ngone:\n%s\nnew:\n%s", strings.Join(missing, "\n"), strings.Join(extra, "\n"))
	}
	if err := r.install("/root/" + filepath.Base(debV1)); err != nil {
		t.Fatalf("installing dualhomed: %v", err)
	}
	if err := r.c.poweroff(r.ctx, time.Minute); err != nil {
		t.Fatalf("power off: %v", err)
	}
}

// install installs a .deb in the running container, turns on dualhomed's
// metrics (the repair counter) and the variant's own settings, and
// restarts the daemon with them.
func (r *run) install(deb string) error {
	if out, err := r.sh(3*time.Minute, "apt-get install -y -q -o Dpkg::Options::=--force-confold "+deb); err != nil {
		return fmt.Errorf("%v\n%s", err, tail(out, 20))
	}
	script := `grep -q '^metrics:' /etc/dualhomed/dualhomed.yaml || printf 'metrics:\n  listen: 127.0.0.1:9810\n' >>/etc/dualhomed/dualhomed.yaml`
	if r.s.afterInstall != "" {
		script += " && " + r.s.afterInstall
	}
	if _, err := r.sh(time.Minute, script+" && systemctl restart dualhomed"); err != nil {
		return err
	}
	return nil
}

// common runs the assertions that follow every step: replies through the
// right ENI, the stack's objects as before dualhomed, the warnings the
// situation deserves, and no fight during the quiet window.
func (r *run) common(withDualhomed bool) {
	r.replies(withDualhomed)
	r.stackState(withDualhomed)
	if withDualhomed {
		r.warnings()
	}
	r.quiet(withDualhomed)
}

// replies: every client of an attached ENI gets TCP replies through its ENI
// (the same-address clients of VPCs A and C included: a reply through the
// wrong ENI reaches the other VPC's twin, which resets it).
//
// Replies to the primary ENI's client follow main's default route, which
// dualhomed leaves alone: where the stack put a secondary ENI's DHCP gateway
// ahead of the primary's (DHCP on every ENI at one metric: the last lease
// wins), they leave through that ENI. That is the stack's limit
// (docs/coexistence.md, change 5: a warning with the per-ENI fix, which the
// hints step follows), recorded as such only when the kernel's route for
// the reply says so.
//
// Without dualhomed the stack alone decides: a client gets replies exactly
// when main routes them through its ENI.
func (r *run) replies(withDualhomed bool) {
	var bad []string
	for _, e := range r.w.enis {
		if !e.attached {
			continue
		}
		// Where DHCP puts every ENI's gateway in main at one metric, each
		// lease renewal can re-add a default route and change which one
		// wins: the route is read before and after the probe, again until
		// they agree.
		var err error
		var via string
		for try := 0; try < 3; try++ {
			before := r.replyLink(e)
			wait := 10 * time.Second
			if e.dev == 0 && before != e.link {
				wait = 2 * time.Second // main sends it elsewhere (#5): a short look suffices
			}
			err = echo(e.vpc.client, e.primary, wait)
			if via = r.replyLink(e); via == before {
				break
			}
		}
		if withDualhomed && e.dev == 0 && via != e.link && r.primaryUnmanaged {
			r.known("replies via the primary ENI", changeEC2Hint, err == nil,
				"networkd no longer manages eth0 after the hint; main routes the reply to VPC A's client through %s (%s); the client got: %v", via, r.mainDefaults(), err)
			continue
		}
		if withDualhomed && e.dev == 0 && via != e.link {
			r.check("replies via the primary ENI", err == nil,
				"main routes the reply to VPC A's client through %s (%s); the client got: %v", via, r.mainDefaults(), err)
			continue
		}
		want := withDualhomed || via == e.link
		if (err == nil) != want {
			bad = append(bad, fmt.Sprintf("client in VPC %s -> %s (%s): want reply %v, got error %v (the kernel routes the reply through %s)", e.vpc.name, e.primary, e.link, want, err, via))
		}
	}
	r.check("replies", len(bad) == 0, "%s", strings.Join(bad, "\n"))
}

// replyLink is the link the container's kernel routes a reply from the ENI's
// primary address to its VPC's client through (`ip route get`).
func (r *run) replyLink(e *eni) string {
	out, err := r.w.inst.IP("route", "get", e.vpc.client4.String(), "from", e.primary.String())
	if err != nil {
		return "none (" + err.Error() + ")"
	}
	f := strings.Fields(out)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "dev" {
			return f[i+1]
		}
	}
	return "none"
}

// mainDefaults lists main's IPv4 default routes, in the kernel's order.
func (r *run) mainDefaults() string {
	out, _ := r.w.inst.IP("-4", "route", "show", "default", "table", "main")
	return strings.Join(strings.Fields(strings.ReplaceAll(strings.TrimSpace(out), "\n", " | ")), " ")
}

// stackState compares the stack's objects with what the stack alone had at
// the same point (after a boot, or after its own restart); objects of links
// the baseline did not have are left out, and so is the rp_filter of the
// secondary ENIs while dualhomed, which sets it, is installed (after a purge
// it must be back).
func (r *run) stackState(withDualhomed bool) {
	d, err := dumpState(r.w.inst)
	if err != nil {
		r.fail("stack state", "%v", err)
		return
	}
	mine, theirs := split(d)
	want := r.baseline
	if r.step == "restart/reload" || r.step == "upgrade, remove, purge" {
		want = r.restarted
	}
	leave := []string{"eth3"}
	if withDualhomed {
		leave = append(leave, "sysctl net.ipv4.conf.eth1.rp_filter", "sysctl net.ipv4.conf.eth2.rp_filter")
	}
	missing, extra := without(want, leave...).Diff(without(theirs, leave...))
	// Daemon change #1: an address of the stack's that dualhomed's copy
	// holds, or that dualhomed added a copy of since this boot (while the
	// stack's DHCP client had dropped it) and the client then took back:
	// the client's re-addition over dualhomed's copy keeps the copy's flags
	// and kernel prefix route (no metric, no noprefixroute). The address's
	// and its prefix route's differences are that change's.
	copies := r.addressCopies(time.Time{}) // this boot
	for _, l := range mine {
		if link, prefix, ok := addrOf(l); ok {
			copies[link+" "+prefix] = true
		}
	}
	var held, otherMissing, otherExtra []string
	for _, m := range missing {
		if ofCopy(m, copies) {
			held = append(held, "- "+m)
		} else {
			otherMissing = append(otherMissing, m)
		}
	}
	for _, e := range extra {
		if ofCopy(e, copies) {
			held = append(held, "+ "+e)
		} else {
			otherExtra = append(otherExtra, e)
		}
	}
	// Daemon change #7: after remove and purge the secondary ENIs'
	// rp_filter must be back; its originals live in /run/dualhomed, which
	// systemd removes with the unit's RuntimeDirectory when it stops.
	if !withDualhomed {
		var rp []string
		otherMissing, rp = splitOff(otherMissing, rp, "- ")
		otherExtra, rp = splitOff(otherExtra, rp, "+ ")
		if len(rp) > 0 {
			r.known("rp_filter restored", changeRPFilterRestore, false,
				"dualhomed's rp_filter values outlive it:\n%s", strings.Join(rp, "\n"))
		}
	}
	if len(held) > 0 {
		r.known("DHCP address ownership", r.ownershipChange(), false,
			"the stack's DHCP addresses went through dualhomed's copies (proto 210); what differs from the stack alone:\n%s", strings.Join(held, "\n"))
	}
	r.check("stack state", len(otherMissing) == 0 && len(otherExtra) == 0,
		"the stack's objects differ from the stack alone's:\nmissing:\n%s\nextra:\n%s", strings.Join(otherMissing, "\n"), strings.Join(otherExtra, "\n"))
}

// splitOff moves the secondary ENIs' rp_filter lines of lines into moved,
// each with a prefix.
func splitOff(lines, moved []string, prefix string) (rest, movedOut []string) {
	for _, l := range lines {
		if strings.HasPrefix(l, "sysctl net.ipv4.conf.eth1.rp_filter") || strings.HasPrefix(l, "sysctl net.ipv4.conf.eth2.rp_filter") {
			moved = append(moved, prefix+l)
		} else {
			rest = append(rest, l)
		}
	}
	return rest, moved
}

// ofCopy reports whether a dump line is one of the addresses in copies
// ("link prefix") or the kernel's prefix route of one.
func ofCopy(line string, copies map[string]bool) bool {
	if link, prefix, ok := addrOf(line); ok {
		return copies[link+" "+prefix]
	}
	if link, dst, ok := prefixRouteOf(line); ok {
		for k := range copies {
			l, prefix, _ := strings.Cut(k, " ")
			if p, err := netip.ParsePrefix(prefix); err == nil && l == link && p.Masked().String() == dst {
				return true
			}
		}
	}
	return false
}

// addOp is the address and link of a dualhomed "changed" line adding one.
var addOp = regexp.MustCompile(`"\+ addr (\S+) dev ([^ "]+)`)

// addressCopies returns the addresses ("link prefix") dualhomed logged
// adding since a time.
func (r *run) addressCopies(since time.Time) map[string]bool {
	out := map[string]bool{}
	es, _ := r.c.journal(r.ctx, since, "-t", "dualhomed")
	for _, e := range es {
		if m := addOp.FindStringSubmatch(e.msg()); m != nil {
			out[m[2]+" "+m[1]] = true
		}
	}
	return out
}

// warningView is one entry of `dualhomed status --json`'s warnings.
type warningView struct {
	ENI     string `json:"eni"`
	Message string `json:"message"`
	Hint    string `json:"hint"`
}

func (r *run) statusWarnings() ([]warningView, error) {
	out, err := r.c.exec(r.ctx, 30*time.Second, "dualhomed", "status", "--json")
	if err != nil && !strings.HasPrefix(strings.TrimSpace(out), "{") {
		return nil, err
	}
	var st struct {
		Warnings []warningView `json:"warnings"`
	}
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &st); err != nil {
		return nil, fmt.Errorf("decoding dualhomed status --json: %v: %s", err, out)
	}
	return st.Warnings, nil
}

// warnings: `dualhomed status` shows exactly the warnings the
// configuration deserves.
func (r *run) warnings() {
	ws, err := r.statusWarnings()
	if err != nil {
		r.fail("warnings", "%v", err)
		return
	}
	var unexpected []string
	found := make([]bool, len(r.s.warnings))
	for _, w := range ws {
		matched := false
		for i, p := range r.s.warnings {
			if regexp.MustCompile(p).MatchString(w.Message) {
				found[i], matched = true, true
			}
		}
		if !matched {
			unexpected = append(unexpected, fmt.Sprintf("%s: %s (hint: %s)", w.ENI, w.Message, w.Hint))
		}
	}
	var absent []string
	for i, ok := range found {
		if !ok {
			absent = append(absent, r.s.warnings[i])
		}
	}
	r.check("warnings", len(unexpected) == 0 && len(absent) == 0,
		"unexpected warnings:\n%s\nexpected but absent:\n%s", strings.Join(unexpected, "\n"), strings.Join(absent, "\n"))
}

// quiet watches a quiet window: dualhomed's repair and change counters do
// not grow, the kernel state does not move, and the stack's journal shows
// no reconfiguration.
func (r *run) quiet(withDualhomed bool) {
	start := time.Now()
	m0, ok0 := metrics(r.w.inst)
	d0, _ := dumpState(r.w.inst)
	time.Sleep(quiet)
	m1, ok1 := metrics(r.w.inst)
	d1, _ := dumpState(r.w.inst)
	if withDualhomed {
		if r.check("metrics", ok0 && ok1, "dualhomed's metrics endpoint did not answer") {
			var grew []string
			for _, k := range []string{"dualhomed_drift_repairs_total", "dualhomed_changes_applied_total"} {
				if m1[k] != m0[k] {
					grew = append(grew, fmt.Sprintf("%s %v -> %v", k, m0[k], m1[k]))
				}
			}
			var window []string // what dualhomed and the stack logged meanwhile
			if len(grew) > 0 {
				// journalctl ANDs -t with -u: one query each.
				queries := [][]string{{"-t", "dualhomed"}}
				for _, u := range r.s.units {
					queries = append(queries, []string{"-u", u})
				}
				for _, q := range queries {
					es, _ := r.c.journal(r.ctx, start, q...)
					for _, e := range es {
						window = append(window, e.Unit+e.Ident+": "+e.msg())
					}
				}
			}
			if failed := r.failedAdds(start); len(grew) > 0 && len(failed) > 0 {
				r.known("no fight: dualhomed", changeFailedAdd, false, "during %s of quiet: %s, retrying an addition the kernel refuses:\n%s", quiet, strings.Join(grew, ", "), tail(strings.Join(failed, "\n"), 5))
			} else {
				r.check("no fight: dualhomed", len(grew) == 0, "during %s of quiet: %s\n%s", quiet, strings.Join(grew, ", "), tail(strings.Join(window, "\n"), 30))
			}
		}
	}
	swaps, missing, extra := addressSwaps(d0.Diff(d1))
	if len(swaps) > 0 {
		r.known("DHCP address ownership", r.ownershipChange(), false,
			"during %s of quiet, addresses changed hands between a DHCP client and dualhomed:\n%s", quiet, strings.Join(swaps, "\n"))
	}
	// Daemon change #8: while an addition the kernel refuses is retried and
	// counted as a repair, the repair backoff grows (up to 30 s), and
	// dualhomed's own objects that the stack's reconfiguration flushed
	// come back that late, inside the window.
	mineMissing, theirsMissing := split(missing)
	mineExtra, theirsExtra := split(extra)
	if failed := r.failedAdds(start); withDualhomed && len(failed) > 0 && len(missing)+len(extra) > 0 &&
		len(theirsMissing)+len(theirsExtra) == 0 {
		r.known("no fight: kernel state", changeFailedAdd, false,
			"during %s of quiet only dualhomed's objects moved, while it retried an addition the kernel refuses:\ngone:\n%s\nnew:\n%s\n%s",
			quiet, strings.Join(mineMissing, "\n"), strings.Join(mineExtra, "\n"), tail(strings.Join(failed, "\n"), 3))
	} else {
		r.check("no fight: kernel state", len(missing) == 0 && len(extra) == 0,
			"the state moved during %s of quiet:\ngone:\n%s\nnew:\n%s", quiet, strings.Join(missing, "\n"), strings.Join(extra, "\n"))
	}
	var args []string
	for _, u := range r.s.units {
		args = append(args, "-u", u)
	}
	es, err := r.c.journal(r.ctx, start, args...)
	if err != nil {
		r.fail("no fight: stack", "reading the journal: %v", err)
		return
	}
	var lines []string
	for _, e := range es {
		if r.s.reconfig.MatchString(e.msg()) {
			lines = append(lines, e.Unit+e.Ident+": "+e.msg())
		}
	}
	r.check("no fight: stack", len(lines) == 0, "the stack reconfigured during %s of quiet:\n%s", quiet, tail(strings.Join(lines, "\n"), 20))
}

var readyMsg = regexp.MustCompile(`(^|\s|")ready("|\s|$)`)

// order: network-online.target is reached only after dualhomed's first
// reconcile. PID 1 logs both "Started dualhomed.service" (on READY=1) and
// "Reached target network-online.target", so their journal order is the
// order they happened in; the daemon's own "ready" line (logged right before
// READY=1 after its first successful reconcile, never on the start-timeout
// path) proves that READY=1 came from a reconcile.
func (r *run) order() {
	es, err := r.c.journal(r.ctx, time.Time{})
	if err != nil {
		r.fail("network-online order", "%v", err)
		return
	}
	var ready, started, online int64
	for _, e := range es {
		if ready == 0 && e.Ident == "dualhomed" && readyMsg.MatchString(e.msg()) {
			ready = e.mono()
		}
		if started == 0 && e.Ident == "systemd" && strings.HasPrefix(e.msg(), "Started dualhomed.service") {
			started = e.mono()
		}
		if online == 0 && e.Ident == "systemd" && strings.Contains(e.msg(), "Reached target") && strings.Contains(e.msg(), "network-online.target") {
			online = e.mono()
		}
	}
	r.check("network-online order", ready != 0 && started != 0 && online != 0 && started <= online,
		"monotonic µs (0 = not in the journal): dualhomed's first reconcile done (\"ready\") %d, unit started (READY=1) %d, network-online.target reached %d", ready, started, online)
}

// daemonHealthy: dualhomed is active and never restarted.
func (r *run) daemonHealthy() {
	out, _ := r.sh(10*time.Second, "systemctl show -p ActiveState -p NRestarts dualhomed.service")
	r.check("dualhomed active", strings.Contains(out, "ActiveState=active") && strings.Contains(out, "NRestarts=0"), "%s", out)
}

func (r *run) stepBoot() {
	r.step = "boot"
	r.bootChecked()
}

// bootChecked boots the container with two secondary ENIs and asserts what
// every boot must give: dualhomed healthy, network-online after its first
// reconcile, and the common assertions.
func (r *run) bootChecked() {
	if err := r.boot("eth0", "eth1", "eth2"); err != nil {
		r.fail("boot", "%v", err)
		r.t.FailNow()
	}
	r.daemonHealthy()
	r.order()
	r.common(true)
}

// ourRules lists dualhomed's IPv4 rules that look up a table.
func (r *run) ourRules(table int) []string {
	rules, _ := r.w.inst.NL.RuleList(unix.AF_INET)
	var out []string
	for _, x := range rules {
		if x.Protocol == 210 && x.Table == table {
			out = append(out, x.String())
		}
	}
	return out
}

func (r *run) stepAttachDetach() {
	r.step = "attach/detach"
	e := r.w.eni("eth3")
	start := time.Now()
	if err := r.w.attach(e); err != nil {
		r.fail("attach", "%v", err)
		return
	}
	err := echo(e.vpc.client, e.primary, 30*time.Second)
	r.check("replies after attach", err == nil, "client in VPC D -> %s: %v (%s after the link appeared)", e.primary, err, time.Since(start))
	blocked := r.blockedNamed(start)
	// eth3's primary address comes from the DHCP client, which manages it:
	// dualhomed must not add it too. Whether it tried shows whoever won the
	// race: its copy holds the address, or its journal has the addition, or
	// its addition was blocked by the DHCP client's address.
	d, _ := dumpState(r.w.inst)
	mine, _ := split(d)
	tried := addrLines(mine, "eth3", e.primary)
	es, _ := r.c.journal(r.ctx, start, "-t", "dualhomed")
	for _, j := range es {
		if m := j.msg(); strings.Contains(m, "+ addr "+e.primary.String()+"/") && strings.Contains(m, "dev eth3") {
			tried = append(tried, m)
		}
	}
	tried = append(tried, blocked...)
	if r.s.hotAttachUnmanaged {
		// Nothing runs DHCP on eth3: dualhomed adds its primary address
		// itself once its DHCP grace is over (manage_addresses).
		r.t.Logf("%s: no DHCP client on eth3; dualhomed's additions: %v", r.step, tried)
	} else {
		r.known("DHCP address ownership", r.ownershipChange(), len(tried) == 0,
			"dualhomed added or tried to add eth3's DHCP-managed address %s:\n%s", e.primary, strings.Join(tried, "\n"))
	}
	table := 20000 + e.dev
	had := r.ourRules(table)
	r.check("rules after attach", len(had) > 0, "dualhomed has no rule looking up eth3's table %d", table)
	// Detach: the rules for the vanished link must be gone within 1 s.
	detached := time.Now()
	if err := r.w.detach(e); err != nil {
		r.fail("detach", "%v", err)
		return
	}
	if len(had) == 0 {
		r.common(true)
		return
	}
	var gone time.Duration
	for time.Since(detached) < 25*time.Second {
		if len(r.ourRules(table)) == 0 {
			gone = time.Since(detached)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if failed := r.failedAdds(detached); gone == 0 && len(failed) > 0 {
		r.known("rules gone after detach", changeFailedAdd, false, "dualhomed's rules for eth3 still there 25 s after the detach: %v; held back by:\n%s", r.ourRules(table), tail(strings.Join(failed, "\n"), 3))
	} else {
		r.check("rules gone after detach", gone > 0, "dualhomed's rules for eth3 still there 25 s after the detach: %v", r.ourRules(table))
	}
	if gone > 0 {
		r.known("rules gone within 1 s", changeDetachRules, gone <= time.Second, "dualhomed's rules for the detached eth3 went after %s", gone.Round(time.Millisecond))
	}
	r.common(true)
}

// leaseDropped matches a DHCP client's messages for a lease it dropped
// and takes again (networkd's reconfiguration, dhclient's release).
var leaseDropped = regexp.MustCompile(`DHCP lease lost|DHCPRELEASE`)

// ownershipChange is the daemon change an address that went through
// dualhomed's copy waits for: #9 where the stack's DHCP client dropped a
// lease during this boot (dualhomed's grace covers a link's appearance
// only), #1 otherwise.
func (r *run) ownershipChange() daemonChange {
	var args []string
	for _, u := range r.s.units {
		args = append(args, "-u", u)
	}
	es, _ := r.c.journal(r.ctx, time.Time{}, args...)
	for _, e := range es {
		if leaseDropped.MatchString(e.msg()) {
			return changeDHCPGap
		}
	}
	return changeDHCPAddress
}

// failedAdds returns dualhomed's "applying changes failed" lines since a
// time: additions the kernel refused, which (make before break) hold back
// every deletion of the same reconcile, and which it retries at each poll
// (daemon change #8).
func (r *run) failedAdds(since time.Time) []string {
	es, _ := r.c.journal(r.ctx, since, "-t", "dualhomed")
	var out []string
	for _, e := range es {
		if m := e.msg(); strings.Contains(m, "applying changes failed") {
			out = append(out, m)
		}
	}
	return out
}

// blockedNamed: every "could not be added" warning since start names the
// blocked object and what holds it (daemon change #2). It returns the
// warnings that do not.
func (r *run) blockedNamed(since time.Time) []string {
	es, _ := r.c.journal(r.ctx, since, "-t", "dualhomed")
	var vague []string
	for _, e := range es {
		m := e.msg()
		if strings.Contains(m, "could not be added") && !(strings.Contains(m, `"object":`) && strings.Contains(m, `"holder":`)) {
			vague = append(vague, m)
		}
	}
	if len(vague) > 0 {
		r.known("blocked object named", changeBlockedNamed, false, "%d warnings name neither the object nor its holder, e.g.:\n%s", len(vague), vague[0])
	}
	return vague
}

func (r *run) stepSecondaryIP() {
	r.step = "secondary IP"
	e := r.w.eni("eth1")
	ip := netip.MustParseAddr("10.1.1.20")
	start := time.Now()
	if err := r.w.imds.UpdateENI(e.mac, func(x *imdsENI) { x.LocalIPv4s = append(x.LocalIPv4s, ip) }); err != nil {
		r.fail("assign", "%v", err)
		return
	}
	err := echo(e.vpc.client, ip, 40*time.Second)
	r.check("replies on the new IP", err == nil, "client in VPC B -> %s: %v (%s after the assignment)", ip, err, time.Since(start))
	if r.s.tracksIMDSIPs {
		// The stack adds the IP too, at its next refresh: the stack alone
		// would have it, so the steps after compare with it gone again.
		r.waitStackIP(ip, true)
	}
	if err := r.w.imds.UpdateENI(e.mac, func(x *imdsENI) { x.LocalIPv4s = x.LocalIPv4s[:1] }); err != nil {
		r.fail("unassign", "%v", err)
		return
	}
	unassigned := time.Now()
	if r.s.tracksIMDSIPs {
		r.waitStackIP(ip, false)
	}
	deadline := time.Now().Add(60 * time.Second) // four IMDS polls
	for {
		d, _ := dumpState(r.w.inst)
		left := d.Grep(" " + ip.String())
		if len(left) == 0 {
			r.pass("address and rule gone after unassign")
			break
		}
		if time.Now().After(deadline) {
			if failed := r.failedAdds(unassigned); len(failed) > 0 {
				r.known("address and rule gone after unassign", changeFailedAdd, false, "60 s after the unassignment:\n%s\nheld back by:\n%s", strings.Join(left, "\n"), tail(strings.Join(failed, "\n"), 3))
			} else {
				r.fail("address and rule gone after unassign", "60 s after the unassignment:\n%s", strings.Join(left, "\n"))
			}
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	r.common(true)
}

// waitStackIP waits until the stack's own objects for ip are there (or
// gone), for at most two of its refresh periods, and records whether they
// followed IMDS.
func (r *run) waitStackIP(ip netip.Addr, present bool) {
	start := time.Now()
	for {
		d, _ := dumpState(r.w.inst)
		_, theirs := split(d)
		has := len(theirs.Grep(" "+ip.String())) > 0
		if has == present {
			r.pass(fmt.Sprintf("the stack follows IMDS (present: %v)", present))
			r.t.Logf("%s: the stack's own objects for %s present=%v after %s", r.step, ip, present, time.Since(start).Round(time.Second))
			return
		}
		if time.Since(start) > 140*time.Second {
			r.fail(fmt.Sprintf("the stack follows IMDS (present: %v)", present), "140 s on, the stack's objects for %s: %v", ip, theirs.Grep(" "+ip.String()))
			return
		}
		time.Sleep(time.Second)
	}
}

func (r *run) stepRenewal() {
	r.step = "DHCP renewal"
	before := map[string]int{}
	for _, e := range r.w.enis[:3] {
		before[e.link] = r.w.acks(e)
	}
	deadline := time.Now().Add(3 * renewAfter)
	for {
		var waiting []string
		for _, e := range r.w.enis[:3] {
			if r.w.acks(e) <= before[e.link] {
				waiting = append(waiting, e.link)
			}
		}
		if len(waiting) == 0 {
			r.pass("every ENI renewed")
			break
		}
		if time.Now().After(deadline) {
			r.fail("every ENI renewed", "no DHCPACK within %s for %v (T1 %s)", 3*renewAfter, waiting, renewAfter)
			break
		}
		time.Sleep(time.Second)
	}
	r.common(true)
}

func (r *run) stepRestart() {
	r.step = "restart/reload"
	for _, cmd := range r.s.restart {
		out, err := r.sh(2*time.Minute, cmd)
		r.check("ran: "+cmd, err == nil, "%v\n%s", err, tail(out, 10))
		time.Sleep(5 * time.Second)
	}
	r.daemonHealthy()
	r.common(true)
}

func (r *run) stepUpgradeRemovePurge() {
	r.step = "upgrade, remove, purge"
	pid0, _ := r.sh(10*time.Second, "systemctl show -p MainPID --value dualhomed")
	if err := r.install("/root/" + filepath.Base(debV2)); err != nil {
		r.fail("upgrade", "%v", err)
		return
	}
	ver, _ := r.sh(10*time.Second, "dpkg-query -W -f '${Version}' dualhomed")
	pid1, _ := r.sh(10*time.Second, "systemctl show -p MainPID --value dualhomed")
	r.check("upgraded and restarted", strings.HasSuffix(strings.TrimSpace(ver), "-2") && pid0 != pid1,
		"version %q, MainPID %s -> %s", ver, strings.TrimSpace(pid0), strings.TrimSpace(pid1))
	r.replies(true)
	r.stackState(true)
	r.warnings()
	for _, op := range []string{"remove", "purge"} {
		out, err := r.sh(2*time.Minute, "apt-get "+op+" -y -q dualhomed")
		if !r.check("apt-get "+op, err == nil, "%v\n%s", err, tail(out, 10)) {
			continue
		}
		d, _ := dumpState(r.w.inst)
		mine, _ := split(d)
		r.check("no dualhomed object after "+op, len(mine) == 0, "left behind:\n%s", strings.Join(mine, "\n"))
		files, _ := r.sh(10*time.Second, "ls -d /usr/bin/dualhomed /run/dualhomed /etc/dualhomed 2>/dev/null; true")
		want := ""
		if op == "remove" {
			want = "/etc/dualhomed"
		}
		r.check("files after "+op, strings.TrimSpace(files) == want, "left: %q, want %q", files, want)
	}
	r.common(false)
}

func (r *run) stepReboot() {
	r.step = "reboot"
	if err := r.install("/root/" + filepath.Base(debV2)); err != nil {
		r.fail("reinstall", "%v", err)
		return
	}
	if err := r.c.poweroff(r.ctx, time.Minute); err != nil {
		r.fail("power off", "%v", err)
	}
	r.bootChecked()
}

// stepHints follows every warning's hint as an operator would, then checks
// that the warning is gone and that everything still works.
func (r *run) stepHints() {
	r.step = "hints followed"
	ws, err := r.statusWarnings()
	if err != nil {
		r.fail("warnings", "%v", err)
		return
	}
	if len(ws) == 0 {
		r.pass("no warning to follow")
		return
	}
	informational := regexp.MustCompile(overlapWarning)
	ws = slices.DeleteFunc(ws, func(w warningView) bool { return informational.MatchString(w.Message) })
	if len(ws) == 0 {
		r.pass("no warning to follow")
		return
	}
	ec2Hint := false
	for _, w := range ws {
		script, ok := r.follow(w)
		if !r.check("hint is actionable", ok, "no way to follow %q (hint: %q)", w.Message, w.Hint) {
			continue
		}
		ec2Hint = ec2Hint || strings.Contains(w.Hint, "amazon-ec2-net-utils")
		out, err := r.sh(3*time.Minute, script)
		r.check("hint followed", err == nil, "%s: %v\n%s", script, err, tail(out, 10))
	}
	if ec2Hint {
		// amazon-ec2-net-utils' 80-ec2.network is what brings up the
		// primary ENI too: after its hint, the next networkd reload (or
		// boot) must still manage eth0, or its lease runs out.
		out, _ := r.sh(time.Minute, "networkctl reload && sleep 3 && networkctl list --no-pager --no-legend eth0")
		r.primaryUnmanaged = strings.Contains(out, "unmanaged")
		r.known("primary ENI managed after the hint", changeEC2Hint, !r.primaryUnmanaged,
			"after the hint and `networkctl reload`, networkd no longer manages eth0 (its DHCP lease is not renewed):\n%s", strings.TrimSpace(out))
	}
	time.Sleep(20 * time.Second)
	left, err := r.statusWarnings()
	if err == nil {
		left = slices.DeleteFunc(left, func(w warningView) bool { return informational.MatchString(w.Message) })
		var msgs []string
		for _, w := range left {
			msgs = append(msgs, w.Message+" (hint: "+w.Hint+")")
		}
		r.check("warnings gone", len(left) == 0, "after following the hints:\n%s", strings.Join(msgs, "\n"))
	}
	r.replies(true)
}
