package netcfg

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/dualhomed/dualhomed/imds"
	"golang.org/x/sys/unix"
)

// IPv6Gateway is the VPC router's fixed link-local address, valid on every ENI.
var IPv6Gateway = netip.MustParseAddr("fe80:ec2::1")

// Observed is what Desired needs to know of the kernel: which links exist (ENIs
// are matched to links by MAC), which addresses are already on them, and what
// dualhomed owns right now.
//
// Contract for callers (the agent, `dualhomed plan`):
//
//   - Addrs may list every address on each link, whoever put it there (that is
//     what Kernel.Observe returns). Desired subtracts the addresses listed in
//     Owned.Addrs (exact link and prefix) and treats the rest as foreign.
//   - Owned must be what Kernel.Observe returned, read in the same pass.
//     Without it, an address dualhomed added itself looks foreign, Desired stops
//     wanting it, and Diff deletes it: the next round adds it back (flapping).
//     A caller whose Addrs already exclude our own addresses may leave Owned
//     empty, at the price of the not-ready protection below.
//   - Owned also lets Desired keep our objects on the link of an ENI that IMDS
//     temporarily reports not ready (a glitch is never an answer), and prefer,
//     when IMDS data clashes, the ENI that already owns a table.
type Observed struct {
	Links []Link
	// Addrs lists the addresses on each link, by link index, with their prefix length.
	Addrs map[int][]netip.Prefix
	// Owned is the state dualhomed owns in the kernel now.
	Owned State
	// AltNames maps every alternative name in the namespace, whoever added
	// it, to the index of the link that holds it; nil when the kernel has
	// no altnames (before Linux 5.5): Desired then wants none.
	AltNames map[string]int
	// ForeignRules and ForeignRoutes are the rules and routes (the local
	// table's aside) that dualhomed does not own: what Conflicts checks.
	ForeignRules  []KernelRule
	ForeignRoutes []KernelRoute
	// AwaitDHCP lists the links on which an ENI's primary IPv4 is left to
	// a DHCP client for now: Desired does not add it there (unless it is
	// already ours). Observe leaves it empty: the kernel does not say how
	// long a link has been there; the agent fills it for the links it saw
	// appear less than its grace period ago.
	AwaitDHCP map[int]bool
	// ForeignAddrs are the addresses (of Addrs) that dualhomed does not
	// own, with their origin: what a blocked address add names as holder.
	ForeignAddrs []KernelAddr
}

// KernelRoute is a route as the kernel reports it.
type KernelRoute struct {
	Route
	Metric   int
	Protocol uint8
	Type     uint8 // RTN_UNICAST, RTN_BLACKHOLE, ...
}

// KernelRule is a policy rule as the kernel reports it.
type KernelRule struct {
	Priority int
	Src      netip.Prefix // 0.0.0.0/0 or ::/0 for "from all"
	Table    int
	Protocol uint8
	Mark     uint32 // fwmark; 0 for none
	Mask     uint32 // its mask: 0xffffffff for a fwmark given without one
	// Selectors is true when the rule matches on more than its source and
	// mark, or does more than look up a table: a destination, tos,
	// iif/oif, ports, uid range, `not`, suppress_*, goto... dualhomed
	// never adds such a rule, so one carrying our protocol is somebody
	// else's: it is left alone, and never mistaken for our rule of the
	// same source or mark.
	Selectors bool
	// LookupAll is true when the rule sends all traffic from Src to Table:
	// nothing narrows it (see parseRule) and Table is a real one.
	LookupAll bool
}

// ENIState is the lifecycle state of one ENI as reported by plan and status.
type ENIState string

const (
	ENIConfigured  ENIState = "configured"
	ENIWaitingLink ENIState = "waiting for link"
	ENIWaitingIMDS ENIState = "waiting for IMDS"
	ENIExcluded    ENIState = "excluded"
	ENIDrift       ENIState = "drift" // set by callers that diffed against the kernel
	ENIPrimaryRole ENIState = "primary"
	// ENIInvalid: IMDS data that cannot be configured safely (a device number
	// beyond CardStride, a table already claimed by another ENI); see Warnings.
	ENIInvalid ENIState = "invalid"
)

// ENIStates lists every ENIState, in the order summaries name them.
var ENIStates = []ENIState{ENIConfigured, ENIDrift, ENIWaitingLink, ENIWaitingIMDS, ENIExcluded, ENIPrimaryRole, ENIInvalid}

// ENIStatus describes one ENI of the snapshot and what dualhomed does with it.
type ENIStatus struct {
	MAC         string       `json:"mac"`
	InterfaceID string       `json:"interface_id,omitempty"`
	VPCID       string       `json:"vpc_id,omitempty"`
	MultiVPC    bool         `json:"multi_vpc,omitempty"` // VPC differs from the primary ENI's
	Primary     bool         `json:"primary,omitempty"`
	Card        int          `json:"card"`
	Device      int          `json:"device"`
	Link        string       `json:"link,omitempty"` // "" while waiting for the link
	LinkIndex   int          `json:"link_index,omitempty"`
	Addresses   []netip.Addr `json:"addresses,omitempty"`
	Table       int          `json:"table,omitempty"`    // 0 when the ENI has no table
	Priority    int          `json:"priority,omitempty"` // 0 when the ENI has no rules
	NAT         string       `json:"nat,omitempty"`      // NATRoleSource, NATRoleEgress or ""
	State       ENIState     `json:"state"`
	Warnings    []string     `json:"warnings,omitempty"`
}

