package matrix

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
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
)

// Steps, in the order the issue lists them.
var stepNames = []string{"boot", "attach/detach", "secondary IP", "DHCP renewal", "restart/reload", "upgrade, remove, purge", "reboot", "hints followed"}

type outcome struct {
	assertion string
	status    string // pass, FAIL, XFAIL (expected: a daemon change), XPASS
	change    daemonChange
	detail    string
}

// results collects every assertion's outcome, for the table.
type results struct {
	mu   sync.Mutex
	rows map[string]map[string][]outcome // stack -> step -> outcomes
}

func newResults() *results { return &results{rows: map[string]map[string][]outcome{}} }

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
	var fails, xfails []string
	xpass := false
	for _, o := range os {
		switch o.status {
		case "FAIL":
			fails = append(fails, o.assertion)
		case "XFAIL":
			xfails = append(xfails, fmt.Sprintf("%s (daemon #%d)", o.assertion, o.change))
		case "XPASS":
			xpass = true
		}
	}
	var parts []string
	if len(fails) > 0 {
		parts = append(parts, "**FAIL**: "+strings.Join(dedup(fails), ", "))
	}
	if len(xfails) > 0 {
		parts = append(parts, "expected fail: "+strings.Join(dedup(xfails), ", "))
	}
	if len(parts) == 0 {
		if xpass {
			return "pass (a daemon-change assertion passed)"
		}
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
	var b, d strings.Builder
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
	t.Logf("coexistence matrix (%s):\n%s", table, b.String())
}
