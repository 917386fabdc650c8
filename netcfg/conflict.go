package netcfg

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ConflictPaths are where Conflicts looks for systemd-networkd.
type ConflictPaths struct {
	// NetifDir exists while systemd-networkd runs (/run/systemd/netif).
	NetifDir string
	// ProcDir is scanned for a systemd-networkd process (/proc).
	ProcDir string
	// NetworkdConfs are the main configuration files, lowest precedence first.
	NetworkdConfs []string
	// NetworkdDropinDirs hold *.conf drop-ins, highest precedence first: a
	// drop-in in an earlier directory hides one of the same name in a later one.
	NetworkdDropinDirs []string
}

// DefaultConflictPaths are systemd's real locations.
func DefaultConflictPaths() ConflictPaths {
	return ConflictPaths{
		NetifDir:      "/run/systemd/netif",
		ProcDir:       "/proc",
		NetworkdConfs: []string{"/usr/lib/systemd/networkd.conf", "/etc/systemd/networkd.conf"},
		NetworkdDropinDirs: []string{
			"/etc/systemd/networkd.conf.d",
			"/run/systemd/networkd.conf.d",
			"/usr/local/lib/systemd/networkd.conf.d",
			"/usr/lib/systemd/networkd.conf.d",
		},
	}
}

// Conflicts inspects foreign kernel state that would defeat desired and
// returns warnings with fix hints. It never changes anything. It reports:
//   - a foreign rule that takes precedence over one of ours (lower priority
//     number) for one of our source addresses and sends it to another table
//     (ec2-net-utils' 10000+ rules, cloud-init/netplan's rules);
//   - a main-table default route through a secondary ENI (one with a table
//     of ours) that wins over the other default routes (lower or equal
//     metric); not checked with Config.PrimaryTable, where the primary has a
//     table too;
//   - foreign routes (another protocol) inside our table band, and foreign
//     main-table routes that keep one of ours out (same destination and
//     metric);
//   - systemd-networkd running without ManageForeignRoutingPolicyRules=no or
//     ManageForeignRoutes=no: it would delete our rules and routes.
//
// A failure to read kernel state is itself reported as a warning.
func (k *Kernel) Conflicts(desired State) []Warning {
	var warns []Warning
	// Observe, which precedes Conflicts in a reconcile, read the links,
	// routes and rules: reuse them while the kernel reports no change since.
	cachedLinks, cachedRoutes, cachedRules, cached := k.cache.get()
	links := map[int]string{} // index -> MAC
	if !cached {
		cachedLinks, _, _ = k.dump.links()
	}
	for _, l := range cachedLinks {
		links[l.Index] = l.MAC
	}
	tableLink := map[int]int{} // our table -> its ENI's link index
	for _, r := range desired.Routes {
		if r.Table != MainTable {
			tableLink[r.Table] = r.LinkIndex
		}
	}
	eniOfTable := func(table int) string { return links[tableLink[table]] }

	// The local table (a route per address) and our own rules (which
	// ruleConflicts skips) are thousands of objects at full scale: the
	// dumps drop them before building anything.
	rawRoutes, routesErr := cachedRoutes, error(nil)
	rules, err := cachedRules, error(nil)
	if !cached {
		rawRoutes, routesErr = k.dump.routesExceptLocal(unix.AF_INET, unix.AF_INET6)
		rules = nil
		err = k.dump.rules(k.ownsRule, nil, func(r netlink.Rule) { rules = append(rules, r) }, func() { rules = rules[:0] })
	}
	routes := netlinkRoutes(rawRoutes)
	switch {
	case err != nil:
		warns = append(warns, Warning{Message: fmt.Sprintf("cannot check policy rules for conflicts: %v", err)})
	case routesErr == nil:
		warns = append(warns, k.ruleConflicts(desired, rules, tablesWithDefault(routes), eniOfTable)...)
	}
	if routesErr != nil {
		warns = append(warns, Warning{Message: fmt.Sprintf("cannot check routes for conflicts: %v", routesErr)})
	} else {
		warns = append(warns, k.routeConflicts(desired, tableLink, routes, links)...)
	}

	warns = append(warns, networkdConflicts(k.ConflictPaths)...)
	return warns
}