// Warning is something the operator should know: a skipped route, a conflict
// with another manager. Hint says how to fix it.
type Warning struct {
	ENI     string `json:"eni,omitempty"` // interface id or MAC; "" for instance-wide warnings
	Message string `json:"message"`
	Hint    string `json:"hint,omitempty"`
	// Blocks lists the routes dualhomed wants that the conflict keeps out
	// of the kernel: a foreign route holds their table, destination and
	// metric, so adding them fails with EEXIST (Conflicts sets it).
	Blocks []Route `json:"blocks,omitempty"`
	// Blocked names the add of ours this warning is about and what holds
	// its place in the kernel (the reconciler's "cannot add" warnings).
	Blocked *Blocked `json:"blocked,omitempty"`
}

// String renders the warning on one line, hint included.
func (w Warning) String() string {
	s := w.Message
	if w.ENI != "" {
		s = w.ENI + ": " + s
	}
	if w.Hint != "" {
		s += " (hint: " + w.Hint + ")"
	}
	return s
}

// Result is the output of Desired.
type Result struct {
	State    State       `json:"state"`
	ENIs     []ENIStatus `json:"enis"`
	Warnings []Warning   `json:"warnings,omitempty"`
}

// Desired computes the routing state dualhomed wants for snap. It is a pure
// function: same inputs, same Result, sorted, at most one object per identity
// (see RouteKey, RuleKey, AddrKey). It never panics on odd IMDS data; what it
// cannot configure it reports in Result.Warnings and the ENI's status.
//
// For every ready, non-excluded ENI whose link exists (links are matched by
// MAC) it wants:
//   - addresses (cfg.ManageAddresses), the primary ENI included: every IMDS
//     address not already on the link as a foreign address (any length); the
//     first IPv4 with the subnet's length (noprefixroute when the subnet
//     overlaps another ENI's, the primary excepted), the others /32 and /128
//     noprefixroute. The first IPv4 is a DHCP client's to add: not on links
//     in obs.AwaitDHCP, unless it is ours already.
//   - for secondary ENIs (and the primary with cfg.PrimaryTable): table
//     T = TableBase + CardStride*card + device holding the subnet route
//     (scope link, src the first IPv4), the default route via the subnet's
//     router (network+1), and for IPv6 the subnet routes
//     and the default via fe80:ec2::1; rules at priority
//     PriorityBase + CardStride*card + device from every address (/32, /128)
//     and delegated prefix to T. IPv4 routing needs the first IPv4 on the
//     link (a route's src must exist).
//   - for multi-VPC ENIs (VPC other than the primary's): main-table routes to
//     the VPC's CIDRs via the ENI's gateway, except CIDRs overlapping a VPC
//     reached through another ENI. One ENI per VPC carries them, the lowest
//     card/device. If no address gives main an on-link route to the gateway,
//     the carrier adds its subnet to main, or skips when that is ambiguous.
//   - for each CIDR of a secondary ENI's `routes:`: a main-table route via
//     its gateway (fe80:ec2::1 for IPv6) with its first address as source,
//     unless the CIDR overlaps a subnet of the primary ENI; where it
//     overlaps a VPC route of another ENI, a warning says which one wins.
//   - rp_filter for secondary ENIs unless cfg.RPFilter is keep.
//   - altnames on every ENI's link, the primary's included (altNamesOf),
//     except a name another program's link or altname holds.
//   - the shared NAT when an enis entry has nat: true (see addNAT).
//
// An excluded ENI gets nothing. A not-ready ENI gets nothing new, but what
// Observed.Owned holds on its link (routes, rules pointing at their tables,
// addresses, rp_filter) stays desired: an IMDS hiccup never removes
// configuration. An ENI without a link gets nothing (the kernel dropped its
// routes; its rules go too).
func Desired(snap imds.Snapshot, obs Observed, cfg Config) Result {
	d := newDesirer(snap, obs, cfg)
	d.run()
	return d.result()
}

// eniInfo is the working record of one snapshot ENI.
type eniInfo struct {
	eni     imds.ENI
	conf    ENIConfig // the matching per-ENI entry, zero when none
	status  ENIStatus
	link    Link
	hasLink bool
	managed bool // ready, not excluded, link present, valid
	primary bool
	table   int // 0 when the ENI gets no table
	prio    int
	// v4 is the ENI's first IPv4 and v4Net its subnet, both valid only when
	// IPv4 routing is possible for it.
	v4    netip.Addr
	v4Net netip.Prefix
	v6    bool // the ENI has IPv6 addresses or prefixes
	// overlapsOtherVPC: the subnet overlaps the subnet of an ENI in another VPC.
	overlapsOtherVPC bool
	// awaitingDHCP: the primary IPv4 is left to a DHCP client (AwaitDHCP).
	awaitingDHCP bool
}

type desirer struct {
	snap imds.Snapshot
	obs  Observed
	cfg  Config

	enis []*eniInfo
	// foreign holds, per link, the addresses on it that are not ours;
	// noPrefixRoute, those of them that bring no prefix route into main.
	foreign       map[int][]netip.Prefix
	noPrefixRoute map[AddrKey]bool
	// owned holds the addresses we own by identity; of several with one
	// identity, the last one counts.
	owned map[AddrKey]Addr

	// The state being built: at most one object per key (Diff needs that),
	// the first of several counting.
	st       State
	routes   map[RouteKey]Route
	addrs    map[netip.Addr]AddrKey // by address alone: see addr
	rpf      map[string]bool
	warnings []Warning
	// routed holds the main-table routes of `routes:`, by destination.
	routed map[netip.Prefix]routedBy
}

