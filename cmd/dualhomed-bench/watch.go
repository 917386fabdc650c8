package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// watcher follows the namespace's links, rules, routes and addresses through
// an rtnetlink subscription: it knows the current set of rules (by ruleID)
// and the MACs of the links announced so far at every moment (to time when
// a rule or a link appears), and counts the changes a tool makes (to count
// writes made by a process we cannot instrument).
type watcher struct {
	h    *netlink.Handle
	sock *nl.NetlinkSocket

	mu      sync.Mutex
	rules   map[string]bool
	links   map[string]bool // MACs (net.HardwareAddr.String) of RTM_NEWLINK notifications
	changes changeCounts
	lost    int // buffer overruns: counts are unreliable when non-zero
	waiters []waiter
	closed  bool
	done    chan struct{}
}

// changeCounts are rtnetlink notifications of objects a tool writes: rules,
// routes not made by the kernel itself, and addresses.
type changeCounts struct{ Rules, Routes, Addrs int }

func (c changeCounts) Total() int { return c.Rules + c.Routes + c.Addrs }

func (c changeCounts) sub(d changeCounts) changeCounts {
	return changeCounts{c.Rules - d.Rules, c.Routes - d.Routes, c.Addrs - d.Addrs}
}

type waiter struct {
	cond func(rules map[string]bool) bool // called with the watcher's lock held
	done chan time.Time                   // receives the time of the notification that made cond true
}

// newWatcher subscribes inside ns and loads the current rules.
func newWatcher(ns *simworld.NS) (*watcher, error) {
	var sock *nl.NetlinkSocket
	err := ns.Do(func() (err error) {
		sock, err = nl.Subscribe(unix.NETLINK_ROUTE,
			unix.RTNLGRP_LINK,
			unix.RTNLGRP_IPV4_RULE, unix.RTNLGRP_IPV6_RULE,
			unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV6_ROUTE,
			unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV6_IFADDR)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("subscribing to rtnetlink: %w", err)
	}
	// A cold reconcile makes thousands of changes in a burst.
	if err := sock.SetReceiveBufferSize(64<<20, true); err != nil {
		sock.Close()
		return nil, fmt.Errorf("growing the rtnetlink receive buffer: %w", err)
	}
	w := &watcher{h: ns.NL, sock: sock, links: map[string]bool{}, done: make(chan struct{})}
	if err := w.resync(); err != nil {
		sock.Close()
		return nil, err
	}
	go w.loop()
	return w, nil
}

func (w *watcher) Close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	w.sock.Close()
	<-w.done
}

func (w *watcher) resync() error {
	rules := map[string]bool{}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := w.h.RuleList(fam)
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return fmt.Errorf("listing rules: %w", err)
		}
		for _, r := range rs {
			rules[ruleID(r)] = true
		}
	}
	w.mu.Lock()
	w.rules = rules
	w.wakeLocked(time.Now())
	w.mu.Unlock()
	return nil
}

func (w *watcher) loop() {
	defer close(w.done)
	for {
		msgs, _, err := w.sock.Receive()
		now := time.Now()
		w.mu.Lock()
		closed := w.closed
		if errors.Is(err, unix.ENOBUFS) {
			w.lost++
		}
		w.mu.Unlock()
		switch {
		case closed:
			return
		case errors.Is(err, unix.ENOBUFS):
			_ = w.resync()
			continue
		case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return
		}
		w.mu.Lock()
		for _, m := range msgs {
			w.handleLocked(m)
			// After each message: a rule deleted and re-added within one
			// batch must still be seen gone, then back.
			w.wakeLocked(now)
		}
		w.mu.Unlock()
	}
}

