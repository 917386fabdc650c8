package netcfg

import (
	"net/netip"
	"reflect"
	"slices"
	"testing"
)

// Diff's shortcut for equal states gives exactly the plan of the merge, for
// equal states with and without duplicate keys, in order or not, and for
// states that differ in one object.
func TestDiffShortcutAgreesWithTheMerge(t *testing.T) {
	_, _, res := benchWorld(t)
	st := res.State
	route := st.Routes[0]
	otherGateway := route
	otherGateway.Gateway = netip.MustParseAddr("10.9.9.9")
	addr := st.Addrs[0]
	flipped := addr
	flipped.NoPrefixRoute = !addr.NoPrefixRoute
	withDup := func(s State) State {
		s = s.clone()
		s.Routes = append(s.Routes, otherGateway)
		s.Rules = append(s.Rules, s.Rules[3])
		s.Addrs = append(s.Addrs, flipped)
		s.RPFilters = append(s.RPFilters, RPFilter{LinkName: s.RPFilters[0].LinkName, Value: 2})
		s.Sort()
		return s
	}
	reversed := st.clone()
	slices.Reverse(reversed.Rules)
	oneChanged := st.clone()
	oneChanged.Addrs[7] = flipped
	cases := []struct {
		name           string
		owned, desired State
		wantEmpty      bool
	}{
		{"equal", st, st.clone(), true},
		{"empty", State{}, State{}, true},
		{"equal with duplicate keys", withDup(st), withDup(st), false},
		{"equal, one not sorted", reversed, st, true},
		{"equal, both not sorted", reversed, reversed.clone(), true},
		{"one address changed", st, oneChanged, false},
		{"one rule fewer", st, State{Routes: st.Routes, Rules: st.Rules[1:], Addrs: st.Addrs, RPFilters: st.RPFilters}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, want := Diff(tc.owned, tc.desired), mergePlan(tc.owned, tc.desired)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Diff:\n%s\nthe merge:\n%s", got, want)
			}
			if got.Empty() != tc.wantEmpty {
				t.Errorf("Diff is empty: %v, want %v:\n%s", got.Empty(), tc.wantEmpty, got)
			}
		})
	}
}
