package netcfg

import (
	"sort"
)

// sortState orders st deterministically so that Owned compares equal to a
// sorted desired state.
func sortState(st *State) {
	sort.Slice(st.Routes, func(i, j int) bool {
		a, b := st.Routes[i], st.Routes[j]
		if a.Table != b.Table {
			return a.Table < b.Table
		}
		if c := a.Dst.Addr().Compare(b.Dst.Addr()); c != 0 {
			return c < 0
		}
		if a.Dst.Bits() != b.Dst.Bits() {
			return a.Dst.Bits() < b.Dst.Bits()
		}
		return a.LinkIndex < b.LinkIndex
	})
	sort.Slice(st.Rules, func(i, j int) bool {
		a, b := st.Rules[i], st.Rules[j]
		if a.Priority != b.Priority {
			return a.Priority < b.Priority
		}
		if c := a.Src.Addr().Compare(b.Src.Addr()); c != 0 {
			return c < 0
		}
		if a.Src.Bits() != b.Src.Bits() {
			return a.Src.Bits() < b.Src.Bits()
		}
		return a.Table < b.Table
	})
	sort.Slice(st.Addrs, func(i, j int) bool {
		a, b := st.Addrs[i], st.Addrs[j]
		if a.LinkIndex != b.LinkIndex {
			return a.LinkIndex < b.LinkIndex
		}
		if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
			return c < 0
		}
		return a.Prefix.Bits() < b.Prefix.Bits()
	})
	sort.Slice(st.RPFilters, func(i, j int) bool { return st.RPFilters[i].LinkName < st.RPFilters[j].LinkName })
}
