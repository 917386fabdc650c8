package netcfg

// What a caller does with a plan between Diff and Apply: keep only its adds,
// leave out the adds another program's object holds out, and say which ENI
// each op serves. All pure.

// WithoutFreshIMDS returns what of p may be applied while the snapshot it
// was planned from may be stale (an IMDS error is never an answer): its
// additions, and the deletions of rules that point at a table obs shows
// empty in the rule's family (no route of ours or anybody's), in p's order.
// A detached ENI is kernel evidence, not an IMDS answer: the kernel dropped
// its link's routes with the link, so its rules look up nothing and
// deleting them changes no routing decision (a lookup in an empty table
// falls through to the next rule either way). Should the link come back,
// the last snapshot wants its rules again and they are added at once.
func (p Plan) WithoutFreshIMDS(obs Observed) Plan {
	full := map[familyTable]bool{}
	for _, r := range obs.Owned.Routes {
		full[familyTable{r.Dst.Addr().Is6(), r.Table}] = true
	}
	for _, r := range obs.ForeignRoutes {
		full[familyTable{r.Dst.Addr().Is6(), r.Table}] = true
	}
	var out Plan
	for _, op := range p.Ops {
		if !op.Delete || (op.Rule != nil && !full[familyTable{op.Rule.Src.Addr().Is6(), op.Rule.Table}]) {
			out.Ops = append(out.Ops, op)
		}
	}
	return out
}

// ObjectKey identifies the kernel object an op adds or deletes: two adds
// with one key collide in the kernel (EEXIST). It is a RouteKey, RuleKey or
// AddrKey, and nil for rp_filter and altnames (a name another program
// holds is left out of Desired, not blocked).
func (op Op) ObjectKey() any {
	switch {
	case op.Route != nil:
		return op.Route.Key()
	case op.Rule != nil:
		return op.Rule.Key()
	case op.Addr != nil:
		return op.Addr.Key()
	}
	return nil
}

// Split returns p without the adds whose ObjectKey is in held, and those
// adds apart, each list in p's order.
func (p Plan) Split(held map[any]bool) (kept Plan, dropped []Op) {
	for _, op := range p.Ops {
		if k := op.ObjectKey(); !op.Delete && k != nil && held[k] {
			dropped = append(dropped, op)
		} else {
			kept.Ops = append(kept.Ops, op)
		}
	}
	return kept, dropped
}

// BlockedBy returns the ObjectKeys of p's route adds that a conflict warning
// says a foreign route keeps out (Warning.Blocks: same table, destination
// and metric, so the kernel would answer EEXIST).
func BlockedBy(p Plan, conflicts []Warning) map[any]bool {
	held := map[any]bool{}
	for _, w := range conflicts {
		for _, r := range w.Blocks {
			held[r.Key()] = true
		}
	}
	out := map[any]bool{}
	for _, op := range p.Ops {
		if !op.Delete && op.Route != nil && held[op.Route.Key()] {
			out[op.Route.Key()] = true
		}
	}
	return out
}

// Change is one planned or applied op, attributed to the ENI it serves.
type Change struct {
	ENI   string `json:"eni,omitempty"`   // interface id (or MAC); "" for objects of a detached ENI
	Link  string `json:"link,omitempty"`  // link name, when the link exists
	Table int    `json:"table,omitempty"` // the route's or rule's table, else the ENI's; 0 for none
	Text  string `json:"text"`            // the op in `ip` syntax, links by name
	Op    Op     `json:"op"`
}

// String describes the change the way `ip` would.
func (c Change) String() string { return c.Text }

// Name is how warnings and changes name the ENI: its interface id, or its
// MAC while IMDS gives none.
func (e ENIStatus) Name() string {
	if e.InterfaceID != "" {
		return e.InterfaceID
	}
	return e.MAC
}

// Attribute describes each op of ops with the ENI it serves (by link, by
// table for rules and for routes whose link is gone, by link name for
// rp_filter) and the link's name.
func Attribute(ops []Op, enis []ENIStatus, links []Link) []Change {
	byLink, byTable, byName := map[int]ENIStatus{}, map[int]ENIStatus{}, map[string]ENIStatus{}
	for _, e := range enis {
		if e.LinkIndex != 0 {
			byLink[e.LinkIndex] = e
		}
		if e.Table != 0 {
			byTable[e.Table] = e
		}
		if e.Link != "" {
			byName[e.Link] = e
		}
	}
	names := linkNames(links)
	out := make([]Change, 0, len(ops))
	for _, op := range ops {
		var e ENIStatus
		var found bool
		c := Change{Op: op, Text: op.Format(names)}
		switch {
		case op.Route != nil:
			if e, found = byLink[op.Route.LinkIndex]; !found {
				e, found = byTable[op.Route.Table]
			}
			c.Link = names[op.Route.LinkIndex]
		case op.Rule != nil:
			e, found = byTable[op.Rule.Table]
		case op.Addr != nil:
			e, found = byLink[op.Addr.LinkIndex]
			c.Link = names[op.Addr.LinkIndex]
		case op.RPFilter != nil:
			e, found = byName[op.RPFilter.LinkName]
			c.Link = op.RPFilter.LinkName
		case op.AltName != nil:
			e, found = byLink[op.AltName.LinkIndex]
			c.Link = names[op.AltName.LinkIndex]
		}
		if found {
			c.ENI, c.Table = e.Name(), e.Table
			if e.Link != "" {
				c.Link = e.Link
			}
		}
		switch {
		case op.Route != nil:
			c.Table = op.Route.Table
		case op.Rule != nil:
			c.Table = op.Rule.Table
		}
		out = append(out, c)
	}
	return out
}
