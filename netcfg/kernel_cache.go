package netcfg

import (
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/netcfg/nsthread"
)

// observedCache keeps the links, routes (all but the local table's) and
// foreign rules that the latest Observe dumped, for the Conflicts check that
// follows it in the same reconcile.
//
// Why: Conflicts used to dump rules, links and routes again a millisecond
// after Observe had, and these are the costliest reads of a reconcile at full
// scale: about 1,500 rules (the kernel cannot filter them by protocol) and
// 3,000 routes (the local table's, one per address, which the kernel cannot
// leave out either).
//
// It is only used while provably current: a socket subscribed to the
// kernel's link, address, route, rule and IPv4 netconf notifications is drained before
// Observe dumps, and any notification since (a foreign change, or our own
// Apply) makes Conflicts dump afresh; only the local table's route
// notifications are ignored, as Conflicts never reads that table. Without
// that socket the cache is never used.
type observedCache struct {
	mu      sync.Mutex
	notify  int // rtnetlink socket in the link, address, route and rule groups; -1 if unavailable
	valid   bool
	links   []Link
	routes  []rawRoute // every table but local
	foreign []netlink.Rule
	buf     []byte // for draining notify: allocated once, not twice per Observe
}

// rtnlGroupBit is the bind(2) group mask bit of an RTNLGRP_* group.
func rtnlGroupBit(group uint) uint32 { return 1 << (group - 1) }

func newObservedCache(ns netns.NsHandle) *observedCache {
	c := &observedCache{notify: -1}
	var fd int
	err := nsthread.Do(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return c // not fatal: Conflicts dumps for itself
	}
	groups := rtnlGroupBit(unix.RTNLGRP_LINK) | rtnlGroupBit(unix.RTNLGRP_IPV4_RULE) | rtnlGroupBit(unix.RTNLGRP_IPV6_RULE) |
		rtnlGroupBit(unix.RTNLGRP_IPV4_ROUTE) | rtnlGroupBit(unix.RTNLGRP_IPV6_ROUTE) |
		// Deleting an IPv4 address flushes the routes using it without a
		// route notification: any address change counts as a route change.
		rtnlGroupBit(unix.RTNLGRP_IPV4_IFADDR) | rtnlGroupBit(unix.RTNLGRP_IPV6_IFADDR) |
		// rp_filter changes come as RTM_NEWNETCONF (Unchanged must see them).
		rtnlGroupBit(unix.RTNLGRP_IPV4_NETCONF)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		unix.Close(fd)
		return c
	}
	c.notify = fd
	return c
}

func (c *observedCache) close() {
	if c.notify >= 0 {
		unix.Close(c.notify)
	}
}

// changed drains the notification socket and reports whether the kernel
// announced any change to links, addresses, rules or routes outside the local table (or
// the socket overflowed) since the last drain. Called with c.mu held.
func (c *observedCache) changed() bool {
	if c.notify < 0 {
		return true
	}
	if c.buf == nil {
		c.buf = make([]byte, 16<<10)
	}
	seen := false
	for {
		n, _, err := unix.Recvfrom(c.notify, c.buf, unix.MSG_DONTWAIT)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return seen
		case err != nil: // ENOBUFS: notifications were lost
			seen = true
			continue
		}
		if !seen && notifiesChange(c.buf[:n]) {
			seen = true
		}
	}
}

// notifiesChange reports whether the notifications in b announce anything
// but a route of the local table.
func notifiesChange(b []byte) bool {
	ne := nl.NativeEndian()
	for len(b) >= unix.SizeofNlMsghdr {
		l := int(ne.Uint32(b[0:4]))
		if l < unix.SizeofNlMsghdr || l > len(b) {
			return true
		}
		typ, m := ne.Uint16(b[4:6]), b[unix.SizeofNlMsghdr:l]
		local := (typ == unix.RTM_NEWROUTE || typ == unix.RTM_DELROUTE) &&
			len(m) >= unix.SizeofRtMsg && m[rtmTable] == unix.RT_TABLE_LOCAL
		if !local {
			return true
		}
		b = b[nlmAlign(l):]
	}
	return false
}

// begin starts an Observe: later notifications are news. It returns with
// c.mu held; end releases it.
func (c *observedCache) begin() {
	c.mu.Lock()
	c.changed()
	c.valid = false
}

// end records what Observe dumped, unless the kernel changed meanwhile.
func (c *observedCache) end(links []Link, routes []rawRoute, foreign []netlink.Rule, ok bool) {
	defer c.mu.Unlock()
	if !ok || c.changed() {
		return
	}
	c.links, c.routes, c.foreign, c.valid = slices.Clone(links), routes, foreign, true
}

// get returns the cached links, routes and foreign rules if none of them
// changed since they were dumped. The caller must not modify them.
func (c *observedCache) get() (links []Link, routes []rawRoute, foreign []netlink.Rule, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.valid && c.changed() {
		c.valid = false
	}
	return c.links, c.routes, c.foreign, c.valid
}