// routedBy is the ENI and the configuration entry a `routes:` CIDR came from.
type routedBy struct {
	e   *eniInfo
	cfg ConfigPrefix
}

func newDesirer(snap imds.Snapshot, obs Observed, cfg Config) *desirer {
	d := &desirer{snap: snap, obs: obs, cfg: cfg}
	// Sized up front: at full scale, thousands of addresses and rules.
	var addrs, rules int
	for _, e := range snap.ENIs {
		addrs += len(e.LocalIPv4s) + len(e.IPv6s)
		rules += len(e.LocalIPv4s) + len(e.IPv6s) + len(e.IPv4Prefixes) + len(e.IPv6Prefixes)
	}
	d.st = State{Routes: make([]Route, 0, 4*len(snap.ENIs)), Rules: make([]Rule, 0, rules), Addrs: make([]Addr, 0, addrs)}
	d.routes, d.addrs, d.rpf = make(map[RouteKey]Route, 4*len(snap.ENIs)), make(map[netip.Addr]AddrKey, addrs), map[string]bool{}
	return d
}

func (d *desirer) warn(e *eniInfo, msg, hint string) {
	w := Warning{Message: msg, Hint: hint}
	if e != nil {
		w.ENI = e.name()
		e.status.Warnings = append(e.status.Warnings, msg)
	}
	d.warnings = append(d.warnings, w)
}

func (e *eniInfo) name() string { return e.status.Name() }

func (d *desirer) run() {
	d.computeForeign()
	links := d.linksByMAC()
	primaryMAC := strings.ToLower(d.snap.PrimaryMAC)
	// The primary's VPC decides which ENIs are multi-VPC. It is taken even
	// from a not-ready primary entry: losing it would remove every multi-VPC
	// route because of an IMDS hiccup.
	primaryENI, _ := d.snap.ENI(primaryMAC)
	if primaryENI.VPCID == "" {
		d.warn(nil, "IMDS does not tell the primary ENI's ("+d.snap.PrimaryMAC+") VPC: no multi-VPC main-table routes",
			"check meta-data/mac and the primary ENI's vpc-id")
	}

	seen := map[string]bool{}
	for _, raw := range d.snap.ENIs {
		e := &eniInfo{eni: normalizeENI(raw)}
		e.primary = e.eni.MAC == primaryMAC
		e.status = ENIStatus{
			MAC:         e.eni.MAC,
			InterfaceID: e.eni.InterfaceID,
			VPCID:       e.eni.VPCID,
			Primary:     e.primary,
			Card:        e.eni.NetworkCard,
			Device:      e.eni.DeviceNumber,
			Addresses:   append(slices.Clone(e.eni.LocalIPv4s), e.eni.IPv6s...),
		}
		d.enis = append(d.enis, e)
		if seen[e.eni.MAC] {
			e.status.State = ENIInvalid
			d.warn(e, "IMDS lists this MAC twice: ignoring the second entry", "")
			continue
		}
		seen[e.eni.MAC] = true
		e.status.MultiVPC = !e.primary && e.eni.VPCID != "" && primaryENI.VPCID != "" && e.eni.VPCID != primaryENI.VPCID
		e.conf = d.cfg.eniConfig(e.eni)
		if l, ok := links[e.eni.MAC]; ok {
			e.link, e.hasLink = l, true
			e.status.Link, e.status.LinkIndex = l.Name, l.Index
		}
		switch {
		case e.conf.Exclude:
			e.status.State = ENIExcluded
		case !e.eni.Ready:
			e.status.State = ENIWaitingIMDS
			if e.eni.NotReadyReason != "" {
				e.status.Warnings = append(e.status.Warnings, e.eni.NotReadyReason)
			}
		case !e.hasLink:
			e.status.State = ENIWaitingLink
		default:
			e.managed = true
			if e.primary {
				e.status.State = ENIPrimaryRole
			} else {
				e.status.State = ENIConfigured
			}
		}
	}

	d.assignTables()
	overlapping := d.overlappingSubnets()
	for _, e := range d.sortedManaged() {
		d.addAddresses(e, overlapping[e])
	}
	for _, e := range d.sortedManaged() {
		d.addTable(e)
		if !e.primary && d.cfg.rpFilterMode() != RPFilterKeep {
			d.rpFilter(RPFilter{LinkName: e.link.Name, Value: d.cfg.rpFilterValue()})
		}
		d.addAltNames(e)
	}
	d.addRoutes()
	d.addVPCRoutes()
	d.noteOverlaps()
	d.addNAT()
	d.keepNotReady()
}

// computeForeign subtracts our own addresses from the observed ones.
func (d *desirer) computeForeign() {
	d.owned = make(map[AddrKey]Addr, len(d.obs.Owned.Addrs))
	for _, a := range d.obs.Owned.Addrs {
		d.owned[a.Key()] = a
	}
	d.foreign, d.noPrefixRoute = map[int][]netip.Prefix{}, map[AddrKey]bool{}
	for _, a := range d.obs.ForeignAddrs {
		if a.NoPrefixRoute {
			d.noPrefixRoute[AddrKey{LinkIndex: a.LinkIndex, Prefix: a.Prefix}] = true
		}
	}
	for idx, ps := range d.obs.Addrs {
		for _, p := range ps {
			if _, ours := d.owned[AddrKey{LinkIndex: idx, Prefix: p}]; !ours && p.IsValid() {
				d.foreign[idx] = append(d.foreign[idx], p)
			}
		}
	}
}

