package netcfg

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"sort"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Apply makes the plan's changes and returns the number of writes it sent to
// the kernel (netlink requests and sysctl writes, successful or not; a
// rp_filter already at its value costs none). EEXIST on add and ENOENT, ESRCH,
// EADDRNOTAVAIL (and ENODEV: the link went away with its objects) on delete
// count as success, so every step is idempotent.
//
// Make before break: every addition (rp_filter settings and replacements
// included) runs before any deletion, and if an addition fails no deletion
// runs at all — unless it failed only because its link is down: nothing can
// use that link until it comes up, and waiting for it must not keep other
// links' stale state forever (the error is still returned); or the kernel
// refused it (Refused): then only the deletions in its table wait, and the
// others, which cannot depend on it, run.
//
// Otherwise the plan's order is kept: Diff puts each object after what it
// depends on. An error on one object does not stop the others: Apply
// returns all errors joined.
func (k *Kernel) Apply(p Plan) (writes int, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()

	adds := slices.DeleteFunc(slices.Clone(p.Ops), func(op Op) bool { return op.Delete })
	dels := slices.DeleteFunc(slices.Clone(p.Ops), func(op Op) bool { return !op.Delete })

	var errs []error
	blocking := 0                   // failed additions that forbid deletions
	refusedTables := map[int]bool{} // tables of Refused additions
	if err := k.pruneAddrRecords(); err != nil {
		errs = append(errs, err)
		blocking++
	}
	if slices.ContainsFunc(p.Ops, func(op Op) bool { return op.AltName != nil }) {
		if err := k.pruneAltNameRecords(); err != nil {
			errs = append(errs, err)
			blocking++
		}
	}
	for _, op := range adds {
		n, err := k.applyOp(op)
		writes += n
		if err == nil {
			continue
		}
		if idx := opLink(op); idx != 0 && k.linkDown(idx) {
			err = fmt.Errorf("%w (link #%d is down: its routes wait for it to come up)", err, idx)
		} else if op.Route != nil && errors.Is(err, unix.ENETUNREACH) {
			err = &Refused{Op: op, Err: err}
			refusedTables[op.Route.Table] = true
		} else {
			blocking++
		}
		errs = append(errs, err)
	}
	if blocking > 0 {
		if len(dels) > 0 {
			errs = append(errs, fmt.Errorf("skipping %d deletions because an addition failed (make before break)", len(dels)))
		}
		return writes, errors.Join(errs...)
	}
	held := 0
	for _, op := range dels {
		if (op.Route != nil && refusedTables[op.Route.Table]) || (op.Rule != nil && refusedTables[op.Rule.Table]) {
			held++
			continue
		}
		n, err := k.applyOp(op)
		writes += n
		if err != nil {
			errs = append(errs, err)
		}
	}
	if held > 0 {
		errs = append(errs, fmt.Errorf("skipping %d deletions in the table of a refused addition (make before break)", held))
	}
	return writes, errors.Join(errs...)
}

// Refused is an addition of a route the kernel refused with ENETUNREACH:
// no route of its table reaches its gateway (amazon-ec2-net-utils moves a
// secondary ENI's subnet route out of main). Trying again cannot help
// until the kernel's routes or links change, and deletions outside its
// table do not depend on it.
type Refused struct {
	Op  Op
	Err error
}

func (e *Refused) Error() string { return e.Err.Error() }
func (e *Refused) Unwrap() error { return e.Err }

// Reason says why the kernel refused the route: `network is unreachable: no
// route in table 254 reaches 10.1.1.1`.
func (e *Refused) Reason() string {
	r := e.Op.Route
	return fmt.Sprintf("%v: no route in table %d reaches %v", unix.ENETUNREACH, r.Table, r.Gateway)
}

// Refusals splits an error of Apply into the additions the kernel refused
// and the other errors (nil when there are none).
func Refusals(err error) (refused []*Refused, rest error) {
	errs := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	}
	var others []error
	for _, e := range errs {
		if r, ok := e.(*Refused); ok {
			refused = append(refused, r)
		} else if e != nil {
			others = append(others, e)
		}
	}
	return refused, errors.Join(others...)
}

// opLink is the link index an addition needs, 0 for none (rules, rp_filter).
func opLink(op Op) int {
	switch {
	case op.Route != nil:
		return op.Route.LinkIndex
	case op.Addr != nil:
		return op.Addr.LinkIndex
	}
	return 0
}

// linkDown reports whether link idx exists but is administratively down or
// has no carrier: the kernel then refuses routes through it (ENETDOWN,
// ENETUNREACH) and removes IPv4 ones. Nothing of ours can use such a link
// until it comes up, so failing to add to it must not keep stale state of
// other links in place forever.
func (k *Kernel) linkDown(idx int) bool {
	l, err := k.h.LinkByIndex(idx)
	if err != nil {
		return false // gone or unreadable: a real failure
	}
	a := l.Attrs()
	return a.Flags&net.FlagUp == 0 || a.RawFlags&unix.IFF_LOWER_UP == 0
}

// applyOp makes one change and returns how many writes it sent.
func (k *Kernel) applyOp(op Op) (int, error) {
	switch {
	case op.Route != nil:
		return 1, k.applyRoute(op)
	case op.Rule != nil:
		return 1, k.applyRule(op)
	case op.Addr != nil:
		return k.applyAddr(op)
	case op.RPFilter != nil:
		return k.applyRPFilter(op)
	case op.AltName != nil:
		return 1, k.applyAltName(op)
	case op.NAT != nil:
		return k.applyNAT(op)
	default:
		return 0, errors.New("applying empty operation")
	}
}

