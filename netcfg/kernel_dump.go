package netcfg

import (
	"errors"
	"fmt"
	"iter"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/netcfg/nsthread"
)

// dumpSocket reads kernel state with rtnetlink dumps parsed in place, and
// sends the address requests (see ifaProto). Opened for NETLINK_NETFILTER,
// it reads the NAT's table and sends its write batches.
//
// Why not vishvananda/netlink's List functions: at full scale (15 ENIs, 1,500
// addresses, 1,500 rules) a no-op reconcile spent most of its 10 ms copying
// every message and building a netlink.Route or netlink.Rule with its
// net.IPNet allocations, then throwing away nearly all of them (the local
// table alone holds a route per address). Here one reusable buffer receives
// the dump, each message is parsed without allocating, and only what is kept
// is built.
//
// With NETLINK_GET_STRICT_CHK (Linux 4.20+) the kernel filters dumps by
// the family in the request; on older kernels the option fails, the kernel
// sends every family and the parsers skip the others: the result is the same.
type dumpSocket struct {
	mu  sync.Mutex // one exchange at a time: replies are read off one socket
	fd  int
	seq uint32
	buf []byte
	// counts is how many messages the latest dump of each type carried: the
	// next one allocates for as many at once. At full scale (1,500
	// addresses and as many rules) Observe allocates 364 KB instead of
	// 624 KB, 287 times instead of 309 (BenchmarkObserveParts).
	counts map[uint16]int
}

func (d *dumpSocket) sizeHint(msgType uint16) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.counts[msgType]
}

// dumpBufferSize holds any one read of a dump: the kernel fills at most 32 KiB
// per skb.
const dumpBufferSize = 64 << 10

// newDumpSocket opens a socket of netlink protocol proto (NETLINK_ROUTE;
// NETLINK_NETFILTER for the NAT's table) in ns.
func newDumpSocket(ns netns.NsHandle, proto int) (*dumpSocket, error) {
	var fd int
	err := nsthread.Do(ns, func() (err error) {
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("opening netlink dump socket: %w", err)
	}
	tv := unix.NsecToTimeval(netlinkTimeout.Nanoseconds())
	err = errors.Join(
		unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv),
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv),
	)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("setting up netlink dump socket: %w", err)
	}
	// Not fatal: without it the kernel sends everything and we filter.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_GET_STRICT_CHK, 1)
	return &dumpSocket{fd: fd, buf: make([]byte, dumpBufferSize), counts: map[uint16]int{}}, nil
}

func (d *dumpSocket) close() { unix.Close(d.fd) }

// dump sends a dump request of msgType whose body (the family header and
// attributes) is body, and calls fn with each reply message's type and body,
// retrying (at most maxDumpAttempts times) a dump the kernel reports as
// interrupted by a concurrent change. fn's body is only valid during the call;
// before each attempt reset is called, so that fn can start over.
func (d *dumpSocket) dump(what string, msgType uint16, body []byte, reset func(), fn func(typ uint16, body []byte) error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var err error
	for range maxDumpAttempts {
		reset()
		n := 0
		req := d.appendRequest(nil, nlRequest{msgType, unix.NLM_F_DUMP, body})
		err = d.roundTrip(req, d.seq, d.seq, func(typ uint16, m []byte) error { n++; return fn(typ, m) })
		d.counts[msgType] = n
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			if err != nil {
				return fmt.Errorf("listing %s: %w", what, err)
			}
			return nil
		}
	}
	return fmt.Errorf("listing %s: interrupted %d times: %w", what, maxDumpAttempts, err)
}

// request sends one request and waits for the kernel's acknowledgement:
// nil, or the errno it answered with. fn, when not nil, gets the reply
// messages before the acknowledgement.
func (d *dumpSocket) request(r nlRequest, fn func(uint16, []byte) error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	r.Flags |= unix.NLM_F_ACK
	return d.roundTrip(d.appendRequest(nil, r), d.seq, d.seq, fn)
}

// batch sends requests as one nftables transaction, between a batch begin
// and end, in one write: a process killed around it has sent all of it or
// nothing, and the kernel applies a batch whole or not at all. It waits for
// the acknowledgement of each request: nil, or the first errno.
func (d *dumpSocket) batch(reqs []nlRequest) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	edge := []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES} // family unspecified, the subsystem as resource id
	buf := d.appendRequest(nil, nlRequest{Type: unix.NFNL_MSG_BATCH_BEGIN, Body: edge})
	first := d.seq + 1
	for _, r := range reqs {
		r.Flags |= unix.NLM_F_ACK
		buf = d.appendRequest(buf, r)
	}
	last := d.seq
	return d.roundTrip(d.appendRequest(buf, nlRequest{Type: unix.NFNL_MSG_BATCH_END, Body: edge}), first, last, nil)
}