// present reports whether a will be on the link after the plan: a foreign
// address or one we want.
func (d *desirer) present(link int, a netip.Addr) bool {
	if k, ok := d.addrs[a]; ok && k.LinkIndex == link {
		return true
	}
	return d.isForeign(link, a)
}

func (d *desirer) isForeign(link int, a netip.Addr) bool {
	return slices.ContainsFunc(d.foreign[link], func(p netip.Prefix) bool { return p.Addr().Unmap() == a })
}

// linksByMAC maps lower-case MACs to links. When several links share a MAC
// (VLANs and bonds copy their parent's), the lowest index, normally the NIC
// itself, wins.
func (d *desirer) linksByMAC() map[string]Link {
	m := map[string]Link{}
	for _, l := range d.obs.Links {
		mac := strings.ToLower(l.MAC)
		if mac == "" {
			continue
		}
		if old, ok := m[mac]; !ok || l.Index < old.Index {
			m[mac] = l
		}
	}
	return m
}

// normalizeENI lower-cases the MAC, unmaps and masks addresses and drops the
// invalid ones, so that the rest of Desired works on clean values.
func normalizeENI(e imds.ENI) imds.ENI {
	e.MAC = strings.ToLower(e.MAC)
	e.SubnetIPv4CIDR = cleanPrefix(e.SubnetIPv4CIDR, true)
	e.SubnetIPv6CIDRs = cleanPrefixes(e.SubnetIPv6CIDRs, false)
	e.VPCIPv4CIDRs = cleanPrefixes(e.VPCIPv4CIDRs, true)
	e.VPCIPv6CIDRs = cleanPrefixes(e.VPCIPv6CIDRs, false)
	e.IPv4Prefixes = cleanPrefixes(e.IPv4Prefixes, true)
	e.IPv6Prefixes = cleanPrefixes(e.IPv6Prefixes, false)
	e.LocalIPv4s = cleanAddrs(e.LocalIPv4s, true)
	e.IPv6s = cleanAddrs(e.IPv6s, false)
	return e
}

func cleanPrefix(p netip.Prefix, v4 bool) netip.Prefix {
	if !p.IsValid() {
		return netip.Prefix{}
	}
	a := p.Addr().Unmap()
	bits := p.Bits()
	if p.Addr().Is4In6() {
		bits -= 96
	}
	if a.Is4() != v4 || bits < 0 {
		return netip.Prefix{}
	}
	return netip.PrefixFrom(a, bits).Masked()
}

func cleanPrefixes(ps []netip.Prefix, v4 bool) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if p = cleanPrefix(p, v4); p.IsValid() && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

func cleanAddrs(as []netip.Addr, v4 bool) []netip.Addr {
	var out []netip.Addr
	for _, a := range as {
		a = a.Unmap()
		if a.IsValid() && a.Is4() == v4 && !a.IsUnspecified() && !slices.Contains(out, a) {
			if out == nil {
				out = make([]netip.Addr, 0, len(as)) // one allocation, not one per doubling
			}
			out = append(out, a)
		}
	}
	return out
}

// sortedManaged returns the managed ENIs by card, device and MAC.
func (d *desirer) sortedManaged() []*eniInfo {
	out := slices.DeleteFunc(slices.Clone(d.enis), func(e *eniInfo) bool { return !e.managed })
	slices.SortFunc(out, compareENIs)
	return out
}

func compareENIs(a, b *eniInfo) int {
	return cmp.Or(
		compareBool(!a.primary, !b.primary),
		cmp.Compare(a.eni.NetworkCard, b.eni.NetworkCard),
		cmp.Compare(a.eni.DeviceNumber, b.eni.DeviceNumber),
		cmp.Compare(a.eni.MAC, b.eni.MAC),
	)
}

// assignTables gives each managed ENI that needs one its table and priority.
// Out-of-range numbers and clashes (two ENIs claiming one table, as IMDS can
// briefly report after a hot attach) make the ENI invalid; on a clash the ENI
// that already owns the table in the kernel keeps it, so a glitch never tears
// down working configuration.
func (d *desirer) assignTables() {
	ownerOf := map[int]int{} // table -> link index of our routes in it
	for _, r := range d.obs.Owned.Routes {
		if r.Table != MainTable {
			ownerOf[r.Table] = r.LinkIndex
		}
	}
	claims := map[int][]*eniInfo{}
	for _, e := range d.enis {
		if !e.managed || (e.primary && !d.cfg.PrimaryTable) {
			continue
		}
		card, dev := e.eni.NetworkCard, e.eni.DeviceNumber
		if card < 0 || dev < 0 || (d.cfg.CardStride > 0 && dev >= d.cfg.CardStride) {
			d.invalidate(e, fmt.Sprintf("network card %d / device number %d is outside the table layout (card stride %d)", card, dev, d.cfg.CardStride),
				"raise card_stride in the configuration")
			continue
		}
		t := d.cfg.TableBase + d.cfg.CardStride*card + dev
		p := d.cfg.PriorityBase + d.cfg.CardStride*card + dev
		if !validTable(t) || p < 1 || p > maxPriority {
			d.invalidate(e, fmt.Sprintf("table %d / priority %d computed for card %d device %d is reserved or out of range", t, p, card, dev),
				"change table_base / priority_base")
			continue
		}
		e.table, e.prio = t, p
		claims[t] = append(claims[t], e)
	}
	for _, t := range slices.Sorted(maps.Keys(claims)) { // sorted: warnings come out in a stable order
		es := claims[t]
		if len(es) < 2 {
			continue
		}
		winner := slices.MinFunc(es, func(a, b *eniInfo) int {
			aOwns, bOwns := ownerOf[t] == a.link.Index, ownerOf[t] == b.link.Index
			return cmp.Or(compareBool(!aOwns, !bOwns), cmp.Compare(a.eni.MAC, b.eni.MAC))
		})
		for _, e := range es {
			if e != winner {
				d.invalidate(e, fmt.Sprintf("table %d is already used by %s (same network card and device number)", t, winner.name()),
					"IMDS may still be catching up after an attach; if this persists, check the ENIs' device numbers")
			}
		}
	}
}

