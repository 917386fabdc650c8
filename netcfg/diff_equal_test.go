package netcfg

import (
	"net/netip"
	"slices"
	"testing"
)

// Diff of equal states is empty, in order or not; duplicate keys and one
// changed object make it act.
func TestDiffOfEqualStates(t *testing.T) {
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
			got := Diff(tc.owned, tc.desired)
			if got.Empty() != tc.wantEmpty {
				t.Errorf("Diff is empty: %v, want %v:\n%s", got.Empty(), tc.wantEmpty, got)
			}
		})
	}
}
