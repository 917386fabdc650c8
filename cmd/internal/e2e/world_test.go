package e2e

import (
	"testing"
	"time"
)

// The world is fair: the textbook source routing, typed by hand with ip(8),
// makes every client work. So a failing scenario with dualhomed running is
// dualhomed's fault, not the world's.
func TestWorldIsSolvableByHand(t *testing.T) {
	w := newWorld(t)
	for _, cmd := range [][]string{
		{"route", "add", "default", "via", "10.1.1.1", "dev", "eth1", "table", "101"},
		{"-6", "route", "add", "default", "via", "fe80:ec2::1", "dev", "eth1", "table", "101"},
		{"rule", "add", "from", "10.1.1.10", "lookup", "101", "priority", "101"},
		{"-6", "rule", "add", "from", "fd00:b:0:1::10", "lookup", "101", "priority", "101"},
		{"route", "add", "default", "via", "10.0.2.1", "dev", "eth2", "table", "102"},
		{"rule", "add", "from", "10.0.2.10", "lookup", "102", "priority", "102"},
		{"link", "set", "eth1", "up"},
	} {
		if _, err := w.Instance.IP(cmd...); err != nil {
			t.Fatal(err)
		}
	}
	for _, l := range []string{"eth1", "eth2"} {
		if err := w.Instance.SetSysctl("net/ipv4/conf/"+l+"/rp_filter", "2"); err != nil {
			t.Fatal(err)
		}
	}
	ps := clientProbes(w, "eth0", "eth1", "eth2")
	results := runAll(ps, 2*time.Second)
	for _, p := range ps {
		if errs := results[p.name]; errs[0] != nil || errs[1] != nil {
			t.Errorf("%s: ping: %v, tcp: %v", p, errs[0], errs[1])
		}
	}
}
