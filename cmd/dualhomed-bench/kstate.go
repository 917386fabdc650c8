package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// IFA_PROTO (linux/if_addr.h, kernel 5.18+): x/sys/unix does not name it yet.
const ifaProto = 11

// Address flags that describe how an address was configured. Flags that
// describe its current life (tentative, deprecated, dadfailed) are left out
// of comparisons.
const addrConfigFlags = unix.IFA_F_NOPREFIXROUTE | unix.IFA_F_NODAD | unix.IFA_F_HOMEADDRESS |
	unix.IFA_F_MANAGETEMPADDR | unix.IFA_F_PERMANENT | unix.IFA_F_SECONDARY

// kernelAddr is an interface address as dumped with raw rtnetlink, because
// vishvananda/netlink v1.3.1 does not report IFA_PROTO.
type kernelAddr struct {
	LinkIndex int
	Prefix    netip.Prefix
	Broadcast netip.Addr
	Scope     uint8
	Flags     uint32
	Proto     uint8
}

// kernelState is every rule, route, address and rp_filter value of the
// namespace, keyed by a canonical text (link names, not indexes, so that a
// link deleted and re-created compares equal).
type kernelState struct {
	Rules    map[string]netlink.Rule
	Routes   map[string]netlink.Route
	Addrs    map[string]kernelAddr
	Sysctls  map[string]string // "net.ipv4.conf.eth1.rp_filter" -> "2"
	Links    map[int]string    // index -> name when dumped
	LinkByNm map[string]int
}

// dumpKernel reads the whole routing state of the namespace h works in
// (which must be the calling process's own: sysctls are read from /proc/sys).
func dumpKernel(h *netlink.Handle) (kernelState, error) {
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		var s kernelState
		s, err = dumpKernelOnce(h)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return s, err
		}
		time.Sleep(time.Millisecond)
	}
	return kernelState{}, err
}

func dumpKernelOnce(h *netlink.Handle) (kernelState, error) {
	s := kernelState{
		Rules:    map[string]netlink.Rule{},
		Routes:   map[string]netlink.Route{},
		Addrs:    map[string]kernelAddr{},
		Sysctls:  map[string]string{},
		Links:    map[int]string{},
		LinkByNm: map[string]int{},
	}
	links, err := h.LinkList()
	if err != nil {
		return s, fmt.Errorf("listing links: %w", err)
	}
	for _, l := range links {
		s.Links[l.Attrs().Index] = l.Attrs().Name
		s.LinkByNm[l.Attrs().Name] = l.Attrs().Index
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := h.RuleList(fam)
		if err != nil {
			return s, fmt.Errorf("listing rules: %w", err)
		}
		for _, r := range rules {
			s.Rules[ruleKey(r)] = r
		}
		routes, err := h.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return s, fmt.Errorf("listing routes: %w", err)
		}
		for _, r := range routes {
			s.Routes[s.routeKey(r)] = r
		}
	}
	addrs, err := dumpAddrs()
	if err != nil {
		return s, err
	}
	for _, a := range addrs {
		s.Addrs[s.addrKey(a)] = a
	}
	names := []string{"all", "default"}
	for _, n := range s.Links {
		names = append(names, n)
	}
	for _, n := range names {
		key := "net.ipv4.conf." + n + ".rp_filter"
		b, err := os.ReadFile(filepath.Join("/proc/sys/net/ipv4/conf", n, "rp_filter"))
		if err == nil {
			s.Sysctls[key] = strings.TrimSpace(string(b))
		}
	}
	return s, nil
}

// dumpAddrs is `ip addr show` with IFA_PROTO.
func dumpAddrs() ([]kernelAddr, error) {
	req := nl.NewNetlinkRequest(unix.RTM_GETADDR, unix.NLM_F_DUMP)
	req.AddData(nl.NewIfAddrmsg(unix.AF_UNSPEC))
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWADDR)
	if err != nil {
		if errors.Is(err, netlink.ErrDumpInterrupted) || errors.Is(err, nl.ErrDumpInterrupted) {
			return nil, netlink.ErrDumpInterrupted
		}
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	var out []kernelAddr
	for _, m := range msgs {
		a, ok, err := parseAddr(m)
		if err != nil {
			return nil, fmt.Errorf("parsing address message: %w", err)
		}
		if ok {
			out = append(out, a)
		}
	}
	return out, nil
}

