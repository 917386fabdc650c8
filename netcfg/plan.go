package netcfg

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Op is one change: add or delete a route, rule, address or altname, set
// rp_filter, or write or delete the NAT's table. Exactly one of Route, Rule,
// Addr, RPFilter, AltName, NAT is set.
type Op struct {
	Delete bool `json:"delete,omitempty"`
	// Replace swaps an object of ours in place, in one atomic RTM_NEWROUTE /
	// RTM_NEWADDR with NLM_F_REPLACE: no moment without it.
	//   - Route: the kernel identity (table, destination) is unchanged but the
	//     gateway, link or source changed (`ip route replace`).
	//   - Addr: same link and address/length, only the noprefixroute flag
	//     changed (`ip addr replace`).
	Replace  bool      `json:"replace,omitempty"`
	Route    *Route    `json:"route,omitempty"`
	Rule     *Rule     `json:"rule,omitempty"`
	Addr     *Addr     `json:"addr,omitempty"`
	RPFilter *RPFilter `json:"rp_filter,omitempty"` // Delete means "restore the recorded original value"
	AltName  *AltName  `json:"altname,omitempty"`
	// NAT: write the whole table and turn ip_forward on; Delete: restore
	// ip_forward, delete the table.
	NAT *NFTable `json:"-"`
}

// Plan is an ordered list of changes: all adds (and rp_filter sets) come before
// any delete, so that traffic always has a path (make before break).
type Plan struct {
	Ops []Op `json:"ops"`
}

// Empty reports whether the plan changes nothing.
func (p Plan) Empty() bool { return len(p.Ops) == 0 }

// Diff returns the plan that turns owned into desired. It is pure.
//
// Order, each group in canonical State order:
//  1. address adds and replaces (a route's src must exist before the route);
//  2. route adds and replaces, on-link routes before routes via a gateway (the
//     gateway must be reachable in the table when the route is added);
//  3. rule adds (after the routes, so a rule never points at an empty table);
//  4. rp_filter sets;
//  5. altname adds;
//  6. the NAT's table (after the mark rules that route its replies), or
//     its removal (before them);
//  7. rule deletes (before routes: no rule left pointing at a gutted table);
//  8. route deletes, gateway routes before on-link routes;
//  9. address deletes;
//  10. rp_filter restores;
//  11. altname deletes.
//
// An owned object with the key of a desired object but other attributes is
// replaced in place (routes, address flags) rather than deleted and re-added.
// Diff of a state with itself is empty. Duplicate keys in owned (which the
// kernel can hold) are tolerated: one is kept or replaced, the others deleted.
func Diff(owned, desired State) Plan {
	const (
		addrAdds = iota
		onLinkAdds
		viaAdds
		ruleAdds
		rpfSets
		altAdds
		natSets
		natDels
		ruleDels
		viaDels
		onLinkDels
		addrDels
		rpfRestores
		altDels
		groups
	)
	var g [groups][]Op
	owned, desired = sortedState(owned), sortedState(desired)
	route := func(r Route, first int) int { // first: the on-link group; via follows or precedes it
		switch {
		case !r.Gateway.IsValid():
			return first
		case first == onLinkAdds:
			return viaAdds
		}
		return viaDels
	}
	diffByKey(owned.Routes, desired.Routes, compareRouteKeys,
		func(r Route, replace bool) {
			i := route(r, onLinkAdds)
			g[i] = append(g[i], Op{Replace: replace, Route: ptr(r)})
		},
		func(r Route) { i := route(r, onLinkDels); g[i] = append(g[i], Op{Delete: true, Route: ptr(r)}) })
	// Rules: the key is the whole rule, so only adds and deletes.
	diffByKey(owned.Rules, desired.Rules, compareRules,
		func(r Rule, _ bool) { g[ruleAdds] = append(g[ruleAdds], Op{Rule: ptr(r)}) },
		func(r Rule) { g[ruleDels] = append(g[ruleDels], Op{Delete: true, Rule: ptr(r)}) })
	diffByKey(owned.Addrs, desired.Addrs, compareAddrKeys,
		func(a Addr, replace bool) { g[addrAdds] = append(g[addrAdds], Op{Replace: replace, Addr: ptr(a)}) },
		func(a Addr) { g[addrDels] = append(g[addrDels], Op{Delete: true, Addr: ptr(a)}) })
	// rp_filter: keyed by link name; a changed value is simply set again.
	diffByKey(owned.RPFilters, desired.RPFilters, compareRPFilterKeys,
		func(f RPFilter, _ bool) { g[rpfSets] = append(g[rpfSets], Op{RPFilter: ptr(f)}) },
		func(f RPFilter) { g[rpfRestores] = append(g[rpfRestores], Op{Delete: true, RPFilter: ptr(f)}) })
	diffByKey(owned.AltNames, desired.AltNames, compareAltNames,
		func(a AltName, _ bool) { g[altAdds] = append(g[altAdds], Op{AltName: ptr(a)}) },
		func(a AltName) { g[altDels] = append(g[altDels], Op{Delete: true, AltName: ptr(a)}) })
	switch {
	case owned.NAT.Equal(desired.NAT):
	case desired.NAT != nil:
		g[natSets] = []Op{{Replace: owned.NAT != nil, NAT: desired.NAT}}
	default:
		g[natDels] = []Op{{Delete: true, NAT: owned.NAT}}
	}
	return Plan{Ops: slices.Concat(g[:]...)}
}

