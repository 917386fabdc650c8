package netcfg

import (
	"context"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/netcfg/nsthread"
)

// KernelChange is what one kernel notification means to dualhomed.
type KernelChange int

const (
	LinkChanged KernelChange = iota + 1 // a link appeared, went or changed (up, down, renamed)
	AddrChanged                         // an address was added or deleted
	// OwnedDeleted: a route or rule carrying our protocol was deleted, or
	// our nftables table changed (drift).
	OwnedDeleted
	// ForeignDeleted: another program's route or rule was deleted; an add
	// of ours that it held out may fit now.
	ForeignDeleted
	// OtherChanged: anything else Observe reads changed (a route or rule
	// added, ours included; an IPv4 device setting such as rp_filter).
	OtherChanged
	// Resync: notifications were lost (the socket overflowed, or it was
	// opened again after an error): anything may have changed.
	Resync
)

// watchGroups are the rtnetlink groups Watch listens to, group g as bit
// g-1. Deleting an IPv4 address flushes the routes using it without a
// route notification: the address groups cover that too.
const watchGroups = 1<<(unix.RTNLGRP_LINK-1) | 1<<(unix.RTNLGRP_IPV4_IFADDR-1) | 1<<(unix.RTNLGRP_IPV6_IFADDR-1) |
	1<<(unix.RTNLGRP_IPV4_ROUTE-1) | 1<<(unix.RTNLGRP_IPV6_ROUTE-1) | 1<<(unix.RTNLGRP_IPV4_RULE-1) |
	1<<(unix.RTNLGRP_IPV6_RULE-1) | 1<<(unix.RTNLGRP_IPV4_NETCONF-1)

// watchBuffer is the notification socket's receive buffer: large enough for
// the burst of notifications when many ENIs and their addresses appear at
// once at boot, or a cold apply writes 3,000 objects (each address also
// brings a local-table route notification).
const watchBuffer = 1 << 20

// Watch calls fn with every change the kernel announces in k's namespace,
// one call per notification, until ctx ends: rtnetlink's (the local table's
// routes aside: one per address, which nothing reads) and nftables' about
// our table. It is the daemon's one kernel change feed, parsed like
// Observe's reads, on two sockets. After a receive error it opens a socket
// again, after a pause that doubles from 1 s to 30 s (reset once it has
// worked for a minute), reports the error and the pause to lost first, and
// Resync to fn once listening again. It returns at once; fn and lost are
// called from its goroutines.
func (k *Kernel) Watch(ctx context.Context, fn func(KernelChange), lost func(err error, retryIn time.Duration)) {
	go k.feed(ctx, unix.NETLINK_ROUTE, watchGroups, k.cfg.change, fn, lost)
	go k.feed(ctx, unix.NETLINK_NETFILTER, 1<<(unix.NFNLGRP_NFTABLES-1), natChange, fn, lost)
}

// feed listens to one socket, and again after each failure, until ctx ends.
func (k *Kernel) feed(ctx context.Context, proto int, groups uint32, change func(typ uint16, m []byte) KernelChange, fn func(KernelChange), lost func(error, time.Duration)) {
	backoff := time.Second
	for resync := false; ; resync = true {
		began := time.Now()
		err := k.watch(ctx, proto, groups, change, fn, resync)
		if ctx.Err() != nil {
			return
		}
		if time.Since(began) > time.Minute {
			backoff = time.Second // it worked for a while: a fresh failure
		}
		lost(err, backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// watch listens on one socket until ctx ends or the socket fails, and
// calls fn with change's meaning of each notification (none for 0).
func (k *Kernel) watch(ctx context.Context, proto int, groups uint32, change func(typ uint16, m []byte) KernelChange, fn func(KernelChange), resync bool) error {
	var fd int
	err := nsthread.Do(k.ns, func() (err error) {
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, proto)
		return err
	})
	if err != nil {
		return fmt.Errorf("opening netlink notification socket: %w", err)
	}
	// Non-blocking under the runtime's poller: closing the file ends a read.
	f := os.NewFile(uintptr(fd), "netlink notifications")
	defer f.Close()
	// Past net.core.rmem_max as root; else capped by it. Not fatal either way.
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, watchBuffer) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, watchBuffer)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		return fmt.Errorf("subscribing to netlink notifications: %w", err)
	}
	defer context.AfterFunc(ctx, func() { f.Close() })()
	conn, err := f.SyscallConn()
	if err != nil {
		return err
	}
	if resync {
		fn(Resync)
	}
	buf := make([]byte, dumpBufferSize)
	for {
		var n int
		var from unix.Sockaddr
		var rerr error
		if err := conn.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), buf, 0)
			return rerr != unix.EAGAIN
		}); err != nil {
			return fmt.Errorf("receiving netlink notifications: %w", err)
		}
		switch sa, _ := from.(*unix.SockaddrNetlink); {
		case rerr == unix.ENOBUFS:
			fn(Resync) // the socket overflowed: notifications were lost
		case rerr == unix.EINTR:
		case rerr != nil:
			return fmt.Errorf("receiving netlink notifications: %w", rerr)
		case sa != nil && sa.Pid == 0: // the kernel's, not another process's
			for h, m := range messages(buf[:n]) {
				if m == nil {
					fn(Resync) // cannot happen; if it does, look at everything
					break
				}
				if ch := change(h.Type, m); ch != 0 {
					fn(ch)
				}
			}
		}
	}
}

// natChange is OwnedDeleted for an nftables notification about our table:
// any change of it by another program is drift to repair at once (our own
// writes come back too, and cost one reconcile that finds nothing to do).
func natChange(typ uint16, m []byte) KernelChange {
	change := KernelChange(0)
	if typ>>8 == unix.NFNL_SUBSYS_NFTABLES && len(m) >= 4 && m[0] == unix.NFPROTO_INET {
		// The first attribute of a table, chain, rule, set... message
		// names its table.
		forEachAttr(m[4:], func(t uint16, v []byte) {
			if t == 1 && unix.ByteSliceToString(v) == NATTableName {
				change = OwnedDeleted
			}
		})
	}
	return change
}

// change classifies one notification; 0 means it changes nothing Observe
// reads.
func (c Config) change(typ uint16, m []byte) KernelChange {
	switch typ {
	case unix.RTM_NEWLINK, unix.RTM_DELLINK:
		return LinkChanged
	case unix.RTM_NEWADDR, unix.RTM_DELADDR:
		return AddrChanged
	case unix.RTM_NEWNETCONF, unix.RTM_DELNETCONF:
		return OtherChanged
	case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
		r, ok := parseRoute(m)
		return deletion(ok, typ == unix.RTM_DELROUTE, r.Protocol == c.Protocol)
	case unix.RTM_NEWRULE, unix.RTM_DELRULE:
		r, ok := parseRule(m)
		return deletion(ok, typ == unix.RTM_DELRULE, c.ourRuleBand(r))
	}
	return 0
}

func deletion(parsed, deleted, ours bool) KernelChange {
	switch {
	case !parsed:
		return 0
	case !deleted:
		return OtherChanged
	case ours:
		return OwnedDeleted
	}
	return ForeignDeleted
}
