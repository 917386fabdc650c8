package netcfg

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Conflicts finds, in what Observe read, foreign kernel state that would
// defeat desired, and returns warnings with fix hints. It is pure. It
// reports:
//   - a foreign rule that takes precedence over one of ours (lower priority
//     number) for one of our source addresses and sends it to another table
//     (ec2-net-utils' 10000+ rules, cloud-init/netplan's rules);
//   - a main-table default route through a secondary ENI (one with a table
//     of ours) that wins over the other default routes (lower or equal
//     metric); not checked with Config.PrimaryTable, where the primary has a
//     table too;
//   - foreign routes (another protocol) inside our table band, and foreign
//     main-table routes that keep one of ours out (same destination and
//     metric).
func Conflicts(obs Observed, desired State, cfg Config) []Warning {
	links := map[int]string{} // index -> MAC
	for _, l := range obs.Links {
		links[l.Index] = l.MAC
	}
	tableLink := map[int]int{} // our table -> its ENI's link index
	for _, r := range desired.Routes {
		if r.Table != MainTable {
			tableLink[r.Table] = r.LinkIndex
		}
	}
	eniOfTable := func(table int) string { return links[tableLink[table]] }
	warns := ruleConflicts(cfg, desired, obs, eniOfTable)
	return append(warns, routeConflicts(cfg, desired, tableLink, obs.ForeignRoutes, links)...)
}

// familyTable names a table of one address family.
type familyTable struct {
	v6    bool
	table int
}

// ruleConflicts finds foreign rules that shadow ours: a rule before ours (or
// at the same priority, which the kernel may evaluate first) that sends one of
// our sources to another table. A rule "from all" only counts when its table
// has a default route: otherwise lookups fall through it (Tailscale's
// `5270: from all lookup 52` holds only tailnet routes).
func ruleConflicts(cfg Config, desired State, obs Observed, eniOfTable func(int) string) []Warning {
	withDefault := map[familyTable]bool{} // the tables holding a default route, ours included
	for _, r := range obs.ForeignRoutes {
		if r.Dst.Bits() == 0 && r.Type == unix.RTN_UNICAST {
			withDefault[familyTable{r.Dst.Addr().Is6(), r.Table}] = true
		}
	}
	for _, r := range obs.Owned.Routes {
		if r.Dst.Bits() == 0 {
			withDefault[familyTable{r.Dst.Addr().Is6(), r.Table}] = true
		}
	}
	var warns []Warning
	for _, fr := range obs.ForeignRules {
		if cfg.ourRuleBand(fr) || !fr.LookupAll {
			continue // ours (or a lookalike of ours), or narrower than its source
		}
		for _, ours := range desired.Rules {
			if fr.Priority > ours.Priority || fr.Table == ours.Table {
				continue
			}
			src := fr.Src
			if !src.IsValid() || src.Addr().Is4() != ours.Src.Addr().Is4() ||
				src.Bits() > ours.Src.Bits() || !src.Contains(ours.Src.Addr()) {
				continue
			}
			if src.Bits() == 0 && !withDefault[familyTable{src.Addr().Is6(), fr.Table}] {
				continue
			}
			warns = append(warns, Warning{
				ENI: eniOfTable(ours.Table),
				Message: fmt.Sprintf("foreign rule `%s` (protocol %d) takes precedence over ours (priority %d) for %s and looks up table %d instead of %d",
					describeRule(fr), fr.Protocol, ours.Priority, ours.Src, fr.Table, ours.Table),
				Hint: ruleHint(fr),
			})
			break // one warning per foreign rule
		}
	}
	return warns
}

func describeRule(r KernelRule) string {
	from := "all"
	if r.Src.Bits() > 0 {
		from = r.Src.String()
	}
	return fmt.Sprintf("%d: from %s lookup %d", r.Priority, from, r.Table)
}

func ruleHint(r KernelRule) string {
	family := ""
	if r.Src.Addr().Is6() {
		family = "-6 "
	}
	del := fmt.Sprintf("`ip %srule del priority %d", family, r.Priority)
	if r.Src.Bits() > 0 {
		del += " from " + r.Src.String()
	}
	del += fmt.Sprintf(" lookup %d`", r.Table)
	switch {
	case r.Table >= 10000 && r.Table < 20000:
		// Masked, not removed: the package's 80-ec2.network also brings up
		// the primary ENI with DHCP.
		return "amazon-ec2-net-utils manages this interface too (its tables are 10000+): keep the package (it brings up the primary ENI) and mask its per-interface units " +
			"(`systemctl mask policy-routes@.service refresh-policy-routes@.service refresh-policy-routes@.timer`, see docs/coexistence.md), or exclude the ENI in dualhomed, then " + del
	case r.Table >= 100 && r.Table < 1000:
		return "cloud-init/netplan routing policy for this interface: drop the routing-policy entries from the netplan configuration (and disable cloud-init network config), then " + del
	default:
		return "another tool steers this source to its own table: disable it for this interface or exclude the ENI in dualhomed, then " + del
	}
}

