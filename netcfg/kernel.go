package netcfg

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netlinkTimeout bounds every netlink send and receive.
const netlinkTimeout = 10 * time.Second

// Kernel reads and changes the kernel's routing state in one network namespace,
// through netlink (routes, rules, addresses) and /proc/sys (rp_filter).
//
// Its methods may be called from several goroutines: Apply and Cleanup are
// serialised, reads may run alongside them.
type Kernel struct {
	h            *netlink.Handle
	addrs        *addrSocket    // raw rtnetlink for addresses (IFA_PROTO)
	dump         *dumpSocket    // reads: links, addresses, routes, rules
	parallelDump *dumpSocket    // Observe's second dump socket: dumps run on both at once
	cache        *observedCache // Observe's links and foreign rules, for Conflicts
	ns           netns.NsHandle // sysctls are per namespace: written from a thread inside it
	stateDir     string         // where rp_filter originals are recorded (e.g. /run/dualhomed)
	cfg          Config

	// addrProto is true when the kernel records IFA_PROTO (Linux 5.18+), so
	// our addresses carry cfg.Protocol like our routes and rules. Otherwise
	// the addresses we add are recorded in stateDir/addresses.json.
	addrProto bool

	// ConflictPaths are the files and directories Conflicts inspects; tests
	// point them into a temporary directory.
	ConflictPaths ConflictPaths

	mu sync.Mutex // serialises writes: Apply, and the state files

	// shadowed holds our rules that a lookalike precedes in the kernel's
	// list, as the last rule dump found them (see ruleScan): Apply does not
	// delete them.
	shadowed atomic.Pointer[map[Rule]bool]
}

// NewKernel returns a Kernel acting in namespace ns (netns.None() for the
// caller's namespace), recording state under stateDir. The Kernel keeps its
// own duplicate of ns: the caller may close ns afterwards.
func NewKernel(ns netns.NsHandle, stateDir string, cfg Config) (*Kernel, error) {
	// Ownership depends on these numbers: a kernel protocol value or a band
	// over the main table would make us claim objects that are not ours.
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("creating kernel: %w", err)
	}
	if stateDir == "" {
		return nil, errors.New("creating kernel: empty state directory")
	}
	own := netns.None()
	if ns.IsOpen() {
		fd, err := unix.FcntlInt(uintptr(ns), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("duplicating namespace handle: %w", err)
		}
		own = netns.NsHandle(fd)
	}
	h, err := netlink.NewHandleAt(own, unix.NETLINK_ROUTE)
	if err != nil {
		own.Close()
		return nil, fmt.Errorf("opening netlink handle: %w", err)
	}
	sock, err := nl.GetNetlinkSocketAt(own, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		h.Close()
		own.Close()
		return nil, fmt.Errorf("opening address netlink socket: %w", err)
	}
	// A kernel that never answers must not hang the daemon: each send and
	// receive gives up after netlinkTimeout and the reconcile is retried.
	tv := unix.NsecToTimeval(netlinkTimeout.Nanoseconds())
	err = errors.Join(h.SetSocketTimeout(netlinkTimeout), sock.SetSendTimeout(&tv), sock.SetReceiveTimeout(&tv))
	if err != nil {
		h.Close()
		sock.Close()
		own.Close()
		return nil, fmt.Errorf("setting netlink timeouts: %w", err)
	}
	dump, err := newDumpSocket(own)
	if err != nil {
		h.Close()
		sock.Close()
		own.Close()
		return nil, err
	}
	parallelDump, err := newDumpSocket(own)
	if err != nil {
		dump.close()
		h.Close()
		sock.Close()
		own.Close()
		return nil, err
	}
	return &Kernel{
		h:             h,
		addrs:         newAddrSocket(sock),
		dump:          dump,
		parallelDump:  parallelDump,
		cache:         newObservedCache(own),
		ns:            own,
		stateDir:      stateDir,
		cfg:           cfg,
		addrProto:     kernelHasAddrProto(),
		ConflictPaths: DefaultConflictPaths(),
	}, nil
}

// kernelHasAddrProto reports whether the running kernel stores IFA_PROTO
// (added in Linux 5.18). Older kernels silently ignore the attribute rather
// than reject it, so probing by adding an address would prove nothing: the
// release number is the reliable signal.
func kernelHasAddrProto() bool {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return false
	}
	major, minor, ok := parseRelease(unix.ByteSliceToString(u.Release[:]))
	return ok && (major > 5 || major == 5 && minor >= 18)
}