// diffByKey walks owned and desired (sorted, key first) by key: a desired
// object owned lacks is added, or replaces the owned one with its key and
// other attributes (replace); the owned objects of a key that no desired
// object keeps are deleted. Desired never wants two objects with one key;
// of several, the first counts.
func diffByKey[T comparable](owned, desired []T, compareKeys func(a, b T) int, add func(d T, replace bool), del func(o T)) {
	mergeByKey(owned, desired, compareKeys, func(os, ds []T) {
		keep := -1
		if len(ds) > 0 {
			keep = slices.Index(os, ds[0])
			if keep < 0 {
				add(ds[0], len(os) > 0)
				keep = 0 // the first owned object, if any, becomes ds[0]
			}
		}
		for i, o := range os {
			if i != keep { // a duplicate the kernel held under the same key
				del(o)
			}
		}
	})
}

func compareRPFilterKeys(a, b RPFilter) int { return strings.Compare(a.LinkName, b.LinkName) }

// mergeByKey walks owned and desired, both sorted with their key first,
// and calls f once per key with the owned and the desired objects that carry
// it (one side may be empty). A merge join: no maps, no allocations.
func mergeByKey[T any](owned, desired []T, compareKeys func(a, b T) int, f func(os, ds []T)) {
	i, j := 0, 0
	for i < len(owned) || j < len(desired) {
		var k T
		switch {
		case i == len(owned):
			k = desired[j]
		case j == len(desired):
			k = owned[i]
		case compareKeys(owned[i], desired[j]) <= 0:
			k = owned[i]
		default:
			k = desired[j]
		}
		i2, j2 := i, j
		for i2 < len(owned) && compareKeys(owned[i2], k) == 0 {
			i2++
		}
		for j2 < len(desired) && compareKeys(desired[j2], k) == 0 {
			j2++
		}
		f(owned[i:i2], desired[j:j2])
		i, j = i2, j2
	}
}

// sortedState returns s in canonical order, copying only when it is not
// already sorted (Desired's and Owned's states are).
func sortedState(s State) State {
	if slices.IsSortedFunc(s.Routes, compareRoutes) && slices.IsSortedFunc(s.Rules, compareRules) &&
		slices.IsSortedFunc(s.Addrs, compareAddrs) && slices.IsSortedFunc(s.RPFilters, compareRPFilters) &&
		slices.IsSortedFunc(s.AltNames, compareAltNames) {
		return s
	}
	c := s.clone()
	c.Sort()
	return c
}

// String prints the plan with links as "#<ifindex>"; see Format.
func (p Plan) String() string { return p.Format(nil) }

// Format prints the plan one op per line in `ip` syntax, prefixed with "+"
// (add), "~" (replace) or "-" (delete), for example
// "+ route 10.1.0.0/24 dev eth1 scope link src 10.1.0.10 table 20001" or
// "- rule from 10.1.0.11/32 lookup 20001 priority 20001".
// linkNames maps interface indexes to names; unknown indexes print as "#<index>".
// An empty plan prints as "".
func (p Plan) Format(linkNames map[int]string) string {
	var b strings.Builder
	for _, op := range p.Ops {
		b.WriteString(op.Format(linkNames))
		b.WriteByte('\n')
	}
	return b.String()
}

// String prints the op with links as "#<ifindex>".
func (op Op) String() string { return op.Format(nil) }

