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
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// IFA_PROTO (linux/if_addr.h, kernel 5.18+): x/sys/unix does not name it yet.
const ifaProto = 11

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
// link deleted and re-created compares equal). Flags that describe an
// address's current life (tentative, deprecated, dadfailed) are left out.
type kernelState struct {
	Rules    map[string]netlink.Rule
	Routes   map[string]netlink.Route
	Addrs    map[string]kernelAddr
	Sysctls  map[string]string // "net.ipv4.conf.eth1.rp_filter" -> "2"
	Links    map[int]string    // index -> name when dumped
	LinkByNm map[string]int
}

// dumpKernel reads the whole routing state of the namespace.
func dumpKernel(ns *simworld.NS) (kernelState, error) {
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		var s kernelState
		s, err = dumpKernelOnce(ns)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return s, err
		}
		time.Sleep(time.Millisecond)
	}
	return kernelState{}, err
}

func dumpKernelOnce(ns *simworld.NS) (kernelState, error) {
	h := ns.NL
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
	names := []string{"all", "default"}
	for _, n := range s.Links {
		names = append(names, n)
	}
	// Addresses through a socket, and sysctls through /proc/sys, opened by a
	// thread inside the namespace.
	var addrs []kernelAddr
	err = ns.Do(func() error {
		for _, n := range names {
			if b, err := os.ReadFile(filepath.Join("/proc/sys/net/ipv4/conf", n, "rp_filter")); err == nil {
				s.Sysctls["net.ipv4.conf."+n+".rp_filter"] = strings.TrimSpace(string(b))
			}
		}
		addrs, err = dumpAddrs()
		return err
	})
	for _, a := range addrs {
		s.Addrs[s.addrKey(a)] = a
	}
	return s, err
}

// dumpAddrs is `ip addr show` with IFA_PROTO, which vishvananda/netlink
// v1.3.1 does not report, in the calling thread's namespace.
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

func ipnetString(n *net.IPNet) string {
	if n == nil {
		return "all"
	}
	return n.String()
}

func (s kernelState) linkName(index int) string {
	if n, ok := s.Links[index]; ok {
		return n
	}
	return fmt.Sprintf("if%d", index)
}

// An object's key is the `ip` command that creates it, which names every
// attribute that tells it apart; an address's key adds the flags the
// kernel sets on its own.
func ruleKey(r netlink.Rule) string                   { return ruleCommand(r).String() }
func (s kernelState) routeKey(r netlink.Route) string { return routeCommand(s, r).String() }
func (s kernelState) addrKey(a kernelAddr) string {
	return fmt.Sprintf("%s (flags %#x)", addrCommand(s, a, true), a.Flags&(unix.IFA_F_PERMANENT|unix.IFA_F_SECONDARY))
}

// ipCommand is one iproute2 command: `ip -4|-6 <Args...>`. ip rule cannot
// infer the family from the address, so every command carries it.
type ipCommand struct {
	V6   bool
	Args []string
}

func (c ipCommand) familyFlag() string {
	if c.V6 {
		return "-6"
	}
	return "-4"
}

func (c ipCommand) String() string { return "ip " + c.familyFlag() + " " + strings.Join(c.Args, " ") }

func addrCommand(s kernelState, a kernelAddr, withProto bool) ipCommand {
	args := []string{"addr", "add", a.Prefix.String(), "dev", s.linkName(a.LinkIndex)}
	if a.Broadcast.IsValid() {
		args = append(args, "broadcast", a.Broadcast.String())
	}
	if a.Scope != unix.RT_SCOPE_UNIVERSE {
		args = append(args, "scope", strconv.Itoa(int(a.Scope)))
	}
	for _, f := range []struct {
		bit  uint32
		word string
	}{
		{unix.IFA_F_NOPREFIXROUTE, "noprefixroute"},
		{unix.IFA_F_NODAD, "nodad"},
		{unix.IFA_F_HOMEADDRESS, "home"},
		{unix.IFA_F_MANAGETEMPADDR, "mngtmpaddr"},
	} {
		if a.Flags&f.bit != 0 {
			args = append(args, f.word)
		}
	}
	if withProto && a.Proto != 0 {
		args = append(args, "proto", strconv.Itoa(int(a.Proto)))
	}
	return ipCommand{V6: a.Prefix.Addr().Is6(), Args: args}
}

