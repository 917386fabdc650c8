package netcfg

import (
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// observedCache keeps the links and foreign rules that the latest Observe
// dumped, for the Conflicts check that follows it in the same reconcile.
//
// Why: the rule dump is the costliest read of a reconcile at full scale
// (about 1,500 rules, which the kernel cannot filter by protocol), and
// Conflicts used to dump rules and links again a millisecond after Observe.
//
// It is only used while provably current: a socket subscribed to the
// kernel's link and rule notifications is drained before Observe dumps, and
// any notification since (a foreign change, or our own Apply) makes Conflicts
// dump afresh. Without that socket the cache is never used.
type observedCache struct {
	mu      sync.Mutex
	notify  int // rtnetlink socket in the link and rule groups; -1 if unavailable
	valid   bool
	links   []Link
	foreign []netlink.Rule
}

// rtnlGroupBit is the bind(2) group mask bit of an RTNLGRP_* group.
func rtnlGroupBit(group uint) uint32 { return 1 << (group - 1) }

func newObservedCache(ns netns.NsHandle) *observedCache {
	c := &observedCache{notify: -1}
	var fd int
	err := inNamespace(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return c // not fatal: Conflicts dumps for itself
	}
	groups := rtnlGroupBit(unix.RTNLGRP_LINK) | rtnlGroupBit(unix.RTNLGRP_IPV4_RULE) | rtnlGroupBit(unix.RTNLGRP_IPV6_RULE)
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
// announced any link or rule change (or the socket overflowed) since the
// last drain. Called with c.mu held.
func (c *observedCache) changed() bool {
	if c.notify < 0 {
		return true
	}
	var buf [4096]byte
	seen := false
	for {
		n, _, err := unix.Recvfrom(c.notify, buf[:], unix.MSG_DONTWAIT)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return seen
		case err != nil: // ENOBUFS: notifications were lost
			seen = true
			continue
		case n > 0:
			seen = true
		}
	}
}

// begin starts an Observe: later notifications are news. It returns with
// c.mu held; end releases it.
func (c *observedCache) begin() {
	c.mu.Lock()
	c.changed()
	c.valid = false
}

// end records what Observe dumped, unless the kernel changed meanwhile.
func (c *observedCache) end(links []Link, foreign []netlink.Rule, ok bool) {
	defer c.mu.Unlock()
	if !ok || c.changed() {
		return
	}
	c.links, c.foreign, c.valid = slices.Clone(links), foreign, true
}

// get returns the cached links and foreign rules if no link or rule changed
// since they were dumped. The caller must not modify them.
func (c *observedCache) get() (links []Link, foreign []netlink.Rule, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.valid && c.changed() {
		c.valid = false
	}
	return c.links, c.foreign, c.valid
}