// parseAddr decodes an RTM_NEWADDR/RTM_DELADDR payload.
func parseAddr(m []byte) (kernelAddr, bool, error) {
	if len(m) < unix.SizeofIfAddrmsg {
		return kernelAddr{}, false, fmt.Errorf("short message (%d bytes)", len(m))
	}
	msg := nl.DeserializeIfAddrmsg(m)
	attrs, err := nl.ParseRouteAttr(m[unix.SizeofIfAddrmsg:])
	if err != nil {
		return kernelAddr{}, false, err
	}
	a := kernelAddr{LinkIndex: int(msg.Index), Scope: msg.Scope, Flags: uint32(msg.Flags)}
	var local, address netip.Addr
	for _, at := range attrs {
		switch at.Attr.Type {
		case unix.IFA_LOCAL:
			local, _ = netip.AddrFromSlice(at.Value)
		case unix.IFA_ADDRESS:
			address, _ = netip.AddrFromSlice(at.Value)
		case unix.IFA_BROADCAST:
			a.Broadcast, _ = netip.AddrFromSlice(at.Value)
		case unix.IFA_FLAGS:
			if len(at.Value) >= 4 {
				a.Flags = binary.NativeEndian.Uint32(at.Value)
			}
		case ifaProto:
			if len(at.Value) >= 1 {
				a.Proto = at.Value[0]
			}
		}
	}
	addr := local
	if !addr.IsValid() {
		addr = address
	}
	if !addr.IsValid() {
		return kernelAddr{}, false, nil
	}
	a.Prefix = netip.PrefixFrom(addr.Unmap(), int(msg.Prefixlen))
	a.Broadcast = a.Broadcast.Unmap()
	return a, true, nil
}

func familyName(f int) string {
	if f == netlink.FAMILY_V6 {
		return "inet6"
	}
	return "inet"
}

func ipnetString(n *net.IPNet) string {
	if n == nil {
		return "all"
	}
	return n.String()
}

func ruleKey(r netlink.Rule) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s pref %d", familyName(r.Family), r.Priority)
	if r.Invert {
		b.WriteString(" not")
	}
	fmt.Fprintf(&b, " from %s", ipnetString(r.Src))
	if r.Dst != nil {
		fmt.Fprintf(&b, " to %s", r.Dst)
	}
	if r.IifName != "" {
		fmt.Fprintf(&b, " iif %s", r.IifName)
	}
	if r.OifName != "" {
		fmt.Fprintf(&b, " oif %s", r.OifName)
	}
	if r.Mark != 0 || r.Mask != nil {
		fmt.Fprintf(&b, " fwmark %#x", r.Mark)
		if r.Mask != nil {
			fmt.Fprintf(&b, "/%#x", *r.Mask)
		}
	}
	if r.Tos != 0 {
		fmt.Fprintf(&b, " tos %d", r.Tos)
	}
	if r.Goto >= 0 {
		fmt.Fprintf(&b, " goto %d", r.Goto)
	}
	fmt.Fprintf(&b, " lookup %d", r.Table)
	if r.SuppressPrefixlen >= 0 {
		fmt.Fprintf(&b, " suppress_prefixlength %d", r.SuppressPrefixlen)
	}
	fmt.Fprintf(&b, " proto %d", r.Protocol)
	return b.String()
}

func (s kernelState) linkName(index int) string {
	if n, ok := s.Links[index]; ok {
		return n
	}
	return fmt.Sprintf("if%d", index)
}

func (s kernelState) routeKey(r netlink.Route) string {
	var b strings.Builder
	dst := "default"
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	fmt.Fprintf(&b, "%s table %d type %d %s", familyName(r.Family), r.Table, r.Type, dst)
	if r.Gw != nil {
		fmt.Fprintf(&b, " via %s", r.Gw)
	}
	if r.LinkIndex > 0 {
		fmt.Fprintf(&b, " dev %s", s.linkName(r.LinkIndex))
	}
	if r.Src != nil {
		fmt.Fprintf(&b, " src %s", r.Src)
	}
	fmt.Fprintf(&b, " scope %d proto %d metric %d", r.Scope, r.Protocol, r.Priority)
	if r.Flags&unix.RTNH_F_ONLINK != 0 {
		b.WriteString(" onlink")
	}
	if r.MTU != 0 {
		fmt.Fprintf(&b, " mtu %d", r.MTU)
	}
	for _, nh := range r.MultiPath {
		fmt.Fprintf(&b, " nexthop via %s dev %s", nh.Gw, s.linkName(nh.LinkIndex))
	}
	return b.String()
}

