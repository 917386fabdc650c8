package netcfg

// Op is one change: add or delete a route, rule or address, or set rp_filter.
// Exactly one of Route, Rule, Addr, RPFilter is set.
type Op struct {
	Delete bool
	// Replace (routes only) swaps a route of ours whose kernel identity (table,
	// destination) is unchanged but whose gateway, link or source changed, in one
	// atomic RTM_NEWROUTE with NLM_F_REPLACE: no moment without a route.
	Replace  bool
	Route    *Route
	Rule     *Rule
	Addr     *Addr
	RPFilter *RPFilter // Delete means "restore the recorded original value"
}

// Plan is an ordered list of changes: all adds (and rp_filter sets) come before
// any delete, so that traffic always has a path (make before break).
type Plan struct {
	Ops []Op
}

// Empty reports whether the plan changes nothing.
func (p Plan) Empty() bool { return len(p.Ops) == 0 }

// Diff returns the plan that turns owned into desired. It is pure.
func Diff(owned, desired State) Plan {
	panic("TODO(netcfg-desired)")
}
