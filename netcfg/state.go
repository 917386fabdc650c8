package netcfg

import (
	"cmp"
	"net/netip"
	"slices"
)

// MainTable is the kernel's main routing table: multi-VPC CIDR routes live there.
const MainTable = 254

// RouteKey is a route's identity for dualhomed: a table holds at most one of
// our routes per destination. Two routes with the same key and other
// attributes are the same route, changed (replaced in place).
type RouteKey struct {
	Table int
	Dst   netip.Prefix
}

// Key returns the route's identity.
func (r Route) Key() RouteKey { return RouteKey{Table: r.Table, Dst: r.Dst} }

// RuleKey is a rule's identity: priority, source and table.
type RuleKey struct {
	Priority int
	Src      netip.Prefix
	Table    int
}

// Key returns the rule's identity.
func (r Rule) Key() RuleKey { return RuleKey(r) }

// AddrKey is an address's identity: link and address with its prefix length.
// The length is part of it because IPv4 allows the same address twice on a
// link with two lengths (10.1.0.10/24 and 10.1.0.10/32 are two objects).
type AddrKey struct {
	LinkIndex int
	Prefix    netip.Prefix
}

// Key returns the address's identity.
func (a Addr) Key() AddrKey { return AddrKey{LinkIndex: a.LinkIndex, Prefix: a.Prefix} }

// Sort puts every slice of s in canonical order, so that equal states compare
// equal and print identically. Routes sort by table then destination, rules
// by priority then source then table, addresses by link then address,
// rp_filter entries by link name.
func (s *State) Sort() {
	sortRuns(s.Routes, compareRoutes)
	sortRuns(s.Rules, compareRules)
	sortRuns(s.Addrs, compareAddrs)
	sortRuns(s.RPFilters, compareRPFilters)
}

// maxSortRuns is how many sorted runs sortRuns merges; more, and it sorts.
const maxSortRuns = 32

// sortRuns sorts s as slices.SortFunc does (cmp orders every field of T, so
// the result is the same), in linear time when s is made of a few ascending
// or descending runs.
//
// Why: the owned state comes from kernel dumps in nearly sorted order, and
// sorting it from scratch was a tenth of a no-op reconcile at full scale.
// Rules come in priority order, one run per family; addresses come by link,
// IPv4 in the order they were added (Apply adds them sorted) and IPv6 newest
// first: after reversing those descending runs, one run per family.
func sortRuns[T any](s []T, cmp func(a, b T) int) {
	// bounds: the start of each run, then len(s).
	bounds := make([]int, 0, 8)
	for i := 0; i < len(s); {
		j := i + 1
		if j < len(s) && cmp(s[i], s[j]) > 0 {
			for j < len(s) && cmp(s[j-1], s[j]) > 0 {
				j++
			}
			slices.Reverse(s[i:j]) // strictly descending: no equal elements swap
		} else {
			for j < len(s) && cmp(s[j-1], s[j]) <= 0 {
				j++
			}
		}
		// A reversed run may continue the run before it.
		if i == 0 || cmp(s[i-1], s[i]) > 0 {
			if len(bounds) == maxSortRuns {
				slices.SortFunc(s, cmp)
				return
			}
			bounds = append(bounds, i)
		}
		i = j
	}
	bounds = append(bounds, len(s))
	var buf []T
	for len(bounds) > 2 {
		merged := make([]int, 0, len(bounds)/2+2)
		i := 0
		for ; i+2 < len(bounds); i += 2 {
			buf = mergeRuns(s[bounds[i]:bounds[i+2]], bounds[i+1]-bounds[i], buf, cmp)
			merged = append(merged, bounds[i])
		}
		merged = append(merged, bounds[i:]...) // the last run if odd, and len(s)
		bounds = merged
	}
}

// mergeRuns merges the sorted s[:mid] and s[mid:] in place, copying the
// first run into buf (returned, for reuse).
func mergeRuns[T any](s []T, mid int, buf []T, cmp func(a, b T) int) []T {
	if cmp(s[mid-1], s[mid]) <= 0 {
		return buf // already in order
	}
	buf = append(buf[:0], s[:mid]...)
	i, j, k := 0, mid, 0
	// k < j while buf has elements left: nothing unread is overwritten.
	for i < len(buf) && j < len(s) {
		if cmp(s[j], buf[i]) < 0 {
			s[k] = s[j]
			j++
		} else {
			s[k] = buf[i]
			i++
		}
		k++
	}
	copy(s[k:], buf[i:]) // what is left of s[j:] is already in place
	return buf
}

// Equal reports whether s and t hold the same objects, in any order.
func (s State) Equal(t State) bool {
	a, b := s.clone(), t.clone()
	a.Sort()
	b.Sort()
	return slices.Equal(a.Routes, b.Routes) && slices.Equal(a.Rules, b.Rules) &&
		slices.Equal(a.Addrs, b.Addrs) && slices.Equal(a.RPFilters, b.RPFilters)
}

// Empty reports whether s holds no object at all.
func (s State) Empty() bool {
	return len(s.Routes) == 0 && len(s.Rules) == 0 && len(s.Addrs) == 0 && len(s.RPFilters) == 0
}

func (s State) clone() State {
	return State{
		Routes:    slices.Clone(s.Routes),
		Rules:     slices.Clone(s.Rules),
		Addrs:     slices.Clone(s.Addrs),
		RPFilters: slices.Clone(s.RPFilters),
	}
}

func compareRoutes(a, b Route) int {
	if c := compareRouteKeys(a, b); c != 0 {
		return c
	}
	return cmp.Or(
		cmp.Compare(a.LinkIndex, b.LinkIndex),
		a.Gateway.Compare(b.Gateway),
		a.Src.Compare(b.Src),
		compareBool(a.ScopeLink, b.ScopeLink),
	)
}

// compareRouteKeys orders routes by identity only; compareRoutes refines it.
func compareRouteKeys(a, b Route) int {
	if c := cmp.Compare(a.Table, b.Table); c != 0 {
		return c
	}
	return comparePrefix(a.Dst, b.Dst)
}

// compareAddrKeys orders addresses by identity only; compareAddrs refines it.
func compareAddrKeys(a, b Addr) int {
	if c := cmp.Compare(a.LinkIndex, b.LinkIndex); c != 0 {
		return c
	}
	return comparePrefix(a.Prefix, b.Prefix)
}

func compareRPFilters(a, b RPFilter) int {
	if c := cmp.Compare(a.LinkName, b.LinkName); c != 0 {
		return c
	}
	return cmp.Compare(a.Value, b.Value)
}

func compareRules(a, b Rule) int {
	if c := cmp.Compare(a.Priority, b.Priority); c != 0 {
		return c
	}
	if c := comparePrefix(a.Src, b.Src); c != 0 {
		return c
	}
	return cmp.Compare(a.Table, b.Table)
}

func compareAddrs(a, b Addr) int {
	if c := compareAddrKeys(a, b); c != 0 {
		return c
	}
	return compareBool(a.NoPrefixRoute, b.NoPrefixRoute)
}

// comparePrefix orders IPv4 before IPv6, then by address, then shorter
// prefixes first.
func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

func compareBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case !a:
		return -1
	default:
		return 1
	}
}
