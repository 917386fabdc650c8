package simworld

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
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
)

// State is a namespace's routing state: every policy rule, route of every
// table, address (with its protocol), link and rp_filter value. Each rule,
// route and address is keyed by the `ip` command that makes it, with link
// names rather than indexes, so that a link deleted and made again compares
// equal.
type State struct {
	Rules     map[string]netlink.Rule
	Routes    map[string]netlink.Route
	Addrs     map[string]Addr
	Sysctls   map[string]string // "net.ipv4.conf.eth1.rp_filter" -> "2"
	LinkNames map[int]string    // by index
	links     []string          // "link eth1 02:00:00:00:0b:01 mtu 1500 up"
	dups      []string          // the key again for each duplicated rule
}

// Addr is an interface address with its protocol (IFA_PROTO, kernel 5.18+),
// which vishvananda/netlink v1.3.1 does not report.
type Addr struct {
	LinkIndex int
	Prefix    netip.Prefix
	Broadcast netip.Addr
	Scope     uint8
	Flags     uint32
	Proto     uint8
}

// ifaProto is IFA_PROTO (linux/if_addr.h): x/sys/unix does not name it yet.
const ifaProto = 11

// ReadState reads the namespace's State (again while a dump is interrupted
// by changes).
func ReadState(ns *NS) (State, error) {
	var err error
	for range 5 {
		var s State
		if s, err = readState(ns); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return s, err
		}
		time.Sleep(time.Millisecond)
	}
	return State{}, err
}

func readState(ns *NS) (State, error) {
	s := State{Rules: map[string]netlink.Rule{}, Routes: map[string]netlink.Route{}, Addrs: map[string]Addr{},
		Sysctls: map[string]string{}, LinkNames: map[int]string{}}
	links, err := ns.NL.LinkList()
	if err != nil {
		return s, fmt.Errorf("listing links in %s: %w", ns.Name, err)
	}
	names := []string{"all", "default"}
	for _, l := range links {
		a := l.Attrs()
		s.LinkNames[a.Index] = a.Name
		names = append(names, a.Name)
		state := "down"
		if a.Flags&net.FlagUp != 0 {
			state = "up"
		}
		s.links = append(s.links, fmt.Sprintf("link %s %s mtu %d %s", a.Name, a.HardwareAddr, a.MTU, state))
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := ns.NL.RuleList(fam)
		if err != nil {
			return s, fmt.Errorf("listing rules in %s: %w", ns.Name, err)
		}
		for _, r := range rules {
			k := s.RuleCommand(r).String()
			if _, dup := s.Rules[k]; dup {
				s.dups = append(s.dups, k)
			}
			s.Rules[k] = r
		}
		routes, err := ns.NL.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return s, fmt.Errorf("listing routes in %s: %w", ns.Name, err)
		}
		for _, r := range routes {
			s.Routes[s.RouteCommand(r).String()] = r
		}
	}
	// Addresses through a socket, and sysctls through /proc/sys, opened by a
	// thread inside the namespace.
	var addrs []Addr
	err = ns.Do(func() (err error) {
		for _, n := range names {
			if b, err := os.ReadFile(filepath.Join("/proc/sys/net/ipv4/conf", n, "rp_filter")); err == nil {
				s.Sysctls["net.ipv4.conf."+n+".rp_filter"] = strings.TrimSpace(string(b))
			}
		}
		addrs, err = readAddrs()
		return err
	})
	for _, a := range addrs {
		s.Addrs[s.addrKey(a)] = a
	}
	return s, err
}

// readAddrs is `ip addr show` with IFA_PROTO, in the calling thread's namespace.
func readAddrs() ([]Addr, error) {
	req := nl.NewNetlinkRequest(unix.RTM_GETADDR, unix.NLM_F_DUMP)
	req.AddData(nl.NewIfAddrmsg(unix.AF_UNSPEC))
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWADDR)
	if errors.Is(err, nl.ErrDumpInterrupted) {
		return nil, netlink.ErrDumpInterrupted
	} else if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	var out []Addr
	for _, m := range msgs {
		if len(m) < unix.SizeofIfAddrmsg {
			return nil, fmt.Errorf("short address message (%d bytes)", len(m))
		}
		msg := nl.DeserializeIfAddrmsg(m)
		attrs, err := nl.ParseRouteAttr(m[unix.SizeofIfAddrmsg:])
		if err != nil {
			return nil, fmt.Errorf("parsing address message: %w", err)
		}
		a := Addr{LinkIndex: int(msg.Index), Scope: msg.Scope, Flags: uint32(msg.Flags)}
		var local, address netip.Addr
		for _, at := range attrs {
			switch {
			case at.Attr.Type == unix.IFA_LOCAL:
				local, _ = netip.AddrFromSlice(at.Value)
			case at.Attr.Type == unix.IFA_ADDRESS:
				address, _ = netip.AddrFromSlice(at.Value)
			case at.Attr.Type == unix.IFA_BROADCAST:
				a.Broadcast, _ = netip.AddrFromSlice(at.Value)
			case at.Attr.Type == unix.IFA_FLAGS && len(at.Value) >= 4:
				a.Flags = binary.NativeEndian.Uint32(at.Value)
			case at.Attr.Type == ifaProto && len(at.Value) >= 1:
				a.Proto = at.Value[0]
			}
		}
		if !local.IsValid() {
			local = address
		}
		if local.IsValid() {
			a.Prefix, a.Broadcast = netip.PrefixFrom(local.Unmap(), int(msg.Prefixlen)), a.Broadcast.Unmap()
			out = append(out, a)
		}
	}
	return out, nil
}

