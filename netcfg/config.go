package netcfg

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/dualhomed/dualhomed/imds"
)

// MaxNetworkCards bounds the network card index Validate plans the table and
// priority ranges for (the largest EC2 instance types have 32 cards).
const MaxNetworkCards = 32

// maxPriority is the last rule priority before the kernel's main (32766) and
// default (32767) rules.
const maxPriority = 32765

// Kernel protocol values below this are the kernel's own (unspec, redirect,
// kernel, boot, static): marking our objects with one of them would make us
// claim routes that are not ours.
const minProtocol = 5

// Validate checks that the configuration can be applied safely: a protocol
// that is not the kernel's own, table and priority ranges that stay clear of
// the reserved tables (0, 253, 254, 255) and of the main and default rules
// for MaxNetworkCards cards, known modes and usable per-ENI entries. The
// error lists every problem, each naming its key.
func (c Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if c.Protocol < minProtocol {
		bad("protocol: %d is reserved for the kernel (0..%d); use e.g. %d", c.Protocol, minProtocol-1, DefaultProtocol)
	}
	if c.CardStride <= 0 {
		bad("card_stride: must be positive, got %d", c.CardStride)
	} else {
		span := c.CardStride * MaxNetworkCards // tables and priorities used: base .. base+span-1
		lo, hi := c.TableBase, c.TableBase+span-1
		switch {
		case lo < 1 || hi > 1<<31-1:
			bad("table_base: tables %d..%d must stay within 1..%d", lo, hi, 1<<31-1)
		case lo <= 255 && hi >= 253:
			bad("table_base: tables %d..%d include a reserved table (253 default, 254 main, 255 local)", lo, hi)
		}
		lo, hi = c.PriorityBase, c.PriorityBase+span-1
		if lo < 1 || hi > maxPriority {
			bad("priority_base: priorities %d..%d must stay within 1..%d (before the main rule)", lo, hi, maxPriority)
		}
	}
	if !slices.Contains([]RPFilterMode{"", RPFilterLoose, RPFilterStrict, RPFilterKeep}, c.RPFilter) {
		bad("rp_filter: %q is not one of loose, strict, keep", c.RPFilter)
	}
	vpcRoutesModes := []VPCRoutesMode{"", VPCRoutesAuto, VPCRoutesOff}
	if !slices.Contains(vpcRoutesModes, c.VPCRoutes) {
		bad("vpc_routes: %q is not one of auto, off", c.VPCRoutes)
	}
	if c.RPFilter == RPFilterStrict && slices.ContainsFunc(c.ENIs, func(e ENIConfig) bool { return e.NAT }) {
		// The reverse path of an internet-bound client is the default
		// route through the primary, not the source ENI it came in on.
		bad("rp_filter: strict drops the clients of NAT sources (enis ... nat: true); use loose")
	}
	routed := map[netip.Prefix]string{} // CIDR of routes -> its key
	for i, e := range c.ENIs {
		key := fmt.Sprintf("enis[%d]", i)
		m := e.Match
		if m.InterfaceID == "" && m.MAC == "" && m.DeviceNumber == nil && m.VPCID == "" {
			bad("%s.match: empty selector would match every ENI; set interface_id, mac, device_number or vpc_id", key)
		}
		if m.InterfaceID != "" && !strings.HasPrefix(m.InterfaceID, "eni-") {
			bad("%s.match.interface_id: %q is not an ENI id (eni-...)", key, m.InterfaceID)
		}
		if m.VPCID != "" && !strings.HasPrefix(m.VPCID, "vpc-") {
			bad("%s.match.vpc_id: %q is not a VPC id (vpc-...)", key, m.VPCID)
		}
		if m.MAC != "" {
			if hw, err := net.ParseMAC(m.MAC); err != nil || len(hw) != 6 {
				bad("%s.match.mac: %q is not a MAC address like 0a:1b:2c:3d:4e:5f", key, m.MAC)
			}
		}
		if m.DeviceNumber != nil && *m.DeviceNumber < 0 {
			bad("%s.match.device_number: %d is negative", key, *m.DeviceNumber)
		}
		if !slices.Contains(vpcRoutesModes, e.VPCRoutes) {
			bad("%s.vpc_routes: %q is not one of auto, off", key, e.VPCRoutes)
		}
		e.validateRoutesAndNAT(key, routed, bad)
	}
	return errors.Join(errs...)
}

// validateRoutesAndNAT checks the routes and the NAT of entry key; routed
// maps each CIDR of the entries before it to its key.
func (e ENIConfig) validateRoutesAndNAT(key string, routed map[netip.Prefix]string, bad func(format string, args ...any)) {
	if e.Exclude && (len(e.Routes) > 0 || e.NAT) {
		bad("%s: exclude contradicts routes and nat", key)
	}
	if len(e.NATSources) > 0 && !e.NAT {
		bad("%s.nat_sources: given without nat: true", key)
	}
	for j, p := range e.NATSources {
		switch pk := fmt.Sprintf("%s.nat_sources[%d]", key, j); {
		case !p.IsValid() || !p.Addr().Is4():
			bad("%s: %v is not an IPv4 CIDR (AWS has no IPv6 NAT)", pk, p.Prefix)
		case p.Prefix != p.Masked():
			bad("%s: %v has host bits set; did you mean %v?", pk, p.Prefix, p.Masked())
		}
	}
	for j, r := range e.Routes {
		rk := fmt.Sprintf("%s.routes[%d]", key, j)
		switch {
		case !r.IsValid():
			bad("%s: invalid prefix", rk)
		case r.Bits() == 0:
			bad("%s: %v is the default route, which stays with the primary ENI", rk, r)
		case r.Prefix != r.Masked():
			bad("%s: %v has host bits set; did you mean %v?", rk, r, r.Masked())
		case routed[r.Prefix] != "":
			bad("%s: %v is routed by %s too; a CIDR goes through one ENI", rk, r, routed[r.Prefix])
		default:
			routed[r.Prefix] = rk
		}
	}
}

// Matches reports whether the selector picks e. Empty fields match anything.
func (s Selector) Matches(e imds.ENI) bool {
	return (s.InterfaceID == "" || s.InterfaceID == e.InterfaceID) &&
		(s.MAC == "" || strings.EqualFold(s.MAC, e.MAC)) &&
		(s.DeviceNumber == nil || *s.DeviceNumber == e.DeviceNumber) &&
		(s.VPCID == "" || s.VPCID == e.VPCID)
}

// eniConfig returns the first per-ENI entry matching e, or the zero entry,
// with the top-level VPCRoutes filled in when the entry does not say.
func (c Config) eniConfig(e imds.ENI) ENIConfig {
	var out ENIConfig
	for _, ec := range c.ENIs {
		if ec.Match.Matches(e) {
			out = ec
			break
		}
	}
	if out.VPCRoutes == "" {
		out.VPCRoutes = c.VPCRoutes
	}
	return out
}

// rpFilterMode treats the unset mode as the default (loose) and an unknown
// one (Validate rejects it) as keep: when in doubt, touch nothing.
func (c Config) rpFilterMode() RPFilterMode {
	switch c.RPFilter {
	case "":
		return RPFilterLoose
	case RPFilterLoose, RPFilterStrict:
		return c.RPFilter
	default:
		return RPFilterKeep
	}
}

func (c Config) rpFilterValue() int {
	if c.rpFilterMode() == RPFilterStrict {
		return 1
	}
	return 2
}

// validTable reports whether t is a table id dualhomed may own.
func validTable(t int) bool {
	return t > 0 && t <= 1<<31-1 && (t < 253 || t > 255)
}
