package netcfg

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
)

// diffFixture is a small owned state: table 20001 on link 2 and its rules.
func diffFixture() State {
	return State{
		Routes: []Route{
			{Table: 20001, Dst: desPfx("10.1.1.0/24"), LinkIndex: 2, Src: desIP("10.1.1.10"), ScopeLink: true},
			{Table: 20001, Dst: desPfx("0.0.0.0/0"), Gateway: desIP("10.1.1.1"), LinkIndex: 2, Src: desIP("10.1.1.10")},
			{Table: MainTable, Dst: desPfx("10.1.0.0/16"), Gateway: desIP("10.1.1.1"), LinkIndex: 2, Src: desIP("10.1.1.10")},
		},
		Rules: []Rule{
			{Priority: 20001, Src: desPfx("10.1.1.10/32"), Table: 20001},
			{Priority: 20001, Src: desPfx("10.1.1.11/32"), Table: 20001},
		},
		Addrs: []Addr{
			{LinkIndex: 2, Prefix: desPfx("10.1.1.10/24")},
			{LinkIndex: 2, Prefix: desPfx("10.1.1.11/32"), NoPrefixRoute: true},
		},
		RPFilters: []RPFilter{{LinkName: "eth1", Value: 2}},
	}
}

func planLines(p Plan) []string {
	s := strings.TrimSuffix(p.Format(desNames(4)), "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

func TestDiff(t *testing.T) {
	fixture := diffFixture()
	tests := []struct {
		name           string
		owned, desired State
		want           []string // exact plan, in order
	}{
		{name: "nothing", want: nil},
		{name: "state with itself", owned: fixture, desired: fixture, want: nil},
		{
			name:    "from scratch: addresses, on-link routes, gateway routes, rules, rp_filter",
			desired: fixture,
			want: []string{
				"+ addr 10.1.1.10/24 dev eth1",
				"+ addr 10.1.1.11/32 dev eth1 noprefixroute",
				"+ route 10.1.1.0/24 dev eth1 scope link src 10.1.1.10 table 20001",
				"+ route 10.1.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
				"+ route default via 10.1.1.1 dev eth1 src 10.1.1.10 table 20001",
				"+ rule from 10.1.1.10/32 lookup 20001 priority 20001",
				"+ rule from 10.1.1.11/32 lookup 20001 priority 20001",
				"+ sysctl net.ipv4.conf.eth1.rp_filter=2",
			},
		},
		{
			name:  "to nothing: rules, gateway routes, on-link routes, addresses, rp_filter",
			owned: fixture,
			want: []string{
				"- rule from 10.1.1.10/32 lookup 20001 priority 20001",
				"- rule from 10.1.1.11/32 lookup 20001 priority 20001",
				"- route 10.1.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
				"- route default via 10.1.1.1 dev eth1 src 10.1.1.10 table 20001",
				"- route 10.1.1.0/24 dev eth1 scope link src 10.1.1.10 table 20001",
				"- addr 10.1.1.10/24 dev eth1",
				"- addr 10.1.1.11/32 dev eth1 noprefixroute",
				"- sysctl net.ipv4.conf.eth1.rp_filter (restore the original value)",
			},
		},
		{
			name:  "changed gateway and address flag are replaced in place, a moved rule is added before the old one goes",
			owned: fixture,
			desired: func() State {
				s := diffFixture()
				s.Routes[1].Gateway = desIP("10.1.1.2")
				s.Addrs[0].NoPrefixRoute = true
				s.Rules[1].Src = desPfx("10.1.1.12/32")
				s.RPFilters[0].Value = 1
				return s
			}(),
			want: []string{
				"~ addr 10.1.1.10/24 dev eth1 noprefixroute",
				"~ route default via 10.1.1.2 dev eth1 src 10.1.1.10 table 20001",
				"+ rule from 10.1.1.12/32 lookup 20001 priority 20001",
				"+ sysctl net.ipv4.conf.eth1.rp_filter=1",
				"- rule from 10.1.1.11/32 lookup 20001 priority 20001",
			},
		},
		{
			name:    "an address whose length changed is a new object: add, then delete",
			owned:   State{Addrs: []Addr{{LinkIndex: 2, Prefix: desPfx("10.1.1.10/32"), NoPrefixRoute: true}}},
			desired: State{Addrs: []Addr{{LinkIndex: 2, Prefix: desPfx("10.1.1.10/24")}}},
			want: []string{
				"+ addr 10.1.1.10/24 dev eth1",
				"- addr 10.1.1.10/32 dev eth1 noprefixroute",
			},
		},
		{
			name: "duplicate keys in owned: the exact one stays, the other goes",
			owned: State{Routes: []Route{
				{Table: 20001, Dst: desPfx("0.0.0.0/0"), Gateway: desIP("10.1.1.9"), LinkIndex: 2},
				{Table: 20001, Dst: desPfx("0.0.0.0/0"), Gateway: desIP("10.1.1.1"), LinkIndex: 2},
			}},
			desired: State{Routes: []Route{{Table: 20001, Dst: desPfx("0.0.0.0/0"), Gateway: desIP("10.1.1.1"), LinkIndex: 2}}},
			want:    []string{"- route default via 10.1.1.9 dev eth1 table 20001"},
		},
		{
			name:    "a route moving to another link is replaced",
			owned:   State{Routes: []Route{{Table: MainTable, Dst: desPfx("10.1.0.0/16"), Gateway: desIP("10.1.1.1"), LinkIndex: 2, Src: desIP("10.1.1.10")}}},
			desired: State{Routes: []Route{{Table: MainTable, Dst: desPfx("10.1.0.0/16"), Gateway: desIP("10.1.2.1"), LinkIndex: 3, Src: desIP("10.1.2.10")}}},
			want:    []string{"~ route 10.1.0.0/16 via 10.1.2.1 dev eth2 src 10.1.2.10 table main"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := Diff(tt.owned, tt.desired)
			if got := planLines(p); !slices.Equal(got, tt.want) {
				t.Errorf("plan:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
			if p.Empty() != (len(tt.want) == 0) {
				t.Errorf("Empty() = %v", p.Empty())
			}
			checkPlan(t, tt.owned, tt.desired, p)
			if got := applyToState(tt.owned, p); !got.Equal(tt.desired) {
				t.Errorf("applying the plan gives\n%v\nwant\n%v", got, tt.desired)
			}
		})
	}
}

// TestDiffDoesNotAlias checks that ops point at copies: a caller mutating
// its states after Diff must not change the plan.
func TestDiffDoesNotAlias(t *testing.T) {
	desired := diffFixture()
	p := Diff(State{}, desired)
	before := p.String()
	desired.Routes[0].Table = 1
	desired.Rules[0].Table = 1
	if p.String() != before {
		t.Error("the plan changed when the desired state was modified")
	}
}

func TestPlanJSON(t *testing.T) {
	owned := diffFixture()
	desired := diffFixture()
	desired.Routes[1].Gateway = desIP("10.1.1.2")
	desired.Rules = desired.Rules[:1]
	desired.RPFilters = nil
	p := Diff(owned, desired)
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`{"action":"replace","kind":"route","text":"~ route default via 10.1.1.2 dev #2 src 10.1.1.10 table 20001","replace":true,"route":{"table":20001,"dst":"0.0.0.0/0","gateway":"10.1.1.2","link_index":2,"src":"10.1.1.10"}}`,
		`{"action":"delete","kind":"rule","text":"- rule from 10.1.1.11/32 lookup 20001 priority 20001","delete":true,"rule":{"priority":20001,"src":"10.1.1.11/32","table":20001}}`,
		`{"action":"restore","kind":"rp_filter"`,
	} {
		if !strings.Contains(string(b), want) {
			t.Errorf("JSON lacks %s\nin %s", want, b)
		}
	}
	var back Plan
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.String() != p.String() {
		t.Errorf("round trip:\n%s\nwant\n%s", back, p)
	}
	if b, _ := json.Marshal(Plan{}); string(b) != `{"ops":null}` && string(b) != `{"ops":[]}` {
		t.Errorf("empty plan JSON %s", b)
	}
}

func TestStateSortAndEqual(t *testing.T) {
	a := diffFixture()
	b := diffFixture()
	slices.Reverse(b.Routes)
	slices.Reverse(b.Rules)
	slices.Reverse(b.Addrs)
	if !a.Equal(b) {
		t.Error("the same objects in another order are not Equal")
	}
	a.Sort()
	b.Sort()
	if !slices.Equal(a.Routes, b.Routes) || a.Routes[0].Table != MainTable || !a.Routes[2].ScopeLink {
		t.Errorf("Sort: %v, want %v", b.Routes, a.Routes)
	}
	b.Rules[0].Table++
	if a.Equal(b) {
		t.Error("different states are Equal")
	}
	if !(State{}).Empty() || a.Empty() {
		t.Error("Empty")
	}
}

// checkPlan asserts the invariants every plan keeps: no delete before an add
// (make before break), rules added after every route add and deleted before
// every route delete, addresses added before routes and deleted last, and no
// op touching an object that is neither owned nor desired.
func checkPlan(t *testing.T, owned, desired State, p Plan) {
	t.Helper()
	const (
		addrAdd = iota
		routeAdd
		ruleAdd
		rpfSet
		ruleDel
		routeDel
		addrDel
		rpfRestore
	)
	phase := func(op Op) int {
		switch {
		case op.Addr != nil && !op.Delete:
			return addrAdd
		case op.Route != nil && !op.Delete:
			return routeAdd
		case op.Rule != nil && !op.Delete:
			return ruleAdd
		case op.RPFilter != nil && !op.Delete:
			return rpfSet
		case op.Rule != nil:
			return ruleDel
		case op.Route != nil:
			return routeDel
		case op.Addr != nil:
			return addrDel
		default:
			return rpfRestore
		}
	}
	last := -1
	for i, op := range p.Ops {
		n := 0
		for _, set := range []bool{op.Route != nil, op.Rule != nil, op.Addr != nil, op.RPFilter != nil} {
			if set {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("op %d sets %d objects: %+v", i, n, op)
		}
		if ph := phase(op); ph < last {
			t.Fatalf("op %d (%s) is out of order in\n%s", i, op, p)
		} else {
			last = ph
		}
		if op.Replace && (op.Delete || op.Rule != nil || op.RPFilter != nil) {
			t.Fatalf("op %d: replace on %s", i, op)
		}
		// Adds and replaces carry desired objects, deletes owned ones.
		src := desired
		if op.Delete {
			src = owned
		}
		var ok bool
		switch {
		case op.Route != nil:
			ok = slices.Contains(src.Routes, *op.Route)
			if op.Replace {
				ok = ok && slices.ContainsFunc(owned.Routes, func(r Route) bool { return r.Key() == op.Route.Key() })
			}
		case op.Rule != nil:
			ok = slices.Contains(src.Rules, *op.Rule)
		case op.Addr != nil:
			ok = slices.Contains(src.Addrs, *op.Addr)
			if op.Replace {
				ok = ok && slices.ContainsFunc(owned.Addrs, func(a Addr) bool { return a.Key() == op.Addr.Key() })
			}
		case op.RPFilter != nil:
			ok = slices.Contains(src.RPFilters, *op.RPFilter)
		}
		if !ok {
			t.Fatalf("op %d (%s) touches an object outside owned and desired", i, op)
		}
	}
}

// applyToState is what a perfect kernel would do with the plan: the owned
// state after Apply.
func applyToState(owned State, p Plan) State {
	s := owned.clone()
	for _, op := range p.Ops {
		switch {
		case op.Route != nil:
			r := *op.Route
			switch {
			case op.Delete:
				if i := slices.Index(s.Routes, r); i >= 0 {
					s.Routes = slices.Delete(s.Routes, i, i+1)
				}
			case op.Replace:
				if i := slices.IndexFunc(s.Routes, func(o Route) bool { return o.Key() == r.Key() }); i >= 0 {
					s.Routes[i] = r
				} else {
					s.Routes = append(s.Routes, r)
				}
			default:
				s.Routes = append(s.Routes, r)
			}
		case op.Rule != nil:
			if op.Delete {
				s.Rules = slices.DeleteFunc(s.Rules, func(o Rule) bool { return o == *op.Rule })
			} else if !slices.Contains(s.Rules, *op.Rule) {
				s.Rules = append(s.Rules, *op.Rule)
			}
		case op.Addr != nil:
			a := *op.Addr
			switch {
			case op.Delete:
				if i := slices.Index(s.Addrs, a); i >= 0 {
					s.Addrs = slices.Delete(s.Addrs, i, i+1)
				}
			case op.Replace:
				if i := slices.IndexFunc(s.Addrs, func(o Addr) bool { return o.Key() == a.Key() }); i >= 0 {
					s.Addrs[i] = a
				} else {
					s.Addrs = append(s.Addrs, a)
				}
			default:
				s.Addrs = append(s.Addrs, a)
			}
		case op.RPFilter != nil:
			f := *op.RPFilter
			s.RPFilters = slices.DeleteFunc(s.RPFilters, func(o RPFilter) bool { return o.LinkName == f.LinkName })
			if !op.Delete {
				s.RPFilters = append(s.RPFilters, f)
			}
		}
	}
	s.Sort()
	return s
}
