package netcfg

import (
	"net/netip"
	"testing"
)

// Every add another program's object can keep out is named with that
// object as Observe reads it back from the kernel: a DHCP client's address
// (finite lifetimes, no protocol), a route with its protocol and metric, a
// rule with its protocol and the selectors that make it another's.
func TestBlockedNamesTheHolderReadFromTheKernel(t *testing.T) {
	w := newKTWorld(t)
	w.ip(t, "addr", "add", "10.1.0.10/24", "dev", "eth1", "valid_lft", "300", "preferred_lft", "300")
	w.ip(t, "addr", "add", "10.1.0.11/32", "dev", "eth1")
	w.ip(t, "route", "add", "default", "via", "10.1.0.1", "dev", "eth1", "table", "20001", "proto", "dhcp")
	w.ip(t, "rule", "add", "from", "10.1.0.10", "iif", "eth1", "lookup", "20001", "priority", "20001", "protocol", "static")
	obs := w.observe(t)
	eth1 := w.idx["eth1"]
	for _, c := range []struct {
		op             Op
		object, holder string
	}{
		{Op{Addr: &Addr{LinkIndex: eth1, Prefix: netip.MustParsePrefix("10.1.0.10/24")}},
			"address 10.1.0.10/24 dev eth1", "dynamic address 10.1.0.10/24 dev eth1, proto 0: a DHCP client"},
		{Op{Addr: &Addr{LinkIndex: eth1, Prefix: netip.MustParsePrefix("10.1.0.11/32"), NoPrefixRoute: true}},
			"address 10.1.0.11/32 dev eth1 noprefixroute", "permanent address 10.1.0.11/32 dev eth1, proto 0"},
		{Op{Route: &Route{Table: 20001, Dst: netip.MustParsePrefix("0.0.0.0/0"), Gateway: netip.MustParseAddr("10.1.0.1"), LinkIndex: eth1}},
			"route default via 10.1.0.1 dev eth1 table 20001", "route default via 10.1.0.1 dev eth1 table 20001 proto dhcp metric 0"},
		{Op{Rule: &Rule{Priority: 20001, Src: netip.MustParsePrefix("10.1.0.10/32"), Table: 20001}},
			"rule from 10.1.0.10/32 lookup 20001 priority 20001",
			"rule 20001: from 10.1.0.10/32 lookup 20001 proto static and more selectors (iif, oif, tos, not...)"},
		{Op{Rule: &Rule{Priority: 20002, Src: netip.MustParsePrefix("10.1.0.12/32"), Table: 20002}},
			"rule from 10.1.0.12/32 lookup 20002 priority 20002",
			"nothing the kernel lists now (the holder went, or the object left with its link): tried again on the next kernel change"},
	} {
		if got := obs.Blocked(c.op); got.Object != c.object || got.Holder != c.holder {
			t.Errorf("Blocked(%v) = %+v, want object %q, holder %q", c.op, got, c.object, c.holder)
		}
	}
}