// defaultKey names a table of one address family.
type defaultKey struct {
	family int
	table  int
}

// tablesWithDefault lists the tables holding a default route, per family.
func tablesWithDefault(routes []netlink.Route) map[defaultKey]bool {
	out := map[defaultKey]bool{}
	for _, r := range routes {
		if prefixOf(r.Dst, r.Family).Bits() == 0 && r.Type == unix.RTN_UNICAST {
			out[defaultKey{r.Family, r.Table}] = true
		}
	}
	return out
}

// ruleConflicts finds foreign rules that shadow ours: a rule before ours (or
// at the same priority, which the kernel may evaluate first) that sends one of
// our sources to another table. A rule "from all" only counts when its table
// has a default route: otherwise lookups fall through it (Tailscale's
// `5270: from all lookup 52` holds only tailnet routes).
func (k *Kernel) ruleConflicts(desired State, rules []netlink.Rule, withDefault map[defaultKey]bool, eniOfTable func(int) string) []Warning {
	var warns []Warning
	for _, fr := range rules {
		if fr.Protocol == k.cfg.Protocol && k.inPriorityBand(fr.Priority) {
			continue // ours
		}
		if !plainLookup(fr) {
			continue
		}
		for _, ours := range desired.Rules {
			if fr.Priority > ours.Priority || fr.Table == ours.Table {
				continue
			}
			src := prefixOf(fr.Src, fr.Family)
			if !src.IsValid() || src.Addr().Is4() != ours.Src.Addr().Is4() ||
				src.Bits() > ours.Src.Bits() || !src.Contains(ours.Src.Addr()) {
				continue
			}
			if src.Bits() == 0 && !withDefault[defaultKey{fr.Family, fr.Table}] {
				continue
			}
			warns = append(warns, Warning{
				ENI: eniOfTable(ours.Table),
				Message: fmt.Sprintf("foreign rule `%s` (protocol %d) takes precedence over ours (priority %d) for %s and looks up table %d instead of %d",
					describeNetlinkRule(fr), fr.Protocol, ours.Priority, ours.Src, fr.Table, ours.Table),
				Hint: ruleHint(fr),
			})
			break // one warning per foreign rule
		}
	}
	return warns
}

// plainLookup reports whether r sends all traffic from its source to another
// table: no other selector narrows it, and it is not the kernel's local-table
// rule or a main lookup that suppresses default routes (wg-quick's pattern).
func plainLookup(r netlink.Rule) bool {
	if r.Type != unix.RTN_UNICAST && r.Type != 0 { // FR_ACT_TO_TBL shares RTN_UNICAST's value
		return false
	}
	if r.Table == unix.RT_TABLE_LOCAL || r.Table == 0 || r.Goto >= 0 {
		return false
	}
	if r.Table == unix.RT_TABLE_MAIN && r.SuppressPrefixlen >= 0 {
		return false
	}
	narrowed := (r.Dst != nil) || r.Mark != 0 || r.Mask != nil || r.IifName != "" || r.OifName != "" ||
		r.Tos != 0 || r.Dport != nil || r.Sport != nil || r.IPProto != 0 || r.UIDRange != nil || r.Invert || r.TunID != 0
	return !narrowed
}

func describeNetlinkRule(r netlink.Rule) string {
	from := "all"
	if r.Src != nil {
		from = prefixOf(r.Src, r.Family).String()
	}
	return fmt.Sprintf("%d: from %s lookup %d", r.Priority, from, r.Table)
}