func (d *desirer) invalidate(e *eniInfo, msg, hint string) {
	e.managed = false
	e.table, e.prio = 0, 0
	e.status.State = ENIInvalid
	d.warn(e, msg, hint)
}

// overlappingSubnets returns the managed ENIs whose IPv4 subnet overlaps the
// subnet of another listed ENI. Their addresses get noprefixroute so that the
// main table holds no ambiguous subnet route; the primary keeps its own.
func (d *desirer) overlappingSubnets() map[*eniInfo]bool {
	out := map[*eniInfo]bool{}
	for _, e := range d.enis {
		if !e.managed || e.primary || !e.eni.SubnetIPv4CIDR.IsValid() {
			continue
		}
		for _, o := range d.enis {
			if o != e && o.eni.MAC != e.eni.MAC && o.eni.SubnetIPv4CIDR.IsValid() && o.eni.SubnetIPv4CIDR.Overlaps(e.eni.SubnetIPv4CIDR) {
				out[e] = true
				if o.eni.VPCID != e.eni.VPCID {
					e.overlapsOtherVPC = true
				}
			}
		}
	}
	return out
}

func (d *desirer) addAddresses(e *eniInfo, overlapping bool) {
	if !d.cfg.ManageAddresses {
		return
	}
	link := e.link.Index
	add := func(a Addr) {
		if !d.isForeign(link, a.Prefix.Addr()) {
			d.addr(e, a)
		}
	}
	for i, a := range e.eni.LocalIPv4s {
		p, noPrefixRoute := netip.PrefixFrom(a, 32), true
		if i == 0 && e.eni.SubnetIPv4CIDR.Contains(a) {
			p, noPrefixRoute = netip.PrefixFrom(a, e.eni.SubnetIPv4CIDR.Bits()), overlapping
			// The primary IPv4 is the one a DHCP client adds: two programs
			// adding it race for it. While the link waits for DHCP it is
			// left to the client, unless it is ours already.
			if _, ours := d.owned[AddrKey{LinkIndex: link, Prefix: p}]; d.obs.AwaitDHCP[link] && !ours {
				e.awaitingDHCP = true
				continue
			}
			// The flag matters when the address is created: an address of
			// ours keeps it. Overlaps come and go with other ENIs, and the
			// one that arrives second taking noprefixroute is enough to keep
			// main unambiguous, while flipping ours would mean deleting and
			// re-adding the ENI's primary address (IPv4 cannot change the
			// flag in place).
			if o, ok := d.owned[AddrKey{LinkIndex: link, Prefix: p}]; ok {
				noPrefixRoute = o.NoPrefixRoute
			}
		}
		add(Addr{LinkIndex: link, Prefix: p, NoPrefixRoute: noPrefixRoute})
	}
	for _, a := range e.eni.IPv6s {
		add(Addr{LinkIndex: link, Prefix: netip.PrefixFrom(a, 128), NoPrefixRoute: true})
	}
}

// addTable fills the ENI's table and its rules.
func (d *desirer) addTable(e *eniInfo) {
	if e.table == 0 {
		return
	}
	link := e.link.Index
	// rules sends every address (as /32 or /128) and delegated prefix to the table.
	rules := func(addrs []netip.Addr, prefixes []netip.Prefix) {
		for _, a := range addrs {
			d.rule(Rule{Priority: e.prio, Src: netip.PrefixFrom(a, a.BitLen()), Table: e.table})
		}
		for _, p := range prefixes {
			d.rule(Rule{Priority: e.prio, Src: p, Table: e.table})
		}
	}

	if len(e.eni.LocalIPv4s) > 0 {
		first, subnet := e.eni.LocalIPv4s[0], e.eni.SubnetIPv4CIDR
		switch {
		case !subnet.IsValid():
			d.warn(e, "IMDS lists IPv4 addresses but no subnet-ipv4-cidr-block: no IPv4 routing", "")
		case subnet.Bits() > 30:
			d.warn(e, fmt.Sprintf("subnet %v is too small to have a gateway: no IPv4 routing", subnet), "")
		case !d.present(link, first) && e.awaitingDHCP:
			d.warn(e, fmt.Sprintf("%v is not on %s yet: waiting for a DHCP client to add it, no IPv4 routing until then", first, e.link.Name),
				"dualhomed adds it itself (manage_addresses) only on a link where no DHCP client added it within a few seconds of the link's arrival; "+
					"where a client held it, it stays the client's until the link goes")
		case !d.present(link, first):
			d.warn(e, fmt.Sprintf("%v is not on %s: no IPv4 routing (a route with that source would fail)", first, e.link.Name),
				"enable manage_addresses or configure the address on the link")
		default:
			e.v4, e.v4Net = first, subnet
		}
	}
	if e.v4.IsValid() {
		gw := e.v4Net.Addr().Next()
		d.route(e, Route{Table: e.table, Dst: e.v4Net, LinkIndex: link, Src: e.v4, ScopeLink: true})
		d.route(e, Route{Table: e.table, Dst: netip.PrefixFrom(netip.IPv4Unspecified(), 0), Gateway: gw, LinkIndex: link, Src: e.v4})
		rules(e.eni.LocalIPv4s, e.eni.IPv4Prefixes)
	} else if len(e.eni.IPv4Prefixes) > 0 {
		d.warn(e, "IPv4 delegated prefixes without IPv4 routing: no rules for them", "")
	}

	e.v6 = len(e.eni.IPv6s) > 0 || len(e.eni.IPv6Prefixes) > 0
	if e.v6 {
		for _, s := range e.eni.SubnetIPv6CIDRs {
			d.route(e, Route{Table: e.table, Dst: s, LinkIndex: link})
		}
		d.route(e, Route{Table: e.table, Dst: netip.PrefixFrom(netip.IPv6Unspecified(), 0), Gateway: IPv6Gateway, LinkIndex: link})
		rules(e.eni.IPv6s, e.eni.IPv6Prefixes)
	}
}