// nlRequest is one netlink request: its type, flags (NLM_F_REQUEST is
// implied) and body.
type nlRequest struct {
	Type, Flags uint16
	Body        []byte
}

// appendRequest appends r to buf with the next sequence number.
func (d *dumpSocket) appendRequest(buf []byte, r nlRequest) []byte {
	d.seq++
	m := nl.NetlinkRequest{NlMsghdr: unix.NlMsghdr{Type: r.Type, Flags: unix.NLM_F_REQUEST | r.Flags, Seq: d.seq}, RawData: r.Body}
	return append(buf, m.Serialize()...)
}

// roundTrip writes buf, requests numbered first to last (and maybe one
// after them that asks for no answer), and reads the replies to them until
// last's dump ends (NLMSG_DONE) or it is acknowledged (NLMSG_ERROR), or one
// of them is refused: it returns the errno the kernel reports, if any. fn,
// when not nil, gets the type and body of each other reply message.
func (d *dumpSocket) roundTrip(buf []byte, first, last uint32, fn func(uint16, []byte) error) error {
	if _, err := unix.Write(d.fd, buf); err != nil {
		return fmt.Errorf("sending netlink request: %w", err)
	}
	interrupted := false
	var fnErr error
	for {
		n, err := unix.Read(d.fd, d.buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("receiving netlink reply: %w", err)
		}
		for h, m := range messages(d.buf[:n]) {
			if m == nil {
				return fmt.Errorf("malformed netlink message (length %d of %d bytes)", h.Len, n)
			}
			if h.Seq < first || h.Seq > last {
				continue // a late reply to an earlier, abandoned request
			}
			if h.Flags&unix.NLM_F_DUMP_INTR != 0 {
				interrupted = true
			}
			switch h.Type {
			case unix.NLMSG_DONE, unix.NLMSG_ERROR: // the error code leads both
				if e, ok := u32(m); ok && int32(e) < 0 {
					return syscall.Errno(-int32(e))
				}
				if h.Seq != last {
					continue // an earlier request of the batch, acknowledged
				}
				if interrupted {
					return netlink.ErrDumpInterrupted
				}
				return fnErr
			case unix.NLMSG_NOOP, unix.NLMSG_OVERRUN:
				continue
			}
			if fnErr == nil && fn != nil {
				fnErr = fn(h.Type, m) // keep reading to the end: the socket must be drained
			}
		}
	}
}

// messages yields the header and body of each netlink message in b. A
// malformed message ends it, yielded with a nil body.
func messages(b []byte) iter.Seq2[unix.NlMsghdr, []byte] {
	return func(yield func(unix.NlMsghdr, []byte) bool) {
		ne := nl.NativeEndian()
		for len(b) >= unix.SizeofNlMsghdr {
			h := unix.NlMsghdr{Len: ne.Uint32(b[0:4]), Type: ne.Uint16(b[4:6]), Flags: ne.Uint16(b[6:8]), Seq: ne.Uint32(b[8:12])}
			if h.Len < unix.SizeofNlMsghdr || int(h.Len) > len(b) {
				yield(h, nil)
				return
			}
			if !yield(h, b[unix.SizeofNlMsghdr:h.Len]) {
				return
			}
			b = b[min(nlmAlign(int(h.Len)), len(b)):]
		}
	}
}

