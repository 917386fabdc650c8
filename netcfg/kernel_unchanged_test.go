package netcfg

import (
	"strconv"
	"testing"
	"time"
)

// Unchanged must turn false on every kind of change the daemon's poll would
// otherwise find by dumping: if it missed one, the poll would keep a stale
// observation and never repair or report that change.
func TestUnchangedSeesEveryKindOfChange(t *testing.T) {
	w := newKTWorld(t)
	desired := w.state(ktEth1, ktEth2)
	w.reconcile(t, desired)
	changes := []struct {
		name   string
		change func()
	}{
		{"foreign rule added", func() { w.ip(t, "rule", "add", "priority", "50", "from", "10.9.0.1", "lookup", "101") }},
		{"one of our rules deleted", func() {
			r := desired.Rules[0]
			w.ip(t, "rule", "del", "priority", strconv.Itoa(r.Priority), "from", r.Src.String(), "lookup", strconv.Itoa(r.Table))
		}},
		{"route added in main", func() { w.ip(t, "route", "add", "192.0.2.0/24", "dev", "eth1") }},
		{"route added in our band", func() { w.ip(t, "route", "add", "198.51.100.0/24", "dev", "eth2", "table", "20077") }},
		{"address added", func() { w.ip(t, "addr", "add", "192.0.2.77/32", "dev", "eth2") }},
		{"link changed", func() { w.ip(t, "link", "set", "eth2", "mtu", "1400") }},
		{"rp_filter changed", func() { w.ns.Sysctl(t, "net/ipv4/conf/eth1/rp_filter", "1") }},
	}
	for _, c := range changes {
		if _, err := w.k.Observe(); err != nil {
			t.Fatalf("Observe: %v", err)
		}
		if !w.k.Unchanged() {
			// IPv6 DAD or router discovery may still be settling: give it
			// a moment, once.
			time.Sleep(200 * time.Millisecond)
			if _, err := w.k.Observe(); err != nil {
				t.Fatalf("Observe: %v", err)
			}
			if !w.k.Unchanged() {
				t.Fatalf("before %s: Unchanged is false right after Observe on a quiet kernel", c.name)
			}
		}
		c.change()
		if w.k.Unchanged() {
			t.Errorf("%s: Unchanged still true", c.name)
		}
	}
}
