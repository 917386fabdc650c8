package netcfg

import (
	"net/netip"
	"slices"
	"testing"
)

func TestPlanFilters(t *testing.T) {
	route := Route{Table: 20001, Dst: netip.MustParsePrefix("10.1.0.0/20"), LinkIndex: 3, Src: netip.MustParseAddr("10.1.0.10"), ScopeLink: true}
	main := Route{Table: MainTable, Dst: netip.MustParsePrefix("10.1.0.0/16"), Gateway: netip.MustParseAddr("10.1.0.1"), LinkIndex: 3}
	rule := Rule{Priority: 20001, Src: netip.MustParsePrefix("10.1.0.10/32"), Table: 20001}
	addr := Addr{LinkIndex: 3, Prefix: netip.MustParsePrefix("10.1.0.10/20")}
	rpf := RPFilter{LinkName: "eth1", Value: 2}
	p := Plan{Ops: []Op{{Addr: &addr}, {Route: &route}, {Route: &main}, {Rule: &rule}, {RPFilter: &rpf},
		{Delete: true, Rule: &rule}, {Delete: true, Route: &route}, {Delete: true, RPFilter: &rpf}}}

	// Table 20001 holds a route: without a fresh IMDS read nothing goes.
	if got := p.WithoutFreshIMDS(Observed{Owned: State{Routes: []Route{route}}}); !slices.EqualFunc(got.Ops, p.Ops[:5], opEqual) {
		t.Errorf("WithoutFreshIMDS with table 20001 holding a route = %v", got)
	}
	foreign6 := KernelRoute{Route: Route{Table: 20001, Dst: netip.MustParsePrefix("::/0")}}
	if got := p.WithoutFreshIMDS(Observed{ForeignRoutes: []KernelRoute{{Route: route}}}); !slices.EqualFunc(got.Ops, p.Ops[:5], opEqual) {
		t.Errorf("WithoutFreshIMDS with table 20001 holding a foreign route = %v", got)
	}
	// Emptied by the kernel (IPv6 routes do not serve an IPv4 rule): the
	// rule's deletion goes through, the route's and rp_filter's do not.
	if got := p.WithoutFreshIMDS(Observed{ForeignRoutes: []KernelRoute{foreign6}}); !slices.EqualFunc(got.Ops, p.Ops[:6], opEqual) {
		t.Errorf("WithoutFreshIMDS with table 20001 empty = %v", got)
	}
	for _, c := range []struct {
		op   Op
		want any
	}{
		{Op{Route: &route}, route.Key()},
		{Op{Rule: &rule, Delete: true}, rule.Key()},
		{Op{Addr: &addr}, addr.Key()},
		{Op{RPFilter: &rpf}, nil},
	} {
		if got := c.op.ObjectKey(); got != c.want {
			t.Errorf("%v: ObjectKey %v, want %v", c.op, got, c.want)
		}
	}
	// A held key drops the add, never the delete of the same object.
	kept, dropped := p.Split(map[any]bool{route.Key(): true, rule.Key(): true})
	if len(dropped) != 2 || dropped[0].Route == nil || dropped[1].Rule == nil || len(kept.Ops) != len(p.Ops)-2 ||
		!slices.ContainsFunc(kept.Ops, func(op Op) bool { return op.Delete && op.Rule != nil }) {
		t.Errorf("Split: kept %v, dropped %v", kept, dropped)
	}
	// Blocks name routes; only route adds with their key are held.
	held := BlockedBy(p, []Warning{{Message: "x", Blocks: []Route{main}}, {Message: "y"}})
	if len(held) != 1 || !held[main.Key()] {
		t.Errorf("BlockedBy = %v, want the main-table route only", held)
	}
}

func opEqual(a, b Op) bool { return a.String() == b.String() && a.Delete == b.Delete }

func TestAttribute(t *testing.T) {
	enis := []ENIStatus{
		{MAC: "02:00:00:00:00:01", InterfaceID: "eni-1", Link: "eth1", LinkIndex: 3, Table: 20001},
		{MAC: "02:00:00:00:00:02", Link: "eth2", LinkIndex: 4, Table: 20002}, // IMDS gave no interface id
	}
	links := []Link{{Index: 3, Name: "eth1"}, {Index: 4, Name: "eth2"}, {Index: 9, Name: "veth9"}}
	r := func(table, link int) *Route {
		return &Route{Table: table, Dst: netip.MustParsePrefix("0.0.0.0/0"), LinkIndex: link}
	}
	for _, c := range []struct {
		op        Op
		eni, link string
	}{
		{Op{Route: r(20001, 3)}, "eni-1", "eth1"},
		{Op{Route: r(20002, 7)}, "02:00:00:00:00:02", "eth2"}, // its link is gone: by table
		{Op{Route: r(MainTable, 9)}, "", "veth9"},             // nobody's ENI: the link's name
		{Op{Rule: &Rule{Priority: 20001, Src: netip.MustParsePrefix("10.1.0.10/32"), Table: 20001}}, "eni-1", "eth1"},
		{Op{Addr: &Addr{LinkIndex: 4, Prefix: netip.MustParsePrefix("10.2.0.10/20")}}, "02:00:00:00:00:02", "eth2"},
		{Op{RPFilter: &RPFilter{LinkName: "eth1", Value: 2}}, "eni-1", "eth1"},
		{Op{Delete: true, RPFilter: &RPFilter{LinkName: "eth7"}}, "", "eth7"}, // a detached ENI's link name
	} {
		got := Attribute([]Op{c.op}, enis, links)
		if len(got) != 1 || got[0].ENI != c.eni || got[0].Link != c.link || got[0].Text != c.op.Format(map[int]string{3: "eth1", 4: "eth2", 9: "veth9"}) {
			t.Errorf("%v: attributed %+v, want ENI %q link %q", c.op, got, c.eni, c.link)
		}
	}
}