func (w *watcher) handleLocked(msg syscall.NetlinkMessage) {
	switch msg.Header.Type {
	case unix.RTM_NEWRULE, unix.RTM_DELRULE:
		w.changes.Rules++
		if id, ok := notifiedRuleID(msg.Data); ok && msg.Header.Type == unix.RTM_NEWRULE {
			w.rules[id] = true
		} else if ok {
			delete(w.rules, id)
		}
	case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
		if len(msg.Data) >= unix.SizeofRtMsg && nl.DeserializeRtMsg(msg.Data).Protocol != unix.RTPROT_KERNEL {
			w.changes.Routes++
		}
	case unix.RTM_NEWADDR, unix.RTM_DELADDR:
		w.changes.Addrs++
	case unix.RTM_NEWLINK:
		if len(msg.Data) < unix.SizeofIfInfomsg {
			return
		}
		attrs, _ := nl.ParseRouteAttr(msg.Data[unix.SizeofIfInfomsg:])
		for _, a := range attrs {
			if a.Attr.Type == unix.IFLA_ADDRESS {
				w.links[net.HardwareAddr(a.Value).String()] = true
			}
		}
	}
}

func (w *watcher) wakeLocked(now time.Time) {
	kept := w.waiters[:0]
	for _, wt := range w.waiters {
		if wt.cond(w.rules) {
			wt.done <- now
			continue
		}
		kept = append(kept, wt)
	}
	w.waiters = kept
}

// Changes returns the notifications counted so far and how many buffer
// overruns happened (when the counts are incomplete).
func (w *watcher) Changes() (changeCounts, int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.changes, w.lost
}

// expect registers cond before the action whose effect it waits for. The
// returned channel receives the time of the notification that made cond
// true (or the registration time if it already is).
func (w *watcher) expect(cond func(rules map[string]bool) bool) <-chan time.Time {
	wt := waiter{cond: cond, done: make(chan time.Time, 1)}
	w.mu.Lock()
	defer w.mu.Unlock()
	if cond(w.rules) {
		wt.done <- time.Now()
		return wt.done
	}
	w.waiters = append(w.waiters, wt)
	return wt.done
}

// expectLink registers, before the action that brings it, a wait for the
// first RTM_NEWLINK notification of a link with address mac: the moment the
// link exists in this namespace, as a hot-plugged NIC's registration is.
func (w *watcher) expectLink(mac net.HardwareAddr) <-chan time.Time {
	return w.expect(func(map[string]bool) bool { return w.links[mac.String()] })
}

// rulesAre is a condition: every rule of ids is present, or with present
// false, none is.
func rulesAre(present bool, ids []string) func(map[string]bool) bool {
	return func(have map[string]bool) bool {
		return !slices.ContainsFunc(ids, func(id string) bool { return have[id] != present })
	}
}

// ruleID names a rule by what tells ours apart: family, priority, source
// and table.
func ruleID(r netlink.Rule) string {
	return fmt.Sprintf("%d %d %v %d", r.Family, r.Priority, r.Src, r.Table)
}

// notifiedRuleID is the ruleID of the rule in an RTM_NEWRULE or
// RTM_DELRULE payload.
func notifiedRuleID(b []byte) (string, bool) {
	if len(b) < unix.SizeofRtMsg {
		return "", false
	}
	msg := nl.DeserializeRtMsg(b)
	attrs, err := nl.ParseRouteAttr(b[msg.Len():])
	if err != nil {
		return "", false
	}
	r := netlink.Rule{Family: int(msg.Family), Table: int(msg.Table)}
	for _, a := range attrs {
		switch {
		case a.Attr.Type == nl.FRA_SRC:
			r.Src = &net.IPNet{IP: a.Value, Mask: net.CIDRMask(int(msg.Src_len), 8*len(a.Value))}
		case a.Attr.Type == nl.FRA_PRIORITY && len(a.Value) == 4:
			r.Priority = int(binary.NativeEndian.Uint32(a.Value))
		case a.Attr.Type == unix.RTA_TABLE && len(a.Value) == 4:
			r.Table = int(binary.NativeEndian.Uint32(a.Value))
		}
	}
	return ruleID(r), true
}