func nlmAlign(l int) int { return (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

func rtaAlign(l int) int { return (l + unix.RTA_ALIGNTO - 1) &^ (unix.RTA_ALIGNTO - 1) }

// forEachAttr calls fn with each rtattr in b (type without the nested and
// byte-order flags). It stops at a malformed attribute and reports false.
func forEachAttr(b []byte, fn func(typ uint16, v []byte)) bool {
	ne := nl.NativeEndian()
	for len(b) >= unix.SizeofRtAttr {
		l := int(ne.Uint16(b[0:2]))
		if l < unix.SizeofRtAttr || l > len(b) {
			return false
		}
		fn(ne.Uint16(b[2:4])&^(unix.NLA_F_NESTED|unix.NLA_F_NET_BYTEORDER), b[unix.SizeofRtAttr:l])
		b = b[min(rtaAlign(l), len(b)):]
	}
	return true
}

func u32(v []byte) (uint32, bool) {
	if len(v) < 4 {
		return 0, false
	}
	return nl.NativeEndian().Uint32(v[:4]), true
}

// ipFromAttr is the address in v (4 or 16 bytes), unmapped.
func ipFromAttr(v []byte) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(v)
	return a.Unmap(), ok
}

// links dumps the links: index, name and MAC (lower case, "" when none).
// altNames maps every link's alternative names (IFLA_PROP_LIST) to its
// index; it is nil when no link has one.
// rpFilters maps the name of every link with an IPv4 configuration to its
// rp_filter, as /proc/sys/net/ipv4/conf/<link>/rp_filter shows it.
//
// Why from the link dump: the kernel puts each link's whole IPv4
// configuration in its message (IFLA_AF_SPEC), so the rp_filter values come
// with no further request, where procfs costs a file open, read and close per
// link, from a thread moved into the namespace.
func (d *dumpSocket) links() (links []Link, rpFilters, altNames map[string]int, err error) {
	body := make([]byte, unix.SizeofIfInfomsg) // AF_UNSPEC, no filter
	reset := func() { links, rpFilters, altNames = links[:0], map[string]int{}, nil }
	err = d.dump("links", unix.RTM_GETLINK, body, reset, func(typ uint16, m []byte) error {
		if typ != unix.RTM_NEWLINK || len(m) < unix.SizeofIfInfomsg {
			return nil
		}
		l := Link{Index: int(nl.DeserializeIfInfomsg(m).Index)}
		rpFilter, haveRPFilter := 0, false
		forEachAttr(m[unix.SizeofIfInfomsg:], func(t uint16, v []byte) {
			switch t {
			case unix.IFLA_IFNAME:
				l.Name = unix.ByteSliceToString(v)
			case unix.IFLA_ADDRESS:
				l.MAC = net.HardwareAddr(v).String() // lower case hex
			case unix.IFLA_AF_SPEC:
				rpFilter, haveRPFilter = rpFilterFromAFSpec(v)
			case unix.IFLA_PROP_LIST:
				forEachAttr(v, func(t uint16, name []byte) {
					if t == unix.IFLA_ALT_IFNAME {
						if altNames == nil {
							altNames = map[string]int{}
						}
						altNames[unix.ByteSliceToString(name)] = l.Index
					}
				})
			}
		})
		links = append(links, l)
		if haveRPFilter {
			rpFilters[l.Name] = rpFilter
		}
		return nil
	})
	return links, rpFilters, altNames, err
}

// ipv4DevconfRPFilter is IPV4_DEVCONF_RP_FILTER (linux/ip.h): the position,
// counted from 1, of rp_filter in IFLA_INET_CONF's array of 32-bit values.
const ipv4DevconfRPFilter = 8

// rpFilterFromAFSpec reads rp_filter from a link's IFLA_AF_SPEC attribute:
// AF_INET's nest, IFLA_INET_CONF, the IPV4_DEVCONF_RP_FILTER'th value. It
// reports false when the link has no IPv4 configuration (the kernel leaves
// AF_INET out exactly when the link has no /proc/sys/net/ipv4/conf entry).
func rpFilterFromAFSpec(afSpec []byte) (value int, ok bool) {
	forEachAttr(afSpec, func(family uint16, inet []byte) {
		if family != unix.AF_INET {
			return
		}
		forEachAttr(inet, func(t uint16, conf []byte) {
			const at = (ipv4DevconfRPFilter - 1) * 4
			if t == unix.IFLA_INET_CONF && len(conf) >= at+4 {
				value, ok = int(int32(nl.NativeEndian().Uint32(conf[at:at+4]))), true
			}
		})
	})
	return value, ok
}

// addrs dumps every address of family (AF_INET, AF_INET6, or AF_UNSPEC for
// both) on every link, in the kernel's order (by family, then by link, then
// as the link holds them).
func (d *dumpSocket) addrs(family uint8) ([]kernelAddr, error) {
	body := make([]byte, unix.SizeofIfAddrmsg) // every link
	body[0] = family
	out := make([]kernelAddr, 0, d.sizeHint(unix.RTM_GETADDR))
	err := d.dump("addresses", unix.RTM_GETADDR, body, func() { out = out[:0] }, func(typ uint16, m []byte) error {
		if typ != unix.RTM_NEWADDR {
			return nil
		}
		a, ok, err := parseAddrMessage(m)
		if ok {
			out = append(out, a)
		}
		return err
	})
	return out, err
}

// routes dumps the IPv4 and IPv6 routes of every table but the local one
// (a route per address, which nothing reads).
func (d *dumpSocket) routes() ([]KernelRoute, error) {
	body := make([]byte, unix.SizeofRtMsg) // AF_UNSPEC: every family
	var out []KernelRoute
	err := d.dump("routes", unix.RTM_GETROUTE, body, func() { out = out[:0] }, func(typ uint16, m []byte) error {
		if r, ok := parseRoute(m); ok && typ == unix.RTM_NEWROUTE {
			out = append(out, r)
		}
		return nil
	})
	return out, err
}

// parseRoute reads a route message (RTM_NEWROUTE or RTM_DELROUTE). Cached
// (cloned) routes and the local table's are skipped, as vishvananda/netlink
// skips the former.
func parseRoute(m []byte) (KernelRoute, bool) {
	if len(m) < unix.SizeofRtMsg {
		return KernelRoute{}, false
	}
	h := nl.DeserializeRtMsg(m)
	if h.Table == unix.RT_TABLE_LOCAL || // exact: tables over 255 show as RT_TABLE_COMPAT here
		(h.Family != unix.AF_INET && h.Family != unix.AF_INET6) || h.Flags&unix.RTM_F_CLONED != 0 {
		return KernelRoute{}, false
	}
	r := KernelRoute{Protocol: h.Protocol, Type: h.Type}
	r.Table, r.ScopeLink = int(h.Table), h.Scope == unix.RT_SCOPE_LINK
	r.Dst = anyPrefix(int(h.Family))
	forEachAttr(m[unix.SizeofRtMsg:], func(t uint16, v []byte) {
		x, isU32 := u32(v)
		switch {
		case t == unix.RTA_TABLE && isU32:
			r.Table = int(x)
		case t == unix.RTA_DST:
			if a, ok := ipFromAttr(v); ok {
				r.Dst = netip.PrefixFrom(a, int(h.Dst_len))
			}
		case t == unix.RTA_GATEWAY:
			r.Gateway, _ = ipFromAttr(v)
		case t == unix.RTA_PREFSRC:
			r.Src, _ = ipFromAttr(v)
		case t == unix.RTA_OIF && isU32:
			r.LinkIndex = int(x)
		case t == unix.RTA_PRIORITY && isU32:
			r.Metric = int(x)
		}
	})
	return r, r.Table != unix.RT_TABLE_LOCAL
}

// Rule attributes newer than golang.org/x/sys/unix knows (linux/fib_rules.h).
const (
	fraDSCP      = 25
	fraFlowlabel = 26
)

// parseRule reads a rule message (RTM_NEWRULE or RTM_DELRULE); ok is false
// for a message too short to be one. Its header, struct fib_rule_hdr
// (linux/fib_rules.h), is laid out as struct rtmsg is, with the action
// where rtmsg has the type.
func parseRule(m []byte) (r KernelRule, ok bool) {
	if len(m) < unix.SizeofRtMsg {
		return KernelRule{}, false
	}
	h := nl.DeserializeRtMsg(m)
	r.Src = anyPrefix(int(h.Family))
	// narrowed: a selector that keeps the rule from sending all traffic of
	// its source to its table (Conflicts' test), as vishvananda/netlink
	// reports them: destination, tos, not, iif/oif, ports, ip_proto, uid
	// range, tun_id; and fwmark/mask, which are not Selectors.
	narrowed := h.Dst_len != 0 || h.Tos != 0 || h.Flags&unix.FIB_RULE_INVERT != 0
	var jumps, suppressesPrefix bool
	forEachAttr(m[unix.SizeofRtMsg:], func(t uint16, v []byte) {
		x, isU32 := u32(v)
		set := slices.ContainsFunc(v, func(b byte) bool { return b != 0 })
		switch t {
		case unix.FRA_DST, unix.FRA_IIFNAME, unix.FRA_OIFNAME, unix.FRA_UID_RANGE, unix.FRA_SPORT_RANGE, unix.FRA_DPORT_RANGE:
			narrowed = true
		case unix.FRA_IP_PROTO, unix.FRA_TUN_ID:
			narrowed = narrowed || set
		case unix.FRA_FWMARK:
			r.Mark = x
		case unix.FRA_FWMASK:
			r.Mask = x
		case unix.FRA_GOTO:
			jumps = true
		case fraDSCP:
			r.Selectors = true
		case unix.FRA_FLOW, unix.FRA_L3MDEV, fraFlowlabel:
			r.Selectors = r.Selectors || set
		case unix.FRA_SUPPRESS_PREFIXLEN, unix.FRA_SUPPRESS_IFGROUP:
			if isU32 && x != 0xffffffff { // -1: unset
				r.Selectors = true
				suppressesPrefix = suppressesPrefix || t == unix.FRA_SUPPRESS_PREFIXLEN
			}
		case unix.FRA_PRIORITY:
			r.Priority = int(x)
		case unix.FRA_TABLE:
			r.Table = int(x)
		case unix.FRA_PROTOCOL:
			if len(v) >= 1 {
				r.Protocol = v[0]
			}
		case unix.FRA_SRC:
			if a, ok := ipFromAttr(v); ok {
				r.Src = netip.PrefixFrom(a, int(h.Src_len))
			}
		}
	})
	r.Selectors = r.Selectors || narrowed || jumps || h.Type != unix.FR_ACT_TO_TBL
	// wg-quick's `lookup main suppress_prefixlength 0` lets default routes
	// fall through: it sends nothing elsewhere.
	r.LookupAll = !narrowed && r.Mark == 0 && r.Mask == 0 && !jumps && r.Table != unix.RT_TABLE_LOCAL && r.Table != 0 &&
		!(r.Table == unix.RT_TABLE_MAIN && suppressesPrefix)
	return r, true
}