// parseRelease reads "6.18.44-fc" as 6, 18.
func parseRelease(r string) (major, minor int, ok bool) {
	parts := strings.SplitN(r, ".", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	major, err1 := strconv.Atoi(parts[0])
	digits := strings.IndexFunc(parts[1], func(c rune) bool { return c < '0' || c > '9' })
	if digits >= 0 {
		parts[1] = parts[1][:digits]
	}
	minor, err2 := strconv.Atoi(parts[1])
	return major, minor, err1 == nil && err2 == nil
}

// Close releases the netlink sockets and the namespace handle.
func (k *Kernel) Close() {
	k.h.Close()
	k.addrs.close()
	k.dump.close()
	k.parallelDump.close()
	k.cache.close()
	if k.ns.IsOpen() {
		k.ns.Close()
	}
}

// AddrOwnershipInKernel reports whether address ownership is read from the
// kernel (IFA_PROTO) rather than from the state file.
func (k *Kernel) AddrOwnershipInKernel() bool { return k.addrProto }

// retryDump calls dump until it is not interrupted by a concurrent change
// (netlink.ErrDumpInterrupted, whose data may be inconsistent), at most
// maxDumpAttempts times.
func retryDump[T any](what string, dump func() ([]T, error)) ([]T, error) {
	var err error
	for range maxDumpAttempts {
		var v []T
		v, err = dump()
		if err == nil {
			return v, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return nil, fmt.Errorf("listing %s: %w", what, err)
		}
	}
	return nil, fmt.Errorf("listing %s: interrupted %d times: %w", what, maxDumpAttempts, err)
}

// Observe lists links, every address on them whoever put it there, and the
// state dualhomed owns (Owned), as Desired's contract asks: Desired treats an
// address as foreign unless Observed.Owned lists it. One address dump serves
// both.
func (k *Kernel) Observe() (obs Observed, err error) {
	// Conflicts, which follows in a reconcile, reuses the links, routes and
	// foreign rules read here while the kernel reports no change to them.
	var foreign []netlink.Rule
	var routes []rawRoute
	k.cache.begin()
	defer func() { k.cache.end(obs.Links, routes, foreign, err == nil) }()

	var (
		links            []Link
		rpFilters        map[string]int
		addrs4, addrs6   []kernelAddr
		routes4, routes6 []rawRoute
		rules            = make([]Rule, 0, k.dump.ruleHint.Load())
	)
	// Costliest first, as measured at full scale (BenchmarkObserveParts):
	// rules 0.49 ms, IPv6 routes 0.36 (every table but local: ours and what
	// Conflicts checks), IPv4 addresses 0.29, IPv4 routes 0.24, IPv6
	// addresses 0.21, links 0.06.
	err = k.dumpInParallel(
		func(d *dumpSocket) error {
			scan := k.newRuleScan()
			defer scan.done()
			return d.rules(scan.ours, func(r ruleSummary) { rules = append(rules, fromRuleSummary(r)) },
				func(r netlink.Rule) { foreign = append(foreign, r) },
				func() { rules, foreign = rules[:0], foreign[:0]; scan.reset() })
		},
		func(d *dumpSocket) (err error) { routes6, err = d.routesExceptLocal(unix.AF_INET6); return err },
		func(d *dumpSocket) (err error) { addrs4, err = d.addrs(unix.AF_INET); return err },
		func(d *dumpSocket) (err error) { routes4, err = d.routesExceptLocal(unix.AF_INET); return err },
		func(d *dumpSocket) (err error) { addrs6, err = d.addrs(unix.AF_INET6); return err },
		func(d *dumpSocket) (err error) { links, rpFilters, err = d.links(); return err },
	)
	if err != nil {
		return Observed{}, err
	}
	k.dump.ruleHint.Store(int64(len(rules)))
	routes = append(routes4, routes6...) // as one dump of both families lists them

	// Each family's addresses come by link: IPv4 first, as one dump of both
	// families lists them.
	addrs := [][]kernelAddr{addrs4, addrs6}
	perLink := map[int]int{}
	for _, family := range addrs {
		for _, a := range family {
			perLink[a.LinkIndex]++
		}
	}
	byLink := make(map[int][]netip.Prefix, len(perLink))
	for _, family := range addrs {
		for _, a := range family {
			ps := byLink[a.LinkIndex]
			if ps == nil {
				ps = make([]netip.Prefix, 0, perLink[a.LinkIndex])
			}
			byLink[a.LinkIndex] = append(ps, a.Prefix)
		}
	}
	var ownedRoutes []Route
	for _, r := range routes {
		if k.ownsRoute(r) {
			ownedRoutes = append(ownedRoutes, r.toRoute())
		}
	}
	currentRPFilters := func() (map[string]int, error) { return rpFilters, nil }
	owned, err := k.owned(rules, addrs, ownedRoutes, currentRPFilters)
	if err != nil {
		return Observed{}, err
	}
	return Observed{Links: links, Addrs: byLink, Owned: owned}, nil
}

// dumpInParallel runs dumps on the two dump sockets at once, each socket
// taking the next dump of the list as it finishes one, and returns the first
// error. The dumps must not share variables.
//
// Why: nearly all of Observe's time is the kernel filling dump messages, in
// the system call of the socket that asked. Two sockets are filled on two
// cores; with the costliest dumps first, both finish at about the same time.
func (k *Kernel) dumpInParallel(dumps ...func(*dumpSocket) error) error {
	var next atomic.Int32
	work := func(d *dumpSocket) error {
		for {
			i := int(next.Add(1)) - 1
			if i >= len(dumps) {
				return nil
			}
			if err := dumps[i](d); err != nil {
				next.Store(int32(len(dumps))) // no more for either socket
				return err
			}
		}
	}
	errc := make(chan error, 1)
	go func() { errc <- work(k.parallelDump) }()
	err := work(k.dump)
	if err2 := <-errc; err == nil { // never leave a dump running
		err = err2
	}
	return err
}

// ownsRoute: our protocol, in the main table or our band.
func (k *Kernel) ownsRoute(r rawRoute) bool {
	return r.Protocol == netlink.RouteProtocol(k.cfg.Protocol) && (r.Table == MainTable || k.inTableBand(r.Table))
}

func (k *Kernel) ownsAddr(a kernelAddr, recorded map[addrRecord]bool) bool {
	if k.addrProto {
		return a.Proto == k.cfg.Protocol
	}
	return recorded[addrRecord{Link: a.LinkIndex, Prefix: a.Prefix.String()}]
}

func (k *Kernel) inTableBand(table int) bool {
	return table >= k.cfg.TableBase && table < k.cfg.TableBase+k.cfg.CardStride*MaxNetworkCards
}

func (k *Kernel) inPriorityBand(prio int) bool {
	return prio >= k.cfg.PriorityBase && prio < k.cfg.PriorityBase+k.cfg.CardStride*MaxNetworkCards
}

// Owned reads exactly the objects dualhomed owns: routes carrying cfg.Protocol
// in our table band or in the main table, rules carrying cfg.Protocol in our
// priority band (IPv4 and IPv6), addresses carrying cfg.Protocol in IFA_PROTO
// (or recorded in the state file on kernels without it), and the current
// rp_filter of every link whose original value we recorded.
func (k *Kernel) Owned() (State, error) {
	var rules []Rule
	scan := k.newRuleScan()
	err := k.dump.rules(scan.ours, func(r ruleSummary) { rules = append(rules, fromRuleSummary(r)) }, nil, func() { rules = rules[:0]; scan.reset() })
	scan.done()
	if err != nil {
		return State{}, err
	}
	addrs, err := k.dump.addrs(unix.AF_UNSPEC)
	if err != nil {
		return State{}, err
	}
	// The kernel filters by protocol (strict checking): only ours come.
	routes, err := k.dump.ownedRoutes(k.cfg.Protocol, func(table int) bool {
		return table == MainTable || k.inTableBand(table)
	})
	if err != nil {
		return State{}, err
	}
	currentRPFilters := func() (map[string]int, error) {
		_, rpFilters, err := k.dump.links()
		return rpFilters, err
	}
	return k.owned(rules, [][]kernelAddr{addrs}, routes, currentRPFilters)
}

// owned is Owned with the rules, addresses (every one, in one or more slices)
// and routes already dumped; the rules and routes are ours. currentRPFilters
// is as ownedRPFilters takes it.
func (k *Kernel) owned(rules []Rule, allAddrs [][]kernelAddr, routes []Route, currentRPFilters func() (map[string]int, error)) (State, error) {
	st := State{Rules: rules, Routes: routes}
	var err error
	if st.Addrs, err = k.ownedAddrs(allAddrs...); err != nil {
		return State{}, err
	}
	if st.RPFilters, err = k.ownedRPFilters(currentRPFilters); err != nil {
		return State{}, err
	}
	st.Sort()
	return st, nil
}

// ruleScan decides the ownership of rules in the kernel's list order, and
// notes which of our rules a lookalike comes before: a rule with our
// protocol, priority, source and table plus a selector we never set (see
// ruleSummary.Selectors). The kernel deletes the first rule in its list that
// matches what a delete request names, and a request cannot say "no fwmark",
// so deleting such a rule of ours would delete the lookalike instead.
type ruleScan struct {
	k          *Kernel
	lookalikes map[Rule]bool
	shadowed   map[Rule]bool
}

func (k *Kernel) newRuleScan() *ruleScan {
	return &ruleScan{k: k, lookalikes: map[Rule]bool{}, shadowed: map[Rule]bool{}}
}

func (s *ruleScan) ours(r ruleSummary) bool {
	if !s.k.oursOrLookalike(r) {
		return false
	}
	key := fromRuleSummary(r)
	if r.Selectors {
		s.lookalikes[key] = true
		return false
	}
	if s.lookalikes[key] {
		s.shadowed[key] = true
	}
	return true
}

func (s *ruleScan) reset() { clear(s.lookalikes); clear(s.shadowed) }

// done publishes the shadowed rules for Apply.
func (s *ruleScan) done() { s.k.shadowed.Store(&s.shadowed) }

// ownsRule: our protocol in our priority band, and no selector dualhomed
// never sets (see ruleSummary.Selectors).
func (k *Kernel) ownsRule(r ruleSummary) bool {
	return k.oursOrLookalike(r) && !r.Selectors
}

// oursOrLookalike: our protocol in our priority band, selectors or not.
func (k *Kernel) oursOrLookalike(r ruleSummary) bool {
	return r.Protocol == k.cfg.Protocol && k.inPriorityBand(r.Priority)
}

func fromRuleSummary(r ruleSummary) Rule {
	src := r.Src
	if !src.IsValid() {
		src = prefixOf(nil, r.Family)
	}
	return Rule{Priority: r.Priority, Src: src, Table: r.Table}
}

// ownedNetlinkRoutes lists our routes as vishvananda/netlink reports them,
// every attribute kept, for re-adding them as they were (readdAddr4).
func (k *Kernel) ownedNetlinkRoutes() ([]netlink.Route, error) {
	filter := &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: netlink.RouteProtocol(k.cfg.Protocol)}
	all, err := retryDump("routes", func() ([]netlink.Route, error) {
		return k.h.RouteListFiltered(netlink.FAMILY_ALL, filter, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	})
	if err != nil {
		return nil, err
	}
	var out []netlink.Route
	for _, r := range all {
		if r.Table == MainTable || k.inTableBand(r.Table) {
			out = append(out, r)
		}
	}
	return out, nil
}

// ownedAddrs picks ours among every address dumped (in one or more slices).
func (k *Kernel) ownedAddrs(all ...[]kernelAddr) ([]Addr, error) {
	var recorded map[addrRecord]bool
	var err error
	if !k.addrProto {
		if recorded, err = k.addrRecords(); err != nil {
			return nil, err
		}
	}
	n := 0
	for _, part := range all {
		n += len(part)
	}
	out := make([]Addr, 0, n)
	for _, part := range all {
		for _, a := range part {
			if k.ownsAddr(a, recorded) {
				out = append(out, Addr{
					LinkIndex:     a.LinkIndex,
					Prefix:        a.Prefix,
					NoPrefixRoute: a.Flags&unix.IFA_F_NOPREFIXROUTE != 0,
				})
			}
		}
	}
	return out, nil
}

func prefixOf(n *net.IPNet, family int) netip.Prefix {
	if n == nil {
		if family == unix.AF_INET6 {
			return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	ip, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), ones)
}

func addrOf(ip net.IP) netip.Addr {
	if ip == nil {
		return netip.Addr{}
	}
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ipOf(a netip.Addr) net.IP {
	if !a.IsValid() {
		return nil
	}
	return a.AsSlice()
}

func fromNetlinkRoute(r netlink.Route) Route {
	return Route{
		Table:     r.Table,
		Dst:       prefixOf(r.Dst, r.Family),
		Gateway:   addrOf(r.Gw),
		LinkIndex: r.LinkIndex,
		Src:       addrOf(r.Src),
		ScopeLink: r.Scope == netlink.SCOPE_LINK,
	}
}

// netlinkRoute is the route r as we add it: `ip route add <dst> [via <gw>] dev
// <link> [src <src>] [scope link] table <table> proto <protocol>`.
func (k *Kernel) netlinkRoute(r Route) *netlink.Route {
	nr := &netlink.Route{
		Table:     r.Table,
		Dst:       ipNet(r.Dst),
		Gw:        ipOf(r.Gateway),
		Src:       ipOf(r.Src),
		LinkIndex: r.LinkIndex,
		Protocol:  netlink.RouteProtocol(k.cfg.Protocol),
		Scope:     netlink.SCOPE_UNIVERSE,
		Type:      unix.RTN_UNICAST,
	}
	if r.ScopeLink {
		nr.Scope = netlink.SCOPE_LINK
	}
	return nr
}

// netlinkRule is `ip rule add from <src> lookup <table> priority <prio>
// protocol <protocol>`, always built from netlink.NewRule(): a zero Rule
// fails with EINVAL or silently gains suppress_prefixlength 0.
func (k *Kernel) netlinkRule(r Rule) *netlink.Rule {
	nr := netlink.NewRule()
	nr.Priority = r.Priority
	nr.Table = r.Table
	nr.Protocol = k.cfg.Protocol
	nr.Family = unix.AF_INET
	if r.Src.Addr().Is6() {
		nr.Family = unix.AF_INET6
	}
	if r.Src.Bits() > 0 {
		nr.Src = ipNet(r.Src)
	}
	return nr
}