// addVPCRoutes adds main-table routes to the CIDRs of each VPC reached only
// through a secondary ENI, so that unbound connections into that VPC leave
// through it. One ENI per VPC (the lowest card/device) carries them; a CIDR
// overlapping any CIDR of another VPC is skipped with a warning.
func (d *desirer) addVPCRoutes() {
	vpcV4, vpcV6 := map[string][]netip.Prefix{}, map[string][]netip.Prefix{}
	for _, e := range d.enis {
		addVPCCIDRs(vpcV4, e.eni.VPCID, e.eni.VPCIPv4CIDRs)
		addVPCCIDRs(vpcV6, e.eni.VPCID, e.eni.VPCIPv6CIDRs)
	}
	carried := map[string]bool{}
	for _, e := range d.sortedManaged() {
		if !e.status.MultiVPC || e.table == 0 || carried[e.eni.VPCID] || e.conf.VPCRoutes == VPCRoutesOff {
			continue
		}
		carried[e.eni.VPCID] = true
		if vpc := e.eni.VPCID; e.v4.IsValid() {
			// A VPC CIDR equal to the ENI's subnet: the address's prefix route
			// covers it (and ours would clash with it).
			others := maps.Clone(vpcV4)
			others[vpc] = slices.DeleteFunc(slices.Clone(vpcV4[vpc]), func(c netip.Prefix) bool { return c == e.v4Net })
			d.mainRoutes4(e, d.vpcCIDRsAlone(e, others), slices.Contains(vpcV4[vpc], e.v4Net))
		}
		if e.v6 {
			for _, c := range d.vpcCIDRsAlone(e, vpcV6) {
				d.route(e, Route{Table: MainTable, Dst: c, Gateway: IPv6Gateway, LinkIndex: e.link.Index, Src: d.firstIPv6(e)})
			}
		}
	}
}

// addVPCCIDRs adds cs to the CIDRs of vpc, each once; a VPC without an id
// has none.
func addVPCCIDRs(cidrs map[string][]netip.Prefix, vpc string, cs []netip.Prefix) {
	for _, c := range cs {
		if vpc != "" && !slices.Contains(cidrs[vpc], c) {
			cidrs[vpc] = append(cidrs[vpc], c)
		}
	}
}

// vpcCIDRsAlone returns the CIDRs of e's VPC (in all, by VPC) that overlap
// no CIDR of another VPC, warning about the others.
func (d *desirer) vpcCIDRsAlone(e *eniInfo, all map[string][]netip.Prefix) []netip.Prefix {
	vpc := e.eni.VPCID
	var out []netip.Prefix
	for _, c := range all[vpc] {
		if r, ok := d.routed[c]; ok && r.e != e {
			d.warn(e, fmt.Sprintf("not routing %v of %s through %s in the main table: %s routes it through %s", c, vpc, e.link.Name, r.cfg.where(), r.e.link.Name), "")
			continue
		}
		if o := overlapOfOtherVPC(vpc, c, all); o != "" {
			d.warn(e, fmt.Sprintf("not routing %v of %s through %s in the main table: it overlaps %s", c, vpc, e.link.Name, o),
				"connections bound to this ENI's addresses still work; list what this ENI must reach under `routes:` in its enis entry")
			continue
		}
		out = append(out, c)
	}
	return out
}

// overlapOfOtherVPC names the first CIDR of another VPC than vpc (by VPC
// id) that overlaps c, "" for none.
func overlapOfOtherVPC(vpc string, c netip.Prefix, all map[string][]netip.Prefix) string {
	for _, id := range slices.Sorted(maps.Keys(all)) {
		if id == vpc {
			continue
		}
		for _, o := range all[id] {
			if o.Overlaps(c) {
				return fmt.Sprintf("%v of %s", o, id)
			}
		}
	}
	return ""
}

// mainRoutes4 adds main-table routes to cidrs via e's IPv4 gateway. The
// kernel refuses a route via a gateway it cannot reach on-link
// (ENETUNREACH): without an address prefix route to the subnet in main
// (ours is noprefixroute because several ENIs share the subnet, or
// somebody added the address as /32), e carries its subnet in main (which
// needSubnet asks for too), unless that would be ambiguous.
func (d *desirer) mainRoutes4(e *eniInfo, cidrs []netip.Prefix, needSubnet bool) {
	gw := e.v4Net.Addr().Next()
	if len(cidrs) == 0 && !needSubnet {
		return
	}
	if !d.gatewayOnLink(e, gw) {
		if e.overlapsOtherVPC || d.foreignSubnetRoute(e.v4Net) {
			d.warn(e, fmt.Sprintf("not routing %v through %s in the main table: the gateway %v is not on-link in main and the subnet %v overlaps another subnet", cidrs, e.link.Name, gw, e.v4Net),
				"connections bound to this ENI's addresses still work")
			return
		}
		d.route(e, Route{Table: MainTable, Dst: e.v4Net, LinkIndex: e.link.Index, Src: e.v4, ScopeLink: true})
	}
	for _, c := range cidrs {
		d.route(e, Route{Table: MainTable, Dst: c, Gateway: gw, LinkIndex: e.link.Index, Src: e.v4})
	}
}