func ruleHint(r netlink.Rule) string {
	family := ""
	if r.Family == unix.AF_INET6 {
		family = "-6 "
	}
	del := fmt.Sprintf("`ip %srule del priority %d", family, r.Priority)
	if r.Src != nil {
		del += " from " + prefixOf(r.Src, r.Family).String()
	}
	del += fmt.Sprintf(" lookup %d`", r.Table)
	switch {
	case r.Table >= 10000 && r.Table < 20000:
		return "amazon-ec2-net-utils manages this interface too (its tables are 10000+): remove it (`dnf remove amazon-ec2-net-utils`) or exclude the ENI in dualhomed, then " + del
	case r.Table >= 100 && r.Table < 1000:
		return "cloud-init/netplan routing policy for this interface: drop the routing-policy entries from the netplan configuration (and disable cloud-init network config), then " + del
	default:
		return "another tool steers this source to its own table: disable it for this interface or exclude the ENI in dualhomed, then " + del
	}
}

// routeConflicts finds default routes in main through secondary ENIs and
// foreign routes in our tables.
func (k *Kernel) routeConflicts(desired State, tableLink map[int]int, routes []netlink.Route, links map[int]string) []Warning {
	var warns []Warning
	type tableDst struct {
		table int
		dst   netip.Prefix
	}
	want := map[tableDst]Route{} // our routes (all with the default metric) by table and destination
	for _, r := range desired.Routes {
		want[tableDst{r.Table, r.Dst}] = r
	}
	// blocked returns our route that a foreign route r keeps out: same
	// table, destination and metric make the kernel answer our add with
	// EEXIST, and our route never exists.
	blocked := func(r netlink.Route) (Route, bool) {
		w, ok := want[tableDst{r.Table, prefixOf(r.Dst, r.Family)}]
		return w, ok && r.Priority == defaultMetric(r.Family)
	}
	secondary := map[int]bool{}
	if !k.cfg.PrimaryTable {
		for _, idx := range tableLink {
			secondary[idx] = true
		}
	}
	// The best (lowest) metric of the main table's other default routes, per
	// family: a secondary's default route only wins when it is lower or equal.
	isDefault := func(r netlink.Route) bool {
		return r.Table == MainTable && prefixOf(r.Dst, r.Family).Bits() == 0 && r.Type == unix.RTN_UNICAST
	}
	bestOther := map[int]int{}
	for _, r := range routes {
		if isDefault(r) && !secondary[r.LinkIndex] {
			if m, ok := bestOther[r.Family]; !ok || r.Priority < m {
				bestOther[r.Family] = r.Priority
			}
		}
	}
	winsOver := func(r netlink.Route) bool {
		m, ok := bestOther[r.Family]
		return !ok || r.Priority <= m
	}
	foreign := map[int][]string{}
	blocks := map[int][]Route{}
	for _, r := range routes {
		ours := int(r.Protocol) == int(k.cfg.Protocol)
		mine, isBlocked := blocked(r)
		switch {
		case isDefault(r) && !ours && secondary[r.LinkIndex] && winsOver(r):
			warns = append(warns, Warning{
				ENI:     links[r.LinkIndex],
				Message: fmt.Sprintf("main table has a default route through secondary ENI (link #%d, via %v, metric %d, protocol %d): outbound traffic may leave through the wrong VPC", r.LinkIndex, r.Gw, r.Priority, r.Protocol),
				Hint:    "stop the DHCP client or network manager from installing a default route on this interface (e.g. systemd-networkd: [DHCPv4] UseRoutes=no / UseGateway=no; netplan: dhcp4-overrides: use-routes: false)",
			})
		case r.Table == MainTable && !ours && isBlocked:
			warns = append(warns, Warning{
				ENI: links[mine.LinkIndex],
				Message: fmt.Sprintf("foreign main-table route to %s (via %v, link #%d, protocol %d) has the metric of ours, which therefore cannot be added",
					prefixOf(r.Dst, r.Family), r.Gw, r.LinkIndex, r.Protocol),
				Hint:   "give that route another metric, or set vpc_routes: off for this ENI",
				Blocks: []Route{mine},
			})
		case k.inTableBand(r.Table) && !ours:
			foreign[r.Table] = append(foreign[r.Table], fmt.Sprintf("%s (protocol %d)", prefixOf(r.Dst, r.Family), r.Protocol))
			if isBlocked {
				blocks[r.Table] = append(blocks[r.Table], mine)
			}
		}
	}
	tables := make([]int, 0, len(foreign))
	for t := range foreign {
		tables = append(tables, t)
	}
	sort.Ints(tables)
	for _, t := range tables {
		warns = append(warns, Warning{
			ENI:     links[tableLink[t]],
			Message: fmt.Sprintf("table %d, in dualhomed's band, holds foreign routes: %s", t, strings.Join(foreign[t], ", ")),
			Hint:    fmt.Sprintf("another tool uses table %d: reconfigure it to another table, or move dualhomed's band (table_base); inspect with `ip route show table %d`", t, t),
			Blocks:  blocks[t],
		})
	}
	return warns
}

