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

// RuleKey is a rule's identity: all of it.
type RuleKey struct {
	Priority int
	Src      netip.Prefix
	Table    int
	Mark     uint32
	Mask     uint32
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
// by priority, source, table, mark and mask, addresses by link then address,
// rp_filter entries by link name, altnames by link then name.
func (s *State) Sort() {
	slices.SortFunc(s.Routes, compareRoutes)
	slices.SortFunc(s.Rules, compareRules)
	slices.SortFunc(s.Addrs, compareAddrs)
	slices.SortFunc(s.RPFilters, compareRPFilters)
	slices.SortFunc(s.AltNames, compareAltNames)
}

// Equal reports whether s and t hold the same objects, in any order.
func (s State) Equal(t State) bool {
	a, b := s.clone(), t.clone()
	a.Sort()
	b.Sort()
	return slices.Equal(a.Routes, b.Routes) && slices.Equal(a.Rules, b.Rules) &&
		slices.Equal(a.Addrs, b.Addrs) && slices.Equal(a.RPFilters, b.RPFilters) && slices.Equal(a.AltNames, b.AltNames) && s.NAT.Equal(t.NAT)
}

// Empty reports whether s holds no object at all.
func (s State) Empty() bool {
	return len(s.Routes) == 0 && len(s.Rules) == 0 && len(s.Addrs) == 0 && len(s.RPFilters) == 0 && len(s.AltNames) == 0 && s.NAT == nil
}

func (s State) clone() State {
	return State{
		Routes:    slices.Clone(s.Routes),
		Rules:     slices.Clone(s.Rules),
		Addrs:     slices.Clone(s.Addrs),
		RPFilters: slices.Clone(s.RPFilters),
		AltNames:  slices.Clone(s.AltNames),
		NAT:       s.NAT, // never changed in place
	}
}

// The comparisons below return as soon as the fields that decide most
// orderings (tables, priorities, prefixes) differ, and use cmp.Or only for
// the rest: cmp.Or over every field computes each comparison first, which
// makes sorting our owned state 30 % slower (BenchmarkObserveParts/sort-owned
// at full scale: 430 instead of 330 µs of a 2 ms no-op reconcile).
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

func compareAltNames(a, b AltName) int {
	return cmp.Or(cmp.Compare(a.LinkIndex, b.LinkIndex), cmp.Compare(a.Name, b.Name))
}

func compareRules(a, b Rule) int {
	if c := cmp.Compare(a.Priority, b.Priority); c != 0 {
		return c
	}
	if c := comparePrefix(a.Src, b.Src); c != 0 {
		return c
	}
	return cmp.Or(cmp.Compare(a.Table, b.Table), cmp.Compare(a.Mark, b.Mark), cmp.Compare(a.Mask, b.Mask))
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