var routeTypes = map[int]string{
	unix.RTN_LOCAL: "local", unix.RTN_BROADCAST: "broadcast", unix.RTN_ANYCAST: "anycast",
	unix.RTN_MULTICAST: "multicast", unix.RTN_BLACKHOLE: "blackhole", unix.RTN_UNREACHABLE: "unreachable",
	unix.RTN_PROHIBIT: "prohibit", unix.RTN_THROW: "throw",
}

func routeCommand(s kernelState, r netlink.Route) ipCommand {
	v6 := r.Family == netlink.FAMILY_V6
	args := []string{"route", "add"}
	if t, ok := routeTypes[r.Type]; ok {
		args = append(args, t)
	}
	dst := "default"
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	args = append(args, dst)
	if r.Gw != nil {
		args = append(args, "via", r.Gw.String())
	}
	if r.LinkIndex > 0 {
		args = append(args, "dev", s.linkName(r.LinkIndex))
	}
	if r.Src != nil {
		args = append(args, "src", r.Src.String())
	}
	args = append(args, "table", strconv.Itoa(r.Table), "proto", strconv.Itoa(int(r.Protocol)))
	if !v6 { // IPv6 routes have no scope
		args = append(args, "scope", strconv.Itoa(int(r.Scope)))
	}
	if r.Priority != 0 {
		args = append(args, "metric", strconv.Itoa(r.Priority))
	}
	if r.MTU != 0 {
		args = append(args, "mtu", strconv.Itoa(r.MTU))
	}
	if r.Flags&unix.RTNH_F_ONLINK != 0 {
		args = append(args, "onlink")
	}
	for _, nh := range r.MultiPath {
		args = append(args, "nexthop", "via", nh.Gw.String(), "dev", s.linkName(nh.LinkIndex))
	}
	return ipCommand{V6: v6, Args: args}
}

func ruleCommand(r netlink.Rule) ipCommand {
	args := []string{"rule", "add"}
	if r.Invert {
		args = append(args, "not")
	}
	args = append(args, "from", ipnetString(r.Src))
	if r.Dst != nil {
		args = append(args, "to", r.Dst.String())
	}
	if r.IifName != "" {
		args = append(args, "iif", r.IifName)
	}
	if r.OifName != "" {
		args = append(args, "oif", r.OifName)
	}
	if r.Mark != 0 || r.Mask != nil {
		m := fmt.Sprintf("%#x", r.Mark)
		if r.Mask != nil {
			m += fmt.Sprintf("/%#x", *r.Mask)
		}
		args = append(args, "fwmark", m)
	}
	if r.Tos != 0 {
		args = append(args, "tos", strconv.Itoa(int(r.Tos)))
	}
	if r.Goto >= 0 {
		args = append(args, "goto", strconv.Itoa(r.Goto))
	} else {
		args = append(args, "lookup", strconv.Itoa(r.Table))
	}
	if r.SuppressPrefixlen >= 0 {
		args = append(args, "suppress_prefixlength", strconv.Itoa(r.SuppressPrefixlen))
	}
	args = append(args, "pref", strconv.Itoa(r.Priority), "protocol", strconv.Itoa(int(r.Protocol)))
	return ipCommand{V6: r.Family == netlink.FAMILY_V6, Args: args}
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

// resetKernel deletes every rule, route and address of the namespace that
// pristine does not have and restores the rp_filter values, so that the next
// run starts from the same empty kernel. It returns an error if the result
// differs.
func resetKernel(ns *simworld.NS, pristine kernelState) error {
	h := ns.NL
	for attempt := 0; ; attempt++ {
		cur, err := dumpKernel(ns)
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
			na := &netlink.Addr{IPNet: ipNet(a.Prefix)}
			if err := h.AddrDel(link, na); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("deleting address %s: %w", k, err)
			}
		}
		err = ns.Do(func() error {
			for k, v := range pristine.Sysctls {
				if cur.Sysctls[k] != v {
					if err := writeSysctl(k, v); err != nil {
						return err
					}
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
}

// writeSysctl writes a net.* sysctl of the calling thread's namespace.
func writeSysctl(key, value string) error {
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", key, err)
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
