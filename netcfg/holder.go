package netcfg

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// KernelAddr is an address dualhomed does not own, as the kernel reports it:
// what names the holder of an address dualhomed could not add.
type KernelAddr struct {
	LinkIndex int
	Prefix    netip.Prefix
	Proto     uint8 // IFA_PROTO; 0 when absent (a DHCP client sets none)
	// Dynamic is true for an address with finite lifetimes (not
	// IFA_F_PERMANENT): a DHCP client's lease, or SLAAC's.
	Dynamic bool
	// NoPrefixRoute is IFA_F_NOPREFIXROUTE: the kernel adds no prefix
	// route for it; its owner may put one in a table of its own
	// (networkd does with DHCPv4 RouteTable=, as amazon-ec2-net-utils
	// configures it), or none.
	NoPrefixRoute bool
}

// ifaProtoKernelRA is IFAPROT_KERNEL_RA: SLAAC made the address from a
// router advertisement.
const ifaProtoKernelRA = 2

// Blocked is one add of ours another program's object keeps out of the
// kernel (it answers EEXIST), as warnings, logs, status and plan name it.
type Blocked struct {
	// Object is the add in `ip` syntax without the verb: `route default
	// via 10.3.1.1 dev eth3 table 20003`, `address 10.3.1.10/24 dev eth3`.
	Object string `json:"object"`
	// Holder is the other program's object that holds its place, as read
	// back from the kernel: `route default via 10.3.1.1 dev eth3 table
	// 20003 proto dhcp metric 0`, `dynamic address 10.3.1.10/24 dev eth3,
	// proto 0: a DHCP client`.
	Holder string `json:"holder"`
}

// Blocked names op (an add) and the object that obs shows holding its place.
func (obs Observed) Blocked(op Op) Blocked {
	names := linkNames(obs.Links)
	object := strings.TrimPrefix(op.Format(names), "+ ")
	if op.Addr != nil {
		object = "address " + strings.TrimPrefix(object, "addr ")
	}
	b := Blocked{Object: object, Holder: obs.holder(op, names)}
	if b.Holder == "" {
		b.Holder = "nothing the kernel lists now (the holder went, or the object left with its link): tried again on the next kernel change"
	}
	return b
}

// holder describes the foreign object with op's identity (see ObjectKey).
func (obs Observed) holder(op Op, names map[int]string) string {
	switch {
	case op.Route != nil:
		for _, r := range obs.ForeignRoutes {
			if r.Table == op.Route.Table && r.Dst == op.Route.Dst {
				return fmt.Sprintf("route %s proto %s metric %d", r.Route.Format(names), protoName(r.Protocol), r.Metric)
			}
		}
	case op.Rule != nil:
		for _, r := range obs.ForeignRules {
			if r.Priority == op.Rule.Priority && r.Src == op.Rule.Src && r.Table == op.Rule.Table && r.Mark == op.Rule.Mark && r.Mask == op.Rule.Mask {
				s := fmt.Sprintf("rule %s proto %s", describeRule(r), protoName(r.Protocol))
				if r.Mark != 0 {
					s += fmt.Sprintf(" fwmark %#x/%#x", r.Mark, r.Mask)
				}
				if r.Selectors {
					s += " and more selectors (iif, oif, tos, not...)"
				}
				return s
			}
		}
	case op.Addr != nil:
		for _, a := range obs.ForeignAddrs {
			if a.LinkIndex != op.Addr.LinkIndex || a.Prefix.Addr() != op.Addr.Prefix.Addr() {
				continue
			}
			kind, who := "permanent", ""
			switch {
			case a.Dynamic && a.Proto == ifaProtoKernelRA:
				kind, who = "dynamic", ": SLAAC, from a router advertisement"
			case a.Dynamic:
				kind, who = "dynamic", ": a DHCP client"
			}
			return fmt.Sprintf("%s address %s dev %s, proto %d%s", kind, a.Prefix, linkName(names, a.LinkIndex), a.Proto, who)
		}
	}
	return ""
}

// protoName is a route's or rule's protocol as ip(8) names it
// (/usr/share/iproute2/rt_protos), else its number.
func protoName(p uint8) string {
	switch p {
	case unix.RTPROT_KERNEL:
		return "kernel"
	case unix.RTPROT_BOOT:
		return "boot"
	case unix.RTPROT_STATIC:
		return "static"
	case unix.RTPROT_RA:
		return "ra"
	case unix.RTPROT_DHCP:
		return "dhcp"
	}
	return strconv.Itoa(int(p))
}
