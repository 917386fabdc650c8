package netcfg

import (
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// A rule with our protocol, priority, source and table but a selector
// dualhomed never sets (fwmark, iif, not, ...) is somebody else's: it must
// not pass for our plain rule (which would then never be added), and it is
// never changed or deleted, cleanup included. The kernel deletes the first
// rule of its list that matches a delete request, and a request cannot say
// "no fwmark": our rule is deleted only when no such lookalike precedes it.
func TestRulesWithSelectorsAreNotOurs(t *testing.T) {
	lettingOursIn := [][]string{
		{"fwmark", "0x1"},
		{"iif", "eth2"},
		{"ipproto", "tcp"},
		{"dport", "443"},
		{"uidrange", "1000-2000"},
		{"suppress_prefixlength", "0"},
	}
	t.Run("after ours", func(t *testing.T) { checkRulesWithSelectors(t, false, lettingOursIn, afterOurs) })
	t.Run("before ours", func(t *testing.T) { checkRulesWithSelectors(t, false, lettingOursIn, beforeOurs) })
	// The kernel's duplicate check ignores tos and `not` when the rule added
	// lacks them: such a rule holds our plain rule's place (EEXIST, which
	// Apply takes as done and the daemon reports as blocked).
	for _, sel := range [][]string{{"tos", "0x10"}, {"not"}} {
		t.Run("holding our place: "+sel[0], func(t *testing.T) { checkRulesWithSelectors(t, false, [][]string{sel}, holdingOurPlace) })
	}
}

// The same for a NAT source's mark rule (`fwmark 0x100000/0xfff00000
// lookup T`): a rule with our protocol, priority, table, mark and mask plus
// another selector is somebody else's, and so is one with a source, which
// the kernel's duplicate check and delete request (no source) do not tell
// from ours.
func TestMarkRulesWithSelectorsAreNotOurs(t *testing.T) {
	lettingOursIn := [][]string{
		{"iif", "eth2"},
		{"ipproto", "tcp"},
		{"dport", "443"},
		{"uidrange", "1000-2000"},
	}
	t.Run("after ours", func(t *testing.T) { checkRulesWithSelectors(t, true, lettingOursIn, afterOurs) })
	t.Run("before ours", func(t *testing.T) { checkRulesWithSelectors(t, true, lettingOursIn, beforeOurs) })
	for _, sel := range [][]string{{"from", "10.1.0.0/16"}, {"tos", "0x10"}, {"not"}} {
		t.Run("holding our place: "+sel[0], func(t *testing.T) { checkRulesWithSelectors(t, true, [][]string{sel}, holdingOurPlace) })
	}
}

type lookalikePlace int

const (
	afterOurs lookalikePlace = iota
	beforeOurs
	holdingOurPlace
)

// checkRulesWithSelectors places rules with selectors next to our first
// rule (mark: our mark rule instead) and checks what reconcile and cleanup
// do with both.
func checkRulesWithSelectors(t *testing.T, mark bool, selectors [][]string, place lookalikePlace) {
	w := newKTWorld(t)
	desired := w.state(ktEth1)
	r := desired.Rules[0]
	// match selects our rule in `ip rule add`; shown is how `ip rule show`
	// prints it, plain our rule alone.
	match, shown := []string{"from", r.Src.String()}, "from "+r.Src.Addr().String()+" "
	plain := "\tfrom " + r.Src.Addr().String()
	if mark {
		r = Rule{Priority: r.Priority, Src: anyPrefix(unix.AF_INET), Table: r.Table, Mark: 1 << 20, Mask: NATMarkMask}
		desired.Rules = append(desired.Rules, r)
		desired.Sort()
		match, shown = []string{"fwmark", "0x100000/0xfff00000"}, "fwmark 0x100000/0xfff00000"
		plain = "\tfrom all " + shown
	}
	prio, table := strconv.Itoa(r.Priority), strconv.Itoa(r.Table)
	plain += " lookup " + table + " proto 210"
	family := "-4"
	if r.Src.Addr().Is6() {
		family = "-6"
	}
	addLookalikes := func() {
		for _, sel := range selectors {
			args := []string{family, "rule", "add", "priority", prio}
			if sel[0] == "not" {
				args = append(args, "not")
				sel = nil
			}
			w.ip(t, append(append(append(args, match...), sel...), "lookup", table, "proto", "210")...)
		}
	}
	rules := func() (lookalikes string, ours bool) {
		t.Helper()
		out, err := w.ns.Output("ip", family, "rule", "show", "priority", prio)
		if err != nil {
			t.Fatalf("ip rule show: %v", err)
		}
		var keep []string
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			switch {
			case strings.HasSuffix(l, plain):
				ours = true
			case strings.Contains(l, shown) && strings.Contains(l, "proto 210"):
				keep = append(keep, l)
			}
		}
		return strings.Join(keep, "\n"), ours
	}

	if place == afterOurs {
		w.reconcile(t, desired)
	}
	addLookalikes()
	before, _ := rules()
	if n := strings.Count(before, "\n") + 1; n != len(selectors) {
		t.Fatalf("placed %d rules with selectors, see %d:\n%s", len(selectors), n, before)
	}
	if place != afterOurs {
		if owned := w.owned(t); len(owned.Rules) != 0 {
			t.Errorf("rules with selectors read as ours: %v", owned.Rules)
		}
	}
	w.reconcile(t, desired)
	owned := w.owned(t)
	if place == holdingOurPlace {
		if _, ours := rules(); ours {
			t.Errorf("our rule %v was added although a rule with selectors holds its place", r)
		}
	} else {
		if !owned.Equal(desired) {
			t.Errorf("owned after apply:\n%s", Diff(owned, desired))
		}
		if n := w.reconcile(t, desired); n != 0 {
			t.Errorf("second apply made %d writes", n)
		}
	}

	_, cleanupErr := w.k.Cleanup()
	after, oursLeft := rules()
	if after != before {
		t.Errorf("rules with selectors changed:\nbefore\n%s\nafter\n%s", before, after)
	}
	switch {
	case place == beforeOurs && (cleanupErr == nil || !strings.Contains(cleanupErr.Error(), "not deleting rule") || !oursLeft):
		t.Errorf("cleanup with lookalikes before our rule: err %v, our rule left %v; want it refused, naming the rule", cleanupErr, oursLeft)
	case place != beforeOurs && (cleanupErr != nil || oursLeft):
		t.Errorf("cleanup: err %v, our rule left %v; want our rule deleted", cleanupErr, oursLeft)
	}
}