func (s kernelState) addrKey(a kernelAddr) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s dev %s scope %d flags %#x", a.Prefix, s.linkName(a.LinkIndex), a.Scope, a.Flags&addrConfigFlags)
	if a.Broadcast.IsValid() {
		fmt.Fprintf(&b, " brd %s", a.Broadcast)
	}
	fmt.Fprintf(&b, " proto %d", a.Proto)
	return b.String()
}

// stateDiff lists what differs between two kernel states.
type stateDiff struct {
	OnlyA, OnlyB []string // canonical keys, with the kind in front
}

func (d stateDiff) Empty() bool { return len(d.OnlyA) == 0 && len(d.OnlyB) == 0 }

// Summary says how many objects differ and shows a few of them.
func (d stateDiff) Summary(nameA, nameB string) string {
	if d.Empty() {
		return "identical"
	}
	show := func(keys []string) string {
		if len(keys) > 4 {
			return strings.Join(keys[:4], "; ") + fmt.Sprintf("; … (%d more)", len(keys)-4)
		}
		return strings.Join(keys, "; ")
	}
	var parts []string
	if len(d.OnlyA) > 0 {
		parts = append(parts, fmt.Sprintf("%d only in %s: %s", len(d.OnlyA), nameA, show(d.OnlyA)))
	}
	if len(d.OnlyB) > 0 {
		parts = append(parts, fmt.Sprintf("%d only in %s: %s", len(d.OnlyB), nameB, show(d.OnlyB)))
	}
	return strings.Join(parts, "; ")
}

func diffKeys[V any](kind string, a, b map[string]V, d *stateDiff) {
	for k := range a {
		if _, ok := b[k]; !ok {
			d.OnlyA = append(d.OnlyA, kind+" "+k)
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			d.OnlyB = append(d.OnlyB, kind+" "+k)
		}
	}
}

// compareStates compares two dumps of the whole namespace.
func compareStates(a, b kernelState) stateDiff {
	var d stateDiff
	diffKeys("rule", a.Rules, b.Rules, &d)
	diffKeys("route", a.Routes, b.Routes, &d)
	diffKeys("addr", a.Addrs, b.Addrs, &d)
	diffKeys("sysctl", a.Sysctls, b.Sysctls, &d)
	slices.Sort(d.OnlyA)
	slices.Sort(d.OnlyB)
	return d
}

// withoutAddrProto returns a copy of s whose addresses forget their
// IFA_PROTO, for tools that cannot set it (iproute2 before 6.3).
func withoutAddrProto(s kernelState) kernelState {
	out := s
	out.Addrs = make(map[string]kernelAddr, len(s.Addrs))
	for _, a := range s.Addrs {
		a.Proto = 0
		out.Addrs[s.addrKey(a)] = a
	}
	return out
}

// resetKernel deletes every rule, route and address that pristine does not
// have and restores the rp_filter values, so that the next run starts from
// the same empty kernel. It returns an error if the result differs.
func resetKernel(h *netlink.Handle, pristine kernelState) error {
	for attempt := 0; ; attempt++ {
		cur, err := dumpKernel(h)
		if err != nil {
			return err
		}
		d := compareStates(pristine, cur)
		if d.Empty() {
			return nil
		}
		if attempt == 3 {
			return fmt.Errorf("kernel state differs from the pristine one after reset: %s", d.Summary("pristine", "now"))
		}
		for k, r := range cur.Rules {
			if _, ok := pristine.Rules[k]; !ok {
				if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
					return fmt.Errorf("deleting rule %s: %w", k, err)
				}
			}
		}
		for k, r := range cur.Routes {
			if _, ok := pristine.Routes[k]; !ok && r.Protocol != unix.RTPROT_KERNEL {
				if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
					return fmt.Errorf("deleting route %s: %w", k, err)
				}
			}
		}
		for k, a := range cur.Addrs {
			if _, ok := pristine.Addrs[k]; ok {
				continue
			}
			link, err := h.LinkByIndex(a.LinkIndex)
			if err != nil {
				continue // the link went away, and the address with it
			}
			na := &netlink.Addr{IPNet: &net.IPNet{IP: a.Prefix.Addr().AsSlice(), Mask: net.CIDRMask(a.Prefix.Bits(), a.Prefix.Addr().BitLen())}}
			if err := h.AddrDel(link, na); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("deleting address %s: %w", k, err)
			}
		}
		for k, v := range pristine.Sysctls {
			if cur.Sysctls[k] != v {
				if err := writeSysctl(k, v); err != nil {
					return err
				}
			}
		}
	}
}

// writeSysctl writes a net.* sysctl of the process's namespace.
func writeSysctl(key, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", key, err)
	}
	return nil
}