// routeConflicts finds default routes in main through secondary ENIs and
// foreign routes in our tables.
func routeConflicts(cfg Config, desired State, tableLink map[int]int, routes []KernelRoute, links map[int]string) []Warning {
	var warns []Warning
	want := map[RouteKey]Route{} // our routes, all with the default metric
	for _, r := range desired.Routes {
		want[r.Key()] = r
	}
	// blocked returns our route that a foreign route r keeps out: same
	// table, destination and metric (ours get none for IPv4, the kernel's
	// 1024 for IPv6) make the kernel answer our add with EEXIST, and our
	// route never exists.
	blocked := func(r KernelRoute) (Route, bool) {
		w, ok := want[r.Key()]
		metric := 0
		if r.Dst.Addr().Is6() {
			metric = 1024
		}
		return w, ok && r.Metric == metric
	}
	defaultViaSecondary := secondaryDefaultWins(cfg, tableLink, routes)
	foreign := map[int][]string{}
	blocks := map[int][]Route{}
	for _, r := range routes {
		// Routes with our protocol outside the main table and our band
		// are nobody's concern here.
		ours := r.Protocol == cfg.Protocol
		mine, isBlocked := blocked(r)
		switch {
		case !ours && defaultViaSecondary(r):
			warns = append(warns, Warning{
				ENI:     links[r.LinkIndex],
				Message: fmt.Sprintf("main table has a default route through secondary ENI (link #%d, via %v, metric %d, protocol %d): outbound traffic may leave through the wrong VPC", r.LinkIndex, r.Gateway, r.Metric, r.Protocol),
				// Per ENI: only an IMDS reader knows which ENI is the primary, so no
				// package-wide setting of a DHCP stack can (docs/coexistence.md).
				Hint: fmt.Sprintf("keep this secondary ENI's DHCP gateway out of main, in its own stack's configuration for this ENI only: "+
					"systemd-networkd `[Match] MACAddress=%s` + `[DHCPv4] UseGateway=no`; netplan `dhcp4-overrides: {use-routes: false}`; "+
					"NetworkManager `nmcli connection modify <its connection> ipv4.never-default yes`", links[r.LinkIndex]),
			})
		case r.Table == MainTable && !ours && isBlocked:
			warns = append(warns, Warning{
				ENI: links[mine.LinkIndex],
				Message: fmt.Sprintf("foreign main-table route to %s (via %v, link #%d, protocol %d) has the metric of ours, which therefore cannot be added",
					r.Dst, r.Gateway, r.LinkIndex, r.Protocol),
				Hint:   "give that route another metric, or set vpc_routes: off for this ENI",
				Blocks: []Route{mine},
			})
		case cfg.inTableBand(r.Table) && !ours:
			foreign[r.Table] = append(foreign[r.Table], fmt.Sprintf("%s (protocol %d)", r.Dst, r.Protocol))
			if isBlocked {
				blocks[r.Table] = append(blocks[r.Table], mine)
			}
		}
	}
	// Each table of our band that holds foreign routes, with the routes of
	// ours they keep out.
	for _, t := range slices.Sorted(maps.Keys(foreign)) {
		warns = append(warns, Warning{
			ENI:     links[tableLink[t]],
			Message: fmt.Sprintf("table %d, in dualhomed's band, holds foreign routes: %s", t, strings.Join(foreign[t], ", ")),
			Hint:    fmt.Sprintf("another tool uses table %d: reconfigure it to another table, or move dualhomed's band (table_base); inspect with `ip route show table %d`", t, t),
			Blocks:  blocks[t],
		})
	}
	return warns
}

// secondaryDefaultWins returns whether a route of routes is a main-table
// default route through a secondary ENI (a link with a table of ours, unless
// the primary has one too) whose metric is lower than or equal to the best
// of the other default routes of its family: only then can outbound traffic
// follow it.
func secondaryDefaultWins(cfg Config, tableLink map[int]int, routes []KernelRoute) func(KernelRoute) bool {
	secondary := map[int]bool{}
	if !cfg.PrimaryTable {
		for _, idx := range tableLink {
			secondary[idx] = true
		}
	}
	isDefault := func(r KernelRoute) bool {
		return r.Table == MainTable && r.Dst.Bits() == 0 && r.Type == unix.RTN_UNICAST
	}
	bestOther := map[bool]int{} // by IPv6
	for _, r := range routes {
		if isDefault(r) && !secondary[r.LinkIndex] {
			if m, ok := bestOther[r.Dst.Addr().Is6()]; !ok || r.Metric < m {
				bestOther[r.Dst.Addr().Is6()] = r.Metric
			}
		}
	}
	return func(r KernelRoute) bool {
		m, ok := bestOther[r.Dst.Addr().Is6()]
		return isDefault(r) && secondary[r.LinkIndex] && (!ok || r.Metric <= m)
	}
}
