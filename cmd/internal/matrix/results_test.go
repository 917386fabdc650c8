package matrix

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// daemonChange names a change the daemon needs; the assertions that wait for
// it are expected failures until MATRIX_DAEMON_FIXED=1 (see docs/coexistence.md).
type daemonChange int

const (
	// changeDHCPAddress: on a link whose DHCP client manages the ENI's
	// primary address, dualhomed adds it too and the two race for it.
	changeDHCPAddress daemonChange = 1
	// changeBlockedNamed: "some objects could not be added" names neither
	// the object nor what holds its place.
	changeBlockedNamed daemonChange = 2
	// changeDetachRules: after a detach, the rules pointing at the
	// vanished link's table wait for the next IMDS poll (up to 16.5 s).
	changeDetachRules daemonChange = 3
	// changeEC2Hint: the hint for amazon-ec2-net-utils' rules removes the
	// package, whose 80-ec2.network also brings up the primary ENI.
	changeEC2Hint daemonChange = 4
	// changeRPFilterRestore: the rp_filter originals are recorded in the
	// unit's RuntimeDirectory, which a stop removes: neither a restart nor
	// `apt-get remove` (prerm stops, then runs cleanup) can restore them.
	changeRPFilterRestore daemonChange = 7
	// changeFailedAdd: an addition the kernel refuses (the VPC route in
	// main via a gateway main cannot reach, when the stack puts the ENI's
	// subnet route in its own table) is retried at every poll, counted as
	// a repair, and holds back every deletion: rules of a detached ENI and
	// an unassigned IP stay.
	changeFailedAdd daemonChange = 8
	// changeDHCPGap: the DHCP grace (change #1) starts when a link
	// appears; when a DHCP client drops a lease and takes it again later
	// (networkd reconfiguring a link, ifdown/ifup), manage_addresses adds
	// the primary address in between, and the client's address then goes
	// through dualhomed's copy.
	changeDHCPGap daemonChange = 9
)

// landed are the daemon changes in the tree (docs/coexistence.md): their
// assertions are plain ones.
var landed = []daemonChange{changeDHCPAddress, changeBlockedNamed, changeDetachRules, changeEC2Hint, changeRPFilterRestore, changeFailedAdd, changeDHCPGap}

// fixed reports whether the change has landed, or MATRIX_DAEMON_FIXED says
// it has (to try a branch that makes it).
func (c daemonChange) fixed() bool {
	if slices.Contains(landed, c) {
		return true
	}
	for _, f := range strings.Split(daemonFixed, ",") {
		if f = strings.TrimSpace(f); f == "all" || f == strconv.Itoa(int(c)) {
			return true
		}
	}
	return false
}

// Steps, in the order the issue lists them.
var stepNames = []string{"boot", "attach/detach", "secondary IP", "DHCP renewal", "restart/reload", "upgrade, remove, purge", "reboot", "hints followed"}

type outcome struct {
	assertion string
	status    string // pass, FAIL, XFAIL (expected: a daemon change), XPASS, LIMIT (the stack's own)
	change    daemonChange
	detail    string
}

// results collects every assertion's outcome, for the table, and how long
// each step took.
type results struct {
	mu    sync.Mutex
	rows  map[string]map[string][]outcome     // stack -> step -> outcomes
	times map[string]map[string]time.Duration // stack -> step -> time spent
}

func newResults() *results {
	return &results{rows: map[string]map[string][]outcome{}, times: map[string]map[string]time.Duration{}}
}

// took adds d to the time the stack spent in step.
func (r *results) took(stack, step string, d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.times[stack] == nil {
		r.times[stack] = map[string]time.Duration{}
	}
	r.times[stack][step] += d
}

// timeTable is the time each stack spent in each step, in seconds; the
// container boots are part of the steps that boot (baseline, boot, reboot).
func (r *results) timeTable(order []string) string {
	cols := append([]string{"baseline"}, stepNames...)
	var b strings.Builder
	b.WriteString("| stack | " + strings.Join(cols, " | ") + " | total | of which container boots |\n|---|" + strings.Repeat("---|", len(cols)+2) + "\n")
	for _, s := range order {
		row := r.times[s]
		if row == nil {
			continue
		}
		var total time.Duration
		cells := []string{s}
		for _, c := range cols {
			total += row[c]
			cells = append(cells, fmt.Sprintf("%.0f", row[c].Seconds()))
		}
		cells = append(cells, fmt.Sprintf("%.0f", total.Seconds()), fmt.Sprintf("%.0f", row["(container boots)"].Seconds()))
		b.WriteString("| " + strings.Join(cells, " | ") + " |\n")
	}
	return b.String()
}