// addRoutes adds the main-table routes of each secondary ENI's `routes:`.
// A CIDR overlapping a subnet of the primary ENI is refused: it would take
// the instance's own VPC traffic off the primary.
func (d *desirer) addRoutes() {
	d.routed = map[netip.Prefix]routedBy{}
	var primary []netip.Prefix
	for _, e := range d.enis {
		if e.primary {
			primary = append([]netip.Prefix{e.eni.SubnetIPv4CIDR}, e.eni.SubnetIPv6CIDRs...)
		}
	}
	for _, e := range d.sortedManaged() {
		var v4 []netip.Prefix
		for _, r := range e.conf.Routes {
			refuse := func(why string) {
				d.warn(e, fmt.Sprintf("%s: not routing %v through %s: %s", r.where(), r.Prefix, e.link.Name, why), "")
			}
			if r.Prefix = cleanPrefix(r.Prefix, r.Addr().Unmap().Is4()); !r.IsValid() || r.Bits() == 0 {
				refuse("not a CIDR to route (Validate refuses it)")
				continue
			}
			clash := slices.IndexFunc(primary, func(p netip.Prefix) bool { return p.IsValid() && p.Overlaps(r.Prefix) })
			taken, isTaken := d.routed[r.Prefix]
			switch {
			case e.primary:
				refuse("it is the primary ENI, whose default route reaches everything")
			case clash >= 0:
				refuse(fmt.Sprintf("it overlaps the primary ENI's subnet %v", primary[clash]))
			case isTaken:
				refuse(fmt.Sprintf("the entry matches %s too, which routes it", taken.e.link.Name))
			case r.Addr().Is4() && !e.v4.IsValid(), r.Addr().Is6() && d.firstIPv6(e) == (netip.Addr{}):
				refuse("the ENI has no routing for that address family")
			case r.Addr().Is4():
				v4 = append(v4, r.Prefix)
				d.routed[r.Prefix] = routedBy{e, r}
			default:
				d.route(e, Route{Table: MainTable, Dst: r.Prefix, Gateway: IPv6Gateway, LinkIndex: e.link.Index, Src: d.firstIPv6(e)})
				d.routed[r.Prefix] = routedBy{e, r}
			}
		}
		d.mainRoutes4(e, v4, false)
	}
}

// firstIPv6 is e's first IPv6 address that is on its link (or will be),
// invalid when none is.
func (d *desirer) firstIPv6(e *eniInfo) netip.Addr {
	if i := slices.IndexFunc(e.eni.IPv6s, func(a netip.Addr) bool { return d.present(e.link.Index, a) }); i >= 0 {
		return e.eni.IPv6s[i]
	}
	return netip.Addr{}
}

// noteOverlaps says, for each CIDR of `routes:` that overlaps a main-table
// route of ours through another ENI (a VPC's CIDR), which of the two a
// destination in both takes: the longer prefix.
func (d *desirer) noteOverlaps() {
	names := linkNames(d.obs.Links)
	for _, c := range d.st.Routes {
		r, ok := d.routed[c.Dst]
		if !ok || c.Table != MainTable || c.LinkIndex != r.e.link.Index {
			continue
		}
		for _, o := range d.st.Routes {
			if o.Table != MainTable || !o.Gateway.IsValid() || o.LinkIndex == c.LinkIndex || !o.Dst.Overlaps(c.Dst) {
				continue
			}
			win, via := c.Dst, r.e.link.Name
			if o.Dst.Bits() > c.Dst.Bits() {
				win, via = o.Dst, linkName(names, o.LinkIndex)
			}
			d.warn(r.e, fmt.Sprintf("%s: %v through %s overlaps %v through %s: the longer prefix wins, %v goes through %s",
				r.cfg.where(), c.Dst, r.e.link.Name, o.Dst, linkName(names, o.LinkIndex), win, via), "")
		}
	}
}

// gatewayOnLink reports whether main reaches gw on e's link, which the
// kernel requires of a route via gw: a direct route of another program's
// in main on that link covers it, or an address on the link brings its
// prefix route: one of ours without noprefixroute, or a foreign one
// shorter than /32 without IFA_F_NOPREFIXROUTE (networkd with a DHCPv4
// RouteTable= puts the prefix route in that table instead).
func (d *desirer) gatewayOnLink(e *eniInfo, gw netip.Addr) bool {
	link := e.link.Index
	return slices.ContainsFunc(d.obs.ForeignRoutes, func(r KernelRoute) bool {
		return r.Table == MainTable && r.LinkIndex == link && !r.Gateway.IsValid() && r.Type == unix.RTN_UNICAST && r.Dst.Contains(gw)
	}) || slices.ContainsFunc(d.foreign[link], func(p netip.Prefix) bool {
		return p.Bits() < 32 && p.Contains(gw) && !d.noPrefixRoute[AddrKey{LinkIndex: link, Prefix: p}]
	}) || slices.ContainsFunc(d.st.Addrs, func(a Addr) bool {
		return a.LinkIndex == link && !a.NoPrefixRoute && a.Prefix.Contains(gw)
	})
}

