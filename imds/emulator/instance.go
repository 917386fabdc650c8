package emulator

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/dualhomed/dualhomed/imds"
)

// Instance is the emulated EC2 instance: the model the emulator renders into
// IMDS keys. ENIs use the shared imds.ENI type as the source of truth; its
// Ready and NotReadyReason fields are ignored (readiness is the client's
// conclusion, not something IMDS says).
type Instance struct {
	InstanceID   string // meta-data/instance-id, e.g. "i-0123456789abcdef0"
	InstanceType string // meta-data/instance-type; "c6in.large" when empty
	Region       string // meta-data/placement/region; "us-east-1" when empty; the zone is its "a"
	// PrimaryMAC is served as meta-data/mac (absent when empty).
	PrimaryMAC string
	// ENIs are listed under meta-data/network/interfaces/macs/ in this order.
	ENIs []imds.ENI
	// MultiCard makes every ENI serve the network-card key, as instance types
	// with several network cards do. It is implied when any ENI has
	// NetworkCard != 0; on single-card instances IMDS has no network-card key.
	MultiCard bool
}

// Clone returns a deep copy, so a snapshot never aliases the server's state.
func (inst Instance) Clone() Instance {
	out := inst
	out.ENIs = make([]imds.ENI, len(inst.ENIs))
	for i, e := range inst.ENIs {
		out.ENIs[i] = cloneENI(e)
	}
	return out
}

func cloneENI(e imds.ENI) imds.ENI {
	e.SubnetIPv6CIDRs = slices.Clone(e.SubnetIPv6CIDRs)
	e.VPCIPv4CIDRs = slices.Clone(e.VPCIPv4CIDRs)
	e.VPCIPv6CIDRs = slices.Clone(e.VPCIPv6CIDRs)
	e.LocalIPv4s = slices.Clone(e.LocalIPv4s)
	e.IPv6s = slices.Clone(e.IPv6s)
	e.IPv4Prefixes = slices.Clone(e.IPv4Prefixes)
	e.IPv6Prefixes = slices.Clone(e.IPv6Prefixes)
	return e
}

// Validate reports model errors that would make the emulator serve something
// real IMDS never does: empty or duplicate MACs.
func (inst Instance) Validate() error {
	seen := make(map[string]bool, len(inst.ENIs))
	for i, e := range inst.ENIs {
		if e.MAC == "" {
			return fmt.Errorf("ENIs[%d]: empty MAC", i)
		}
		if strings.ContainsAny(e.MAC, "/ \n") {
			return fmt.Errorf("ENIs[%d]: MAC %q contains '/', space or newline", i, e.MAC)
		}
		if seen[e.MAC] {
			return fmt.Errorf("ENIs[%d]: duplicate MAC %s", i, e.MAC)
		}
		seen[e.MAC] = true
	}
	return nil
}

func (inst Instance) eniIndex(mac string) int {
	return slices.IndexFunc(inst.ENIs, func(e imds.ENI) bool { return e.MAC == mac })
}

// ExampleMAC is the deterministic MAC ExampleInstance gives the ENI with the
// given network card and device number: 02:00:00:00:CC:DD in hex.
func ExampleMAC(card, device int) string {
	return fmt.Sprintf("02:00:00:00:%02x:%02x", card, device)
}

// ExampleInstance builds a realistic instance quickly, deterministically:
// n ENIs spread round-robin over cards network cards (cards < 1 means 1), each
// in its own VPC and subnet, with ipv4PerENI private IPv4s, ipv6PerENI IPv6s,
// and prefixesPerENI delegated IPv4 /28 prefixes (plus as many IPv6 /80
// prefixes when the ENI has IPv6). ENI 0 is the primary: card 0, device 0;
// devices on card 0 continue at 1, those on the other cards start at 0, as
// EC2 attaches them.
//
// ENI i (0-based) lives in VPC 10.i.0.0/16 (plus 2001:db8:0:i00::/56 when it
// has IPv6), subnet 10.i.0.0/20; its IPv4s start at 10.i.0.10, its prefixes
// at 10.i.8.0/28, its IPv6s at <subnet>::1000 and its IPv6 prefixes at
// <subnet>:100::/80. ipv4PerENI == 0 makes IPv6-only ENIs (no subnet IPv4
// CIDR, no local-ipv4s). n is at most 256 and ipv4PerENI at most 2000.
func ExampleInstance(n, ipv4PerENI, ipv6PerENI, prefixesPerENI, cards int) Instance {
	if cards < 1 {
		cards = 1
	}
	inst := Instance{
		InstanceID:   "i-0123456789abcdef0",
		InstanceType: "c6in.large",
		Region:       "us-east-1",
		MultiCard:    cards > 1,
	}
	for i := range n {
		card := i % cards
		device := i / cards
		e := imds.ENI{
			MAC:          ExampleMAC(card, device),
			DeviceNumber: device,
			NetworkCard:  card,
			InterfaceID:  fmt.Sprintf("eni-%017x", 0xe000+i),
			SubnetID:     fmt.Sprintf("subnet-%017x", 0x5000+i),
			VPCID:        fmt.Sprintf("vpc-%017x", 0x7000+i),
			OwnerID:      "123456789012",
			VPCIPv4CIDRs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 16)},
		}
		if ipv4PerENI > 0 {
			e.SubnetIPv4CIDR = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 20)
			for k := range ipv4PerENI {
				host := 10 + k // 10.i.0.10 .. at most 10.i.7.x, below the prefixes
				e.LocalIPv4s = append(e.LocalIPv4s, netip.AddrFrom4([4]byte{10, byte(i), byte(host >> 8), byte(host)}))
			}
			for k := range prefixesPerENI {
				off := 16 * k
				e.IPv4Prefixes = append(e.IPv4Prefixes, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), byte(8 + off>>8), byte(off)}), 28))
			}
		}
		if ipv6PerENI > 0 {
			base := [16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, byte(i), 0}
			e.VPCIPv6CIDRs = []netip.Prefix{netip.PrefixFrom(netip.AddrFrom16(base), 56)}
			e.SubnetIPv6CIDRs = []netip.Prefix{netip.PrefixFrom(netip.AddrFrom16(base), 64)}
			for k := range ipv6PerENI {
				a := base
				v := 0x1000 + k
				a[14], a[15] = byte(v>>8), byte(v)
				e.IPv6s = append(e.IPv6s, netip.AddrFrom16(a))
			}
			for k := range prefixesPerENI {
				a := base
				v := 0x100 + k
				a[8], a[9] = byte(v>>8), byte(v)
				e.IPv6Prefixes = append(e.IPv6Prefixes, netip.PrefixFrom(netip.AddrFrom16(a), 80))
			}
		}
		inst.ENIs = append(inst.ENIs, e)
	}
	if n > 0 {
		inst.PrimaryMAC = inst.ENIs[0].MAC
	}
	return inst
}