// defaultMetric is the metric our routes get: none for IPv4, the kernel's
// 1024 for IPv6.
func defaultMetric(family int) int {
	if family == unix.AF_INET6 {
		return 1024
	}
	return 0
}

// networkdConflicts warns when systemd-networkd runs with settings that make
// it delete foreign rules or routes.
func networkdConflicts(p ConflictPaths) []Warning {
	if !networkdRunning(p) {
		return nil
	}
	settings := networkdSettings(p)
	var warns []Warning
	for _, c := range []struct{ key, what string }{
		{"ManageForeignRoutingPolicyRules", "routing policy rules"},
		{"ManageForeignRoutes", "routes"},
	} {
		if isFalse(settings[c.key]) {
			continue
		}
		warns = append(warns, Warning{
			Message: fmt.Sprintf("systemd-networkd is running without %s=no: it deletes %s it did not create, dualhomed's included", c.key, c.what),
			Hint:    fmt.Sprintf("create /etc/systemd/networkd.conf.d/dualhomed.conf containing `[Network]` and `%s=no`, then `systemctl restart systemd-networkd`", c.key),
		})
	}
	return warns
}

func networkdRunning(p ConflictPaths) bool {
	if p.NetifDir != "" {
		if fi, err := os.Stat(p.NetifDir); err == nil && fi.IsDir() {
			return true
		}
	}
	if p.ProcDir == "" {
		return false
	}
	comms, _ := filepath.Glob(filepath.Join(p.ProcDir, "[0-9]*", "comm"))
	for _, c := range comms {
		b, err := os.ReadFile(c)
		// comm is cut to 15 bytes: "systemd-network".
		if name := strings.TrimSpace(string(b)); err == nil && (name == "systemd-network" || name == "systemd-networkd") {
			return true
		}
	}
	return false
}

// networkdSettings returns the [Network] keys as systemd-networkd would see
// them: main files in order, then drop-ins sorted by file name, later values
// overriding earlier ones.
func networkdSettings(p ConflictPaths) map[string]string {
	settings := map[string]string{}
	for _, f := range p.NetworkdConfs {
		readNetworkSection(f, settings)
	}
	dropins := map[string]string{} // base name -> path of highest precedence
	for i := len(p.NetworkdDropinDirs) - 1; i >= 0; i-- {
		files, _ := filepath.Glob(filepath.Join(p.NetworkdDropinDirs[i], "*.conf"))
		for _, f := range files {
			dropins[filepath.Base(f)] = f
		}
	}
	names := make([]string, 0, len(dropins))
	for n := range dropins {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		readNetworkSection(dropins[n], settings)
	}
	return settings
}

// readNetworkSection adds the key=value lines of path's [Network] section to
// settings. A missing file adds nothing.
func readNetworkSection(path string, settings map[string]string) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && strings.HasSuffix(line, "]"):
			section = strings.TrimSpace(line[1 : len(line)-1])
		case section == "Network":
			if k, v, ok := strings.Cut(line, "="); ok {
				settings[strings.TrimSpace(k)] = strings.TrimSpace(v)
			}
		}
	}
}

// isFalse is systemd's boolean "no".
func isFalse(v string) bool {
	switch strings.ToLower(v) {
	case "no", "false", "0", "off":
		return true
	}
	return false
}