// Dump lists the state, one object a line, sorted: a duplicated rule
// appears as often as the kernel holds it.
func (s State) Dump() Dump {
	d := slices.Concat(s.links, s.dups, slices.Collect(maps.Keys(s.Rules)), slices.Collect(maps.Keys(s.Routes)),
		slices.Collect(maps.Keys(s.Addrs)))
	for k, v := range s.Sysctls {
		d = append(d, "sysctl "+k+" = "+v)
	}
	slices.Sort(d)
	return d
}

// WithoutAddrProto returns a copy of s whose addresses forget their
// protocol, to compare with the work of tools that cannot set it.
func (s State) WithoutAddrProto() State {
	out := s
	out.Addrs = make(map[string]Addr, len(s.Addrs))
	for _, a := range s.Addrs {
		a.Proto = 0
		out.Addrs[s.addrKey(a)] = a
	}
	return out
}

// DumpState returns the namespace's State as a Dump once two reads 20 ms
// apart agree, or after a second: the kernel adds and removes some routes
// of its own (IPv6 local routes) a moment after the changes that cause them.
func DumpState(ns *NS) (Dump, error) {
	var last Dump
	for deadline := time.Now().Add(time.Second); ; time.Sleep(20 * time.Millisecond) {
		s, err := ReadState(ns)
		if err != nil {
			return nil, err
		}
		d := s.Dump()
		if slices.Equal(d, last) || time.Now().After(deadline) {
			return d, nil
		}
		last = d
	}
}

// Dump is a state as lines, sorted (State.Dump).
type Dump []string

// Diff returns the lines only in d (removed) and only in other (added).
func (d Dump) Diff(other Dump) (removed, added []string) {
	in := func(s []string, x string) bool { _, ok := slices.BinarySearch(s, x); return ok }
	for _, l := range d {
		if !in(other, l) {
			removed = append(removed, l)
		}
	}
	for _, l := range other {
		if !in(d, l) {
			added = append(added, l)
		}
	}
	return removed, added
}

// Grep returns the lines containing every one of words.
func (d Dump) Grep(words ...string) []string {
	var out []string
	for _, l := range d {
		if !slices.ContainsFunc(words, func(w string) bool { return !strings.Contains(l, w) }) {
			out = append(out, l)
		}
	}
	return out
}

func (d Dump) String() string { return strings.Join(d, "\n") }

// Command is one iproute2 command, `ip -4|-6 <Args...>`: `ip rule` cannot
// infer the family from the address, so every command names it.
type Command struct {
	V6   bool
	Args []string
}

// Family is the command's -4 or -6.
func (c Command) Family() string {
	if c.V6 {
		return "-6"
	}
	return "-4"
}

func (c Command) String() string { return "ip " + c.Family() + " " + strings.Join(c.Args, " ") }

func (s State) linkName(index int) string {
	if n, ok := s.LinkNames[index]; ok {
		return n
	}
	return fmt.Sprintf("if%d", index)
}

// addrKey adds to the address's command the flags the kernel sets itself.
func (s State) addrKey(a Addr) string {
	k := s.AddrCommand(a, true).String()
	if a.Flags&unix.IFA_F_PERMANENT != 0 {
		k += " # permanent"
	}
	if a.Flags&unix.IFA_F_SECONDARY != 0 {
		k += " # secondary"
	}
	return k
}

// AddrCommand is `ip addr add` for a (with its protocol if withProto).
func (s State) AddrCommand(a Addr, withProto bool) Command {
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
	}{{unix.IFA_F_NOPREFIXROUTE, "noprefixroute"}, {unix.IFA_F_NODAD, "nodad"}, {unix.IFA_F_HOMEADDRESS, "home"}, {unix.IFA_F_MANAGETEMPADDR, "mngtmpaddr"}} {
		if a.Flags&f.bit != 0 {
			args = append(args, f.word)
		}
	}
	if withProto && a.Proto != 0 {
		args = append(args, "proto", strconv.Itoa(int(a.Proto)))
	}
	return Command{V6: a.Prefix.Addr().Is6(), Args: args}
}

var routeTypes = map[int]string{
	unix.RTN_LOCAL: "local", unix.RTN_BROADCAST: "broadcast", unix.RTN_ANYCAST: "anycast",
	unix.RTN_MULTICAST: "multicast", unix.RTN_BLACKHOLE: "blackhole", unix.RTN_UNREACHABLE: "unreachable",
	unix.RTN_PROHIBIT: "prohibit", unix.RTN_THROW: "throw",
}

// RouteCommand is `ip route add` for r.
func (s State) RouteCommand(r netlink.Route) Command {
	args := []string{"route", "add"}
	if t, ok := routeTypes[r.Type]; ok {
		args = append(args, t)
	}
	args = append(args, netString(r.Dst, "default"))
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
	if r.Family != netlink.FAMILY_V6 { // IPv6 routes have no scope
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
	return Command{V6: r.Family == netlink.FAMILY_V6, Args: args}
}

// RuleCommand is `ip rule add` for r.
func (s State) RuleCommand(r netlink.Rule) Command {
	args := []string{"rule", "add"}
	if r.Invert {
		args = append(args, "not")
	}
	args = append(args, "from", netString(r.Src, "all"))
	if r.Dst != nil {
		args = append(args, "to", netString(r.Dst, "all"))
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
	args = append(args, "pref", strconv.Itoa(r.Priority), "proto", strconv.Itoa(int(r.Protocol)))
	return Command{V6: r.Family == netlink.FAMILY_V6, Args: args}
}

// netString prints n as ip does: a host without its prefix length, and no
// prefix or a zero-length one as whole.
func netString(n *net.IPNet, whole string) string {
	ones, bits := 0, 0
	if n != nil {
		ones, bits = n.Mask.Size()
	}
	switch {
	case ones == 0:
		return whole
	case ones == bits:
		return n.IP.String()
	}
	return n.String()
}
