package agent

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// reason is a bit set of what asked for a reconcile.
type reason uint32

const (
	reasonStart   reason = 1 << iota
	reasonPoll           // IMDS poll timer
	reasonRetry          // backoff retry: IMDS unreachable or a link IMDS does not know yet
	reasonReload         // SIGHUP
	reasonLink           // a link appeared, went or changed
	reasonAddr           // an address was added or removed
	reasonDrift          // one of our routes or rules was deleted
	reasonResync         // an event subscription was lost: state may have changed unseen
	reasonForeign        // another program deleted one of its routes or rules: blocked adds may fit now
	// reasonRecheck is the quick re-read for links IMDS did not describe yet
	// (and a new link's read deferred by minLinkReadGap): it costs the MAC
	// listing, and a snapshot only once IMDS lists something new.
	reasonRecheck
)

// needsIMDS reports whether the reasons call for a fresh IMDS read.
func (r reason) needsIMDS() bool { return r&(reasonStart|reasonPoll|reasonRetry|reasonReload) != 0 }

func (r reason) String() string {
	names := []string{"start", "poll", "retry", "reload", "link", "address", "drift", "resync", "foreign", "recheck"}
	s := ""
	for i, n := range names {
		if r&(1<<i) != 0 {
			if s != "" {
				s += "+"
			}
			s += n
		}
	}
	return s
}

// watcher turns netlink notifications in one namespace into reconcile
// triggers. Link and address changes always trigger; route and rule
// notifications only when one of ours (our protocol) was deleted.
type watcher struct {
	ns       netns.NsHandle
	protocol *atomic.Uint32 // current Config.Protocol, changed on reload
	// blocked is true while some wanted object is held off by a foreign one:
	// then foreign deletions matter too.
	blocked *atomic.Bool
	log     *zap.Logger
	trigger func(reason)
}

// run subscribes to links, addresses, routes and rules until ctx ends. A lost
// subscription (socket buffer overrun, error) is re-established after a short
// pause, followed by a resync reconcile because events may have been missed.
func (w *watcher) run(ctx context.Context) {
	go w.loop(ctx, "link", w.links)
	go w.loop(ctx, "address", w.addrs)
	go w.loop(ctx, "route", w.routes)
	go w.loop(ctx, "rule", w.rules)
}

func (w *watcher) loop(ctx context.Context, what string, subscribe func(ctx context.Context) error) {
	backoff := time.Second
	for first := true; ; first = false {
		if !first {
			w.trigger(reasonResync)
		}
		began := time.Now()
		err := subscribe(ctx)
		if ctx.Err() != nil {
			return
		}
		if time.Since(began) > time.Minute {
			backoff = time.Second // it worked for a while: a fresh failure
		}
		w.log.Warn("netlink subscription lost; resubscribing", zap.String("events", what), zap.Error(err),
			zap.Duration("retry_in", backoff))
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// errorCallback logs the subscription's receive errors. The library's
// goroutine reports one more error when it notices that we closed done; ctx is
// always cancelled before that, so errors after the end are dropped instead of
// being logged after Run returned (a logger may be gone by then, as in tests).
func (w *watcher) errorCallback(ctx context.Context, what string) func(error) {
	return func(err error) {
		if ctx.Err() != nil {
			return
		}
		w.log.Debug("netlink event error", zap.String("events", what), zap.Error(err))
	}
}

// rcvbuf is large enough for the burst of notifications when many ENIs and
// their addresses appear at once at boot.
const rcvbuf = 1 << 20

func (w *watcher) links(ctx context.Context) error {
	ch := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	ns := w.ns
	err := netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{
		Namespace: &ns, ErrorCallback: w.errorCallback(ctx, "link"), ReceiveBufferSize: rcvbuf})
	if err != nil {
		return err
	}
	return drain(ctx, ch, func(netlink.LinkUpdate) { w.trigger(reasonLink) })
}

func (w *watcher) addrs(ctx context.Context) error {
	ch := make(chan netlink.AddrUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	ns := w.ns
	err := netlink.AddrSubscribeWithOptions(ch, done, netlink.AddrSubscribeOptions{
		Namespace: &ns, ErrorCallback: w.errorCallback(ctx, "address"), ReceiveBufferSize: rcvbuf})
	if err != nil {
		return err
	}
	return drain(ctx, ch, func(netlink.AddrUpdate) { w.trigger(reasonAddr) })
}

func (w *watcher) routes(ctx context.Context) error {
	ch := make(chan netlink.RouteUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	ns := w.ns
	err := netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{
		Namespace: &ns, ErrorCallback: w.errorCallback(ctx, "route"), ReceiveBufferSize: rcvbuf})
	if err != nil {
		return err
	}
	return drain(ctx, ch, func(u netlink.RouteUpdate) {
		switch {
		case u.Type != unix.RTM_DELROUTE:
		case uint32(u.Protocol) == w.protocol.Load():
			w.trigger(reasonDrift)
		case w.blocked.Load():
			w.trigger(reasonForeign)
		}
	})
}

// drain consumes ch until ctx ends or the subscription closes it. The
// subscription's goroutine blocks on a full channel, so ch is read to the end.
func drain[T any](ctx context.Context, ch <-chan T, handle func(T)) error {
	for {
		select {
		case <-ctx.Done():
			go func() {
				for range ch { //nolint:revive // let the subscriber goroutine exit
				}
			}()
			return ctx.Err()
		case u, ok := <-ch:
			if !ok {
				return errSubscriptionClosed
			}
			handle(u)
		}
	}
}

type subscriptionError string

func (e subscriptionError) Error() string { return string(e) }

const errSubscriptionClosed = subscriptionError("subscription closed")

// rules listens to RTNLGRP_IPV4_RULE and RTNLGRP_IPV6_RULE directly: netlink
// v1.3.1 has no RuleSubscribe. Only RTM_DELRULE carrying our protocol
// (FRA_PROTOCOL) triggers a repair.
func (w *watcher) rules(ctx context.Context) error {
	s, err := nl.SubscribeAt(w.ns, netns.None(), unix.NETLINK_ROUTE, unix.RTNLGRP_IPV4_RULE, unix.RTNLGRP_IPV6_RULE)
	if err != nil {
		return err
	}
	_ = s.SetReceiveBufferSize(rcvbuf, false)
	stop := context.AfterFunc(ctx, s.Close) // unblocks Receive
	defer stop()
	defer s.Close()
	for {
		msgs, from, err := s.Receive()
		if err != nil {
			return err
		}
		if from.Pid != nl.PidKernel {
			continue
		}
		for _, m := range msgs {
			if m.Header.Type != unix.RTM_DELRULE {
				continue
			}
			if ruleProtocol(m.Data) == w.protocol.Load() {
				w.trigger(reasonDrift)
			} else if w.blocked.Load() {
				w.trigger(reasonForeign)
			}
		}
	}
}

// ruleProtocol returns the FRA_PROTOCOL attribute of an RTM_*RULE message
// (struct fib_rule_hdr, then attributes), or 0 when absent.
func ruleProtocol(data []byte) uint32 {
	const fibRuleHdrLen = 12
	if len(data) < fibRuleHdrLen {
		return 0
	}
	attrs, err := nl.ParseRouteAttr(data[fibRuleHdrLen:])
	if err != nil {
		return 0
	}
	for _, a := range attrs {
		if a.Attr.Type == unix.FRA_PROTOCOL && len(a.Value) >= 1 {
			return uint32(a.Value[0])
		}
	}
	return 0
}