// Format prints the op on one line; see Plan.Format.
func (op Op) Format(linkNames map[int]string) string {
	sign := "+ "
	switch {
	case op.Delete:
		sign = "- "
	case op.Replace:
		sign = "~ "
	}
	switch {
	case op.Route != nil:
		return sign + "route " + op.Route.Format(linkNames)
	case op.Rule != nil:
		return sign + "rule " + op.Rule.String()
	case op.Addr != nil:
		return sign + "addr " + op.Addr.Format(linkNames)
	case op.RPFilter != nil:
		if op.Delete {
			return sign + "sysctl net.ipv4.conf." + op.RPFilter.LinkName + ".rp_filter (restore the original value)"
		}
		return sign + "sysctl " + op.RPFilter.String()
	case op.AltName != nil:
		return sign + "altname " + op.AltName.Name + " dev " + linkName(linkNames, op.AltName.LinkIndex)
	case op.NAT != nil && op.Delete:
		return sign + "nft table inet " + NATTableName + ", sysctl net.ipv4.ip_forward (restore the original value)"
	case op.NAT != nil:
		return sign + "nft " + op.NAT.String() + ", sysctl net.ipv4.ip_forward=1"
	}
	return sign + "(empty op)"
}

// Object names what the op changes: route, rule, addr, rp_filter or altname.
func (op Op) Object() string {
	switch {
	case op.Route != nil:
		return "route"
	case op.Rule != nil:
		return "rule"
	case op.Addr != nil:
		return "addr"
	case op.RPFilter != nil:
		return "rp_filter"
	case op.AltName != nil:
		return "altname"
	case op.NAT != nil:
		return "nat"
	}
	return ""
}

// Action names the change: add, delete, replace, set (rp_filter) or
// restore (rp_filter's original value).
func (op Op) Action() string {
	switch {
	case op.Delete && op.RPFilter != nil:
		return "restore"
	case op.Delete:
		return "delete"
	case op.Replace:
		return "replace"
	case op.RPFilter != nil:
		return "set"
	}
	return "add"
}

// MarshalJSON adds "action", "kind" and the one-line "text" (links by index)
// to the op's fields, so that `dualhomed plan --json` is readable by people
// and scripts alike. Unmarshalling ignores the extra keys.
func (op Op) MarshalJSON() ([]byte, error) {
	type plain Op // no methods: avoids recursing into MarshalJSON
	return json.Marshal(struct {
		Action string `json:"action"`
		Kind   string `json:"kind"`
		Text   string `json:"text"`
		plain
	}{op.Action(), op.Object(), op.Format(nil), plain(op)})
}

// Format prints the route in `ip route` syntax without the leading verb.
func (r Route) Format(linkNames map[int]string) string {
	var b strings.Builder
	if r.Dst.IsValid() && r.Dst.Bits() == 0 {
		b.WriteString("default")
	} else {
		b.WriteString(r.Dst.String())
	}
	if r.Gateway.IsValid() {
		b.WriteString(" via " + r.Gateway.String())
	}
	b.WriteString(" dev " + linkName(linkNames, r.LinkIndex))
	if r.ScopeLink {
		b.WriteString(" scope link")
	}
	if r.Src.IsValid() {
		b.WriteString(" src " + r.Src.String())
	}
	if r.Table == MainTable {
		b.WriteString(" table main")
	} else {
		b.WriteString(" table " + strconv.Itoa(r.Table))
	}
	return b.String()
}

// String prints the route with links as "#<ifindex>".
func (r Route) String() string { return r.Format(nil) }

// String prints the rule in `ip rule` syntax without the leading verb.
func (r Rule) String() string {
	if r.Mark != 0 || r.Mask != 0 {
		return fmt.Sprintf("from %v fwmark %#x/%#x lookup %d priority %d", r.Src, r.Mark, r.Mask, r.Table, r.Priority)
	}
	return fmt.Sprintf("from %v lookup %d priority %d", r.Src, r.Table, r.Priority)
}

// Format prints the address in `ip addr` syntax without the leading verb.
func (a Addr) Format(linkNames map[int]string) string {
	s := a.Prefix.String() + " dev " + linkName(linkNames, a.LinkIndex)
	if a.NoPrefixRoute {
		s += " noprefixroute"
	}
	return s
}

// String prints the address with links as "#<ifindex>".
func (a Addr) String() string { return a.Format(nil) }

// String prints the setting in sysctl syntax.
func (f RPFilter) String() string {
	return fmt.Sprintf("net.ipv4.conf.%s.rp_filter=%d", f.LinkName, f.Value)
}

// linkNames maps the links' indexes to their names, as Format takes them.
func linkNames(links []Link) map[int]string {
	names := make(map[int]string, len(links))
	for _, l := range links {
		names[l.Index] = l.Name
	}
	return names
}

func linkName(names map[int]string, index int) string {
	if n, ok := names[index]; ok && n != "" {
		return n
	}
	return "#" + strconv.Itoa(index)
}

// ptr returns a pointer to a copy of v: ops never alias the caller's states,
// and loop variables do not escape to the heap on every iteration.
func ptr[T any](v T) *T { return &v }