// foreignSubnetRoute reports whether a foreign address on any link brings a
// prefix route overlapping subnet into main.
func (d *desirer) foreignSubnetRoute(subnet netip.Prefix) bool {
	for idx, ps := range d.foreign {
		for _, p := range ps {
			if p.Addr().Is4() && p.Bits() < 32 && p.Masked().Overlaps(subnet) && !d.noPrefixRoute[AddrKey{LinkIndex: idx, Prefix: p}] {
				return true
			}
		}
	}
	return false
}

// addAltNames wants e's altnames on its link, leaving out those another
// program holds: on this link it gave the same name (fine, and not ours to
// claim), on another link it is a conflict to report.
func (d *desirer) addAltNames(e *eniInfo) {
	if d.obs.AltNames == nil {
		return
	}
	for _, name := range altNamesOf(e.eni) {
		holder, held := d.obs.AltNames[name]
		if i := slices.IndexFunc(d.obs.Links, func(l Link) bool { return l.Name == name }); i >= 0 {
			holder, held = d.obs.Links[i].Index, true // link names share the namespace
		}
		switch {
		case !held || slices.Contains(d.obs.Owned.AltNames, AltName{LinkIndex: holder, Name: name}):
			d.altName(AltName{LinkIndex: e.link.Index, Name: name})
		case holder != e.link.Index:
			d.warn(e, fmt.Sprintf("altname %s is taken by link #%d: not giving it to %s", name, holder, e.link.Name),
				"remove it there (`ip link property del dev <link> altname "+name+"`) if that link is not this ENI")
		}
	}
}

// keepNotReady keeps what we own on the link of an ENI that IMDS reports not
// ready: a not-ready ENI must not be configured, and must not cause removal
// either. Our routes on the link, the rules pointing at their tables, our
// addresses and our rp_filter setting stay as they are.
func (d *desirer) keepNotReady() {
	for _, e := range d.enis {
		if e.eni.Ready || e.conf.Exclude || !e.hasLink {
			continue
		}
		link := e.link.Index
		tables := map[int]bool{}
		kept := false
		for _, r := range d.obs.Owned.Routes {
			if r.LinkIndex != link {
				continue
			}
			if _, taken := d.routes[r.Key()]; taken {
				continue // a ready ENI took over the destination (a VPC's routes, a clashing table)
			}
			kept = d.route(e, r) || kept
			if r.Table != MainTable {
				tables[r.Table] = true
			}
		}
		for _, r := range d.obs.Owned.Rules {
			if tables[r.Table] {
				kept = d.rule(r) || kept
			}
		}
		for _, a := range d.obs.Owned.Addrs {
			if _, taken := d.addrs[a.Prefix.Addr()]; a.LinkIndex == link && !taken {
				kept = d.addr(e, a) || kept
			}
		}
		for _, f := range d.obs.Owned.RPFilters {
			if f.LinkName == e.link.Name {
				kept = d.rpFilter(f) || kept
			}
		}
		for _, a := range d.obs.Owned.AltNames {
			if a.LinkIndex == link {
				kept = d.altName(a) || kept
			}
		}
		if kept {
			e.status.Warnings = append(e.status.Warnings, "keeping the existing configuration until IMDS is ready")
		}
	}
}

func (d *desirer) result() Result {
	st := d.st
	st.Sort()
	st.Rules = slices.Compact(st.Rules)
	enis := slices.Clone(d.enis)
	slices.SortStableFunc(enis, compareENIs)
	res := Result{State: st, Warnings: d.warnings}
	for _, e := range enis {
		e.status.Table, e.status.Priority = e.table, e.prio
		res.ENIs = append(res.ENIs, e.status)
	}
	return res
}

func (d *desirer) route(e *eniInfo, r Route) bool {
	if old, ok := d.routes[r.Key()]; ok {
		if old != r {
			d.warn(e, fmt.Sprintf("route to %v in table %d is wanted twice with different attributes: keeping the first", r.Dst, r.Table), "")
		}
		return false
	}
	d.routes[r.Key()] = r
	d.st.Routes = append(d.st.Routes, r)
	return true
}

// rule collects a rule; duplicates (only possible between a not-ready ENI's
// kept rules and a ready ENI's) are dropped when the state is sorted.
func (d *desirer) rule(r Rule) bool {
	d.st.Rules = append(d.st.Rules, r)
	return true
}

// addr keeps one address per IP instance-wide: IMDS listing an address on
// two ENIs is a glitch, and the same address twice would make Diff unstable.
func (d *desirer) addr(e *eniInfo, a Addr) bool {
	ip := a.Prefix.Addr()
	if old, ok := d.addrs[ip]; ok {
		if old != a.Key() {
			d.warn(e, fmt.Sprintf("address %v is wanted twice: keeping the first", ip), "")
		}
		return false
	}
	d.addrs[ip] = a.Key()
	d.st.Addrs = append(d.st.Addrs, a)
	return true
}

// altName keeps one link per name: names are unique in a namespace.
func (d *desirer) altName(a AltName) bool {
	if slices.ContainsFunc(d.st.AltNames, func(o AltName) bool { return o.Name == a.Name }) {
		return false
	}
	d.st.AltNames = append(d.st.AltNames, a)
	return true
}

func (d *desirer) rpFilter(f RPFilter) bool {
	if f.LinkName == "" || d.rpf[f.LinkName] {
		return false
	}
	d.rpf[f.LinkName] = true
	d.st.RPFilters = append(d.st.RPFilters, f)
	return true
}
