package netcfg

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// Op is one change: add or delete a route, rule or address, or set rp_filter.
// Exactly one of Route, Rule, Addr, RPFilter is set.
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
//  5. rule deletes (before routes: no rule left pointing at a gutted table);
//  6. route deletes, gateway routes before on-link routes;
//  7. address deletes;
//  8. rp_filter restores.
//
// An owned object with the key of a desired object but other attributes is
// replaced in place (routes, address flags) rather than deleted and re-added.
// Diff of a state with itself is empty. Duplicate keys in owned (which the
// kernel can hold) are tolerated: one is kept or replaced, the others deleted.
func Diff(owned, desired State) Plan {
	var addrAdds, routeAddsOnLink, routeAddsVia, ruleAdds, rpfSets []Op
	var ruleDels, routeDelsVia, routeDelsOnLink, addrDels, rpfRestores []Op
	owned, desired = owned.clone(), desired.clone()
	owned.Sort()
	desired.Sort()

	// Routes.
	{
		want := make(map[RouteKey]Route, len(desired.Routes))
		for _, r := range desired.Routes {
			if _, dup := want[r.Key()]; !dup {
				want[r.Key()] = r
			}
		}
		done := make(map[RouteKey]bool, len(desired.Routes))
		kept := make([]bool, len(owned.Routes))
		for i, o := range owned.Routes { // exact matches first
			if d, ok := want[o.Key()]; ok && d == o && !done[o.Key()] {
				done[o.Key()], kept[i] = true, true
			}
		}
		for i, o := range owned.Routes {
			if kept[i] {
				continue
			}
			if d, ok := want[o.Key()]; ok && !done[o.Key()] {
				done[o.Key()] = true
				op := Op{Replace: true, Route: ptr(d)}
				if d.Gateway.IsValid() {
					routeAddsVia = append(routeAddsVia, op)
				} else {
					routeAddsOnLink = append(routeAddsOnLink, op)
				}
				continue
			}
			op := Op{Delete: true, Route: ptr(o)}
			if o.Gateway.IsValid() {
				routeDelsVia = append(routeDelsVia, op)
			} else {
				routeDelsOnLink = append(routeDelsOnLink, op)
			}
		}
		for _, d := range desired.Routes {
			if done[d.Key()] || want[d.Key()] != d {
				continue
			}
			done[d.Key()] = true
			op := Op{Route: ptr(d)}
			if d.Gateway.IsValid() {
				routeAddsVia = append(routeAddsVia, op)
			} else {
				routeAddsOnLink = append(routeAddsOnLink, op)
			}
		}
	}

	// Rules: the key is the whole rule, so only adds and deletes.
	{
		want, have := make(map[RuleKey]bool, len(desired.Rules)), make(map[RuleKey]bool, len(desired.Rules))
		for _, r := range desired.Rules {
			want[r.Key()] = true
		}
		for _, o := range owned.Rules {
			if want[o.Key()] && !have[o.Key()] {
				have[o.Key()] = true
				continue
			}
			ruleDels = append(ruleDels, Op{Delete: true, Rule: ptr(o)})
		}
		for _, d := range desired.Rules {
			if !have[d.Key()] {
				have[d.Key()] = true
				ruleAdds = append(ruleAdds, Op{Rule: ptr(d)})
			}
		}
	}

	// Addresses.
	{
		want := make(map[AddrKey]Addr, len(desired.Addrs))
		for _, a := range desired.Addrs {
			if _, dup := want[a.Key()]; !dup {
				want[a.Key()] = a
			}
		}
		done := make(map[AddrKey]bool, len(desired.Addrs))
		kept := make([]bool, len(owned.Addrs))
		for i, o := range owned.Addrs {
			if d, ok := want[o.Key()]; ok && d == o && !done[o.Key()] {
				done[o.Key()], kept[i] = true, true
			}
		}
		for i, o := range owned.Addrs {
			if kept[i] {
				continue
			}
			if d, ok := want[o.Key()]; ok && !done[o.Key()] {
				done[o.Key()] = true
				addrAdds = append(addrAdds, Op{Replace: true, Addr: ptr(d)})
				continue
			}
			addrDels = append(addrDels, Op{Delete: true, Addr: ptr(o)})
		}
		for _, d := range desired.Addrs {
			if !done[d.Key()] && want[d.Key()] == d {
				done[d.Key()] = true
				addrAdds = append(addrAdds, Op{Addr: ptr(d)})
			}
		}
	}

	// rp_filter: keyed by link name; a changed value is simply set again.
	{
		want := map[string]RPFilter{}
		for _, f := range desired.RPFilters {
			if _, dup := want[f.LinkName]; !dup {
				want[f.LinkName] = f
			}
		}
		done := map[string]bool{}
		for _, o := range owned.RPFilters {
			if d, ok := want[o.LinkName]; ok && !done[o.LinkName] {
				done[o.LinkName] = true
				if d != o {
					rpfSets = append(rpfSets, Op{RPFilter: ptr(d)})
				}
				continue
			}
			if !done[o.LinkName] {
				done[o.LinkName] = true
				rpfRestores = append(rpfRestores, Op{Delete: true, RPFilter: ptr(o)})
			}
		}
		for _, d := range desired.RPFilters {
			if !done[d.LinkName] {
				done[d.LinkName] = true
				rpfSets = append(rpfSets, Op{RPFilter: ptr(d)})
			}
		}
	}

	var p Plan
	for _, g := range [][]Op{addrAdds, routeAddsOnLink, routeAddsVia, ruleAdds, rpfSets,
		ruleDels, routeDelsVia, routeDelsOnLink, addrDels, rpfRestores} {
		p.Ops = append(p.Ops, g...)
	}
	return p
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
	}
	return sign + "(empty op)"
}

// kind names what the op changes, for JSON.
func (op Op) kind() string {
	switch {
	case op.Route != nil:
		return "route"
	case op.Rule != nil:
		return "rule"
	case op.Addr != nil:
		return "addr"
	case op.RPFilter != nil:
		return "rp_filter"
	}
	return ""
}

func (op Op) action() string {
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
	}{op.action(), op.kind(), op.Format(nil), plain(op)})
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

func linkName(names map[int]string, index int) string {
	if n, ok := names[index]; ok && n != "" {
		return n
	}
	return "#" + strconv.Itoa(index)
}

// ptr returns a pointer to a copy of v: ops never alias the caller's states,
// and loop variables do not escape to the heap on every iteration.
func ptr[T any](v T) *T { return &v }