func (r *results) add(stack, step string, o outcome) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.rows[stack] == nil {
		r.rows[stack] = map[string][]outcome{}
	}
	r.rows[stack][step] = append(r.rows[stack][step], o)
}

// cell summarises one stack × step: "pass", or the assertions that failed.
func cell(os []outcome) string {
	if len(os) == 0 {
		return "–"
	}
	var fails, xfails, xpasses, limits []string
	for _, o := range os {
		switch o.status {
		case "FAIL":
			fails = append(fails, o.assertion)
		case "LIMIT":
			limits = append(limits, o.assertion)
		case "XFAIL":
			xfails = append(xfails, fmt.Sprintf("%s (daemon #%d)", o.assertion, o.change))
		case "XPASS":
			xpasses = append(xpasses, fmt.Sprintf("%s (daemon #%d)", o.assertion, o.change))
		}
	}
	var parts []string
	if len(fails) > 0 {
		parts = append(parts, "**FAIL**: "+strings.Join(dedup(fails), ", "))
	}
	if len(xfails) > 0 {
		parts = append(parts, "expected fail: "+strings.Join(dedup(xfails), ", "))
	}
	if len(limits) > 0 {
		parts = append(parts, "stack limit: "+strings.Join(dedup(limits), ", "))
	}
	if len(xpasses) > 0 {
		parts = append(parts, "**unexpected pass**: "+strings.Join(dedup(xpasses), ", "))
	}
	if len(parts) == 0 {
		return "pass"
	}
	return strings.Join(parts, "; ")
}

func dedup(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}

// write puts the table and every failure's detail into outDir.
func (r *results) write(t *testing.T, order []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b, d, x strings.Builder
	b.WriteString("| stack | " + strings.Join(stepNames, " | ") + " |\n|---|" + strings.Repeat("---|", len(stepNames)) + "\n")
	for _, s := range order {
		row := r.rows[s]
		if row == nil {
			continue
		}
		cells := []string{s}
		for _, st := range stepNames {
			cells = append(cells, cell(row[st]))
		}
		b.WriteString("| " + strings.Join(cells, " | ") + " |\n")
		steps := make([]string, 0, len(row))
		for st := range row {
			steps = append(steps, st)
		}
		sort.Strings(steps)
		for _, st := range steps {
			for _, o := range row[st] {
				if o.status == "XPASS" {
					fmt.Fprintf(&x, "- %s / %s / %s: passes, waits for daemon change #%d\n", s, st, o.assertion, o.change)
					continue
				}
				if o.status != "pass" {
					fmt.Fprintf(&d, "- %s / %s / %s: %s", s, st, o.assertion, o.status)
					if o.change != 0 {
						fmt.Fprintf(&d, " (daemon change #%d)", o.change)
					}
					fmt.Fprintf(&d, "\n\n  ```\n  %s\n  ```\n", strings.ReplaceAll(strings.TrimSpace(o.detail), "\n", "\n  "))
				}
			}
		}
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		t.Errorf("writing results: %v", err)
		return
	}
	table := filepath.Join(outDir, "coexistence-table.md")
	if err := os.WriteFile(table, []byte(b.String()), 0o644); err != nil {
		t.Errorf("writing results: %v", err)
	}
	if err := os.WriteFile(filepath.Join(outDir, "coexistence-details.md"), []byte(d.String()), 0o644); err != nil {
		t.Errorf("writing results: %v", err)
	}
	times := r.timeTable(order)
	if err := os.WriteFile(filepath.Join(outDir, "step-times.md"), []byte(times), 0o644); err != nil {
		t.Errorf("writing results: %v", err)
	}
	t.Logf("seconds per step (%s):\n%s", filepath.Join(outDir, "step-times.md"), times)
	t.Logf("coexistence matrix (%s):\n%s", table, b.String())
	// Unexpected passes: not failures (a lucky race can pass once), but
	// said where nobody can miss them, so that a landed daemon change gets
	// its assertions turned into plain ones (MATRIX_DAEMON_FIXED, then
	// results_test.go).
	xpass := filepath.Join(outDir, "unexpected-passes.md")
	_ = os.Remove(xpass)
	if x.Len() > 0 {
		_ = os.WriteFile(xpass, []byte(x.String()), 0o644)
		fmt.Fprintf(os.Stderr, "\n"+strings.Repeat("!", 72)+"\nmatrix: UNEXPECTED PASSES of assertions that wait for daemon changes\n(has the change landed? then set MATRIX_DAEMON_FIXED and make them plain assertions):\n%s"+strings.Repeat("!", 72)+"\n\n", x.String())
	}
}