// ignoreOnAdd treats "already there" as success.
func ignoreOnAdd(err error) error {
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}

// ignoreOnDelete treats "already gone" as success: ENOENT (rules), ESRCH
// (routes), EADDRNOTAVAIL (addresses), ENODEV (the link went away and took
// its routes and addresses with it).
func ignoreOnDelete(err error) error {
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) ||
		errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.ENODEV) {
		return nil
	}
	return err
}

func (k *Kernel) applyRoute(op Op) error {
	r := *op.Route
	nr := k.netlinkRoute(r)
	verb, err := "adding", error(nil)
	switch {
	case op.Delete:
		// Match our route whatever scope and type the kernel gave it; the
		// protocol keeps a foreign route with the same destination safe.
		nr.Type = 0
		if r.Dst.Addr().Is4() {
			nr.Scope = netlink.SCOPE_NOWHERE
		}
		verb, err = "deleting", ignoreOnDelete(k.h.RouteDel(nr))
	case op.Replace:
		verb, err = "replacing", k.h.RouteReplace(nr)
	default:
		err = ignoreOnAdd(k.h.RouteAdd(nr))
	}
	if err != nil {
		return fmt.Errorf("%s route %v: %w", verb, r, err)
	}
	return nil
}

func (k *Kernel) applyRule(op Op) error {
	r := *op.Rule
	if !op.Delete {
		if err := ignoreOnAdd(k.h.RuleAdd(k.netlinkRule(r))); err != nil {
			return fmt.Errorf("adding rule %v: %w", r, err)
		}
		return nil
	}
	if sh := k.shadowed.Load(); sh != nil && (*sh)[r] {
		return fmt.Errorf("not deleting rule %v: a rule with protocol %d, the same priority and table, source (or fwmark) and more selectors (fwmark, iif, ...) comes first in the kernel's list, and the kernel would delete that one instead; remove one of the two by hand (`ip rule show priority %d`)",
			r, k.cfg.Protocol, r.Priority)
	}
	if err := ignoreOnDelete(k.h.RuleDel(k.netlinkRule(r))); err != nil {
		return fmt.Errorf("deleting rule %v: %w", r, err)
	}
	return nil
}

func (k *Kernel) applyAddr(op Op) (int, error) {
	a := *op.Addr
	if op.Delete {
		if err := ignoreOnDelete(k.dump.delAddr(a)); err != nil {
			return 1, fmt.Errorf("deleting address %v: %w", a, err)
		}
		return 1, k.recordAddr(a, false)
	}
	proto := k.cfg.Protocol
	if !k.addrProto {
		proto = 0
	}
	if op.Replace {
		if a.Prefix.Addr().Is4() {
			return k.readdAddr4(a, proto)
		}
		if err := k.dump.addAddr(a, proto, true); err != nil {
			return 1, fmt.Errorf("replacing address %v: %w", a, err)
		}
		return 1, nil
	}
	switch err := k.dump.addAddr(a, proto, false); {
	case errors.Is(err, unix.EEXIST):
		return 1, nil // somebody else's address (or ours, already recorded): never claim it
	case err != nil:
		return 1, fmt.Errorf("adding address %v: %w", a, err)
	}
	return 1, k.recordAddr(a, true)
}

// readdAddr4 changes the noprefixroute flag of one of our IPv4 addresses.
// IPv4 `ip addr replace` keeps the old flags (seen on Linux 6.18), so the
// address is deleted and added again. Deleting an IPv4 address flushes the
// routes that use it as source, so our routes with that source are read
// first and added back at once.
func (k *Kernel) readdAddr4(a Addr, proto uint8) (writes int, err error) {
	obs, err := k.Observe()
	if err != nil {
		return 0, fmt.Errorf("replacing address %v: %w", a, err)
	}
	// Deleting a primary IPv4 address also deletes the secondary addresses
	// of its subnet (unless promote_secondaries): never risk another's.
	for _, o := range obs.Addrs[a.LinkIndex] {
		if o != a.Prefix && o.Bits() == a.Prefix.Bits() && o.Masked() == a.Prefix.Masked() {
			return 0, fmt.Errorf("replacing address %v: deleting it could take %v on the same subnet with it; change the noprefixroute flag by hand", a, o)
		}
	}
	writes++
	if err := ignoreOnDelete(k.dump.delAddr(a)); err != nil {
		return writes, fmt.Errorf("replacing address %v: deleting: %w", a, err)
	}
	writes++
	if err := ignoreOnAdd(k.dump.addAddr(a, proto, false)); err != nil {
		return writes, fmt.Errorf("replacing address %v: adding: %w", a, err)
	}
	// On-link routes first: a gateway must be reachable when its route is added.
	routes := obs.Owned.Routes
	sort.SliceStable(routes, func(i, j int) bool { return !routes[i].Gateway.IsValid() && routes[j].Gateway.IsValid() })
	var errs []error
	for _, r := range routes {
		if r.Src != a.Prefix.Addr() {
			continue
		}
		writes++
		if err := ignoreOnAdd(k.h.RouteAdd(k.netlinkRoute(r))); err != nil {
			errs = append(errs, fmt.Errorf("restoring route %s after replacing address %s: %w", r, a, err))
		}
	}
	return writes, errors.Join(errs...)
}

// Cleanup removes every object dualhomed owns and restores every rp_filter
// value it changed: it applies Diff(Observe().Owned, State{}). It returns
// the number of writes made.
func (k *Kernel) Cleanup() (writes int, err error) {
	obs, err := k.Observe()
	if err != nil {
		return 0, fmt.Errorf("reading owned state for cleanup: %w", err)
	}
	return k.Apply(Diff(obs.Owned, State{}))
}
