package netcfg

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
)

// eth1Basic is what secondary ENI 1 (vpc-b, device 1, on eth1) gets with the
// defaults when the primary (vpc-a) does not overlap it.
var eth1Basic = []string{
	"addr 10.1.1.10/24 dev eth1",
	"addr 10.1.1.11/32 dev eth1 noprefixroute",
	"route 10.1.1.0/24 dev eth1 scope link src 10.1.1.10 table 20001",
	"route default via 10.1.1.1 dev eth1 src 10.1.1.10 table 20001",
	"route 10.1.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
	"rule from 10.1.1.10/32 lookup 20001 priority 20001",
	"rule from 10.1.1.11/32 lookup 20001 priority 20001",
	"sysctl net.ipv4.conf.eth1.rp_filter=2",
}

func with(base []string, extra ...string) []string {
	return append(slices.Clone(base), extra...)
}

func without(base []string, drop ...string) []string {
	return slices.DeleteFunc(slices.Clone(base), func(s string) bool { return slices.Contains(drop, s) })
}

func TestDesired(t *testing.T) {
	// The primary's own address is normally there already (DHCP): foreign.
	primaryAddr := map[int][]netip.Prefix{1: desPfxs("10.0.0.10/24")}

	tests := []struct {
		name   string
		enis   []imds.ENI
		links  []Link
		addrs  map[int][]netip.Prefix // nil: primaryAddr
		owned  State
		config func(*Config)
		want   []string
		states map[string]ENIState // by MAC
		warns  []string            // substrings expected in Result.Warnings
	}{
		{
			name:   "one multi-VPC secondary",
			enis:   []imds.ENI{desPrimary(), desSecondary(1)},
			links:  desLinks(0, 1),
			want:   eth1Basic,
			states: map[string]ENIState{desMAC(0): ENIPrimaryRole, desMAC(1): ENIConfigured},
		},
		{
			name: "secondary in the primary's VPC gets no main-table routes",
			enis: []imds.ENI{desPrimary(), func() imds.ENI {
				e := desSecondary(1)
				e.VPCID, e.VPCIPv4CIDRs, e.SubnetIPv4CIDR = "vpc-a", desPfxs("10.0.0.0/16"), desPfx("10.0.1.0/24")
				e.LocalIPv4s = desIPs("10.0.1.10")
				return e
			}()},
			links: desLinks(0, 1),
			want: []string{
				"addr 10.0.1.10/24 dev eth1",
				"route 10.0.1.0/24 dev eth1 scope link src 10.0.1.10 table 20001",
				"route default via 10.0.1.1 dev eth1 src 10.0.1.10 table 20001",
				"rule from 10.0.1.10/32 lookup 20001 priority 20001",
				"sysctl net.ipv4.conf.eth1.rp_filter=2",
			},
		},
		{
			name: "two network cards",
			enis: []imds.ENI{desPrimary(), desSecondary(1), func() imds.ENI {
				e := desSecondary(2)
				e.NetworkCard, e.DeviceNumber = 1, 0
				e.LocalIPv4s = e.LocalIPv4s[:1]
				return e
			}(), func() imds.ENI {
				e := desSecondary(3)
				e.NetworkCard, e.DeviceNumber = 1, 1
				e.LocalIPv4s = e.LocalIPv4s[:1]
				return e
			}()},
			links: desLinks(0, 1, 2, 3),
			want: with(eth1Basic,
				"addr 10.1.2.10/24 dev eth2",
				"route 10.1.2.0/24 dev eth2 scope link src 10.1.2.10 table 20100",
				"route default via 10.1.2.1 dev eth2 src 10.1.2.10 table 20100",
				"rule from 10.1.2.10/32 lookup 20100 priority 20100",
				"sysctl net.ipv4.conf.eth2.rp_filter=2",
				"addr 10.1.3.10/24 dev eth3",
				"route 10.1.3.0/24 dev eth3 scope link src 10.1.3.10 table 20101",
				"route default via 10.1.3.1 dev eth3 src 10.1.3.10 table 20101",
				"rule from 10.1.3.10/32 lookup 20101 priority 20101",
				"sysctl net.ipv4.conf.eth3.rp_filter=2",
			),
		},
		{
			name: "IPv6-only secondary",
			enis: []imds.ENI{desPrimary(), {
				MAC: desMAC(1), Ready: true, DeviceNumber: 1, InterfaceID: "eni-1", VPCID: "vpc-b",
				SubnetIPv6CIDRs: desPfxs("2600:1f18:1:1::/64"), VPCIPv6CIDRs: desPfxs("2600:1f18:1::/56"),
				IPv6s: desIPs("2600:1f18:1:1::10", "2600:1f18:1:1::11"),
			}},
			links: desLinks(0, 1),
			want: []string{
				"addr 2600:1f18:1:1::10/128 dev eth1 noprefixroute",
				"addr 2600:1f18:1:1::11/128 dev eth1 noprefixroute",
				"route 2600:1f18:1:1::/64 dev eth1 table 20001",
				"route default via fe80:ec2::1 dev eth1 table 20001",
				"route 2600:1f18:1::/56 via fe80:ec2::1 dev eth1 src 2600:1f18:1:1::10 table main",
				"rule from 2600:1f18:1:1::10/128 lookup 20001 priority 20001",
				"rule from 2600:1f18:1:1::11/128 lookup 20001 priority 20001",
				"sysctl net.ipv4.conf.eth1.rp_filter=2",
			},
		},
		{
			name: "dual stack with delegated prefixes",
			enis: []imds.ENI{desPrimary(), func() imds.ENI {
				e := desSecondary(1)
				e.LocalIPv4s = e.LocalIPv4s[:1]
				e.IPv4Prefixes = desPfxs("10.1.1.32/28", "10.1.1.48/28")
				e.SubnetIPv6CIDRs = desPfxs("2600:1f18:1:1::/64")
				e.IPv6s = desIPs("2600:1f18:1:1::10")
				e.IPv6Prefixes = desPfxs("2600:1f18:1:1:8000::/80")
				return e
			}()},
			links: desLinks(0, 1),
			want: []string{
				"addr 10.1.1.10/24 dev eth1",
				"addr 2600:1f18:1:1::10/128 dev eth1 noprefixroute",
				"route 10.1.1.0/24 dev eth1 scope link src 10.1.1.10 table 20001",
				"route default via 10.1.1.1 dev eth1 src 10.1.1.10 table 20001",
				"route 2600:1f18:1:1::/64 dev eth1 table 20001",
				"route default via fe80:ec2::1 dev eth1 table 20001",
				"route 10.1.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
				"rule from 10.1.1.10/32 lookup 20001 priority 20001",
				"rule from 10.1.1.32/28 lookup 20001 priority 20001",
				"rule from 10.1.1.48/28 lookup 20001 priority 20001",
				"rule from 2600:1f18:1:1::10/128 lookup 20001 priority 20001",
				"rule from 2600:1f18:1:1:8000::/80 lookup 20001 priority 20001",
				"sysctl net.ipv4.conf.eth1.rp_filter=2",
			},
		},
		{
			name: "subnet and VPC overlapping the primary's: noprefixroute, no main-table route",
			enis: []imds.ENI{desPrimary(), func() imds.ENI {
				e := desSecondary(1)
				e.SubnetIPv4CIDR, e.VPCIPv4CIDRs = desPfx("10.0.0.0/24"), desPfxs("10.0.0.0/16", "100.64.0.0/16")
				e.LocalIPv4s = desIPs("10.0.0.20")
				return e
			}()},
			links: desLinks(0, 1),
			want: []string{
				"addr 10.0.0.20/24 dev eth1 noprefixroute",
				"route 10.0.0.0/24 dev eth1 scope link src 10.0.0.20 table 20001",
				"route default via 10.0.0.1 dev eth1 src 10.0.0.20 table 20001",
				"rule from 10.0.0.20/32 lookup 20001 priority 20001",
				"sysctl net.ipv4.conf.eth1.rp_filter=2",
			},
			warns: []string{
				"not routing 10.0.0.0/16 of vpc-b through eth1 in the main table: it overlaps 10.0.0.0/16 of vpc-a",
				// 100.64.0.0/16 would need the gateway reachable in main.
				"not routing [100.64.0.0/16] through eth1 in the main table: the gateway 10.0.0.1 is not on-link in main and the subnet 10.0.0.0/24 overlaps another subnet",
			},
		},
		{
			name: "two ENIs in one subnet of another VPC: the carrier holds the subnet in main",
			enis: []imds.ENI{desPrimary(), desSecondary(1), func() imds.ENI {
				e := desSecondary(2)
				e.SubnetIPv4CIDR, e.LocalIPv4s = desPfx("10.1.1.0/24"), desIPs("10.1.1.20")
				return e
			}()},
			links: desLinks(0, 1, 2),
			want: []string{
				"addr 10.1.1.10/24 dev eth1 noprefixroute",
				"addr 10.1.1.11/32 dev eth1 noprefixroute",
				"addr 10.1.1.20/24 dev eth2 noprefixroute",
				"route 10.1.1.0/24 dev eth1 scope link src 10.1.1.10 table 20001",
				"route default via 10.1.1.1 dev eth1 src 10.1.1.10 table 20001",
				"route 10.1.1.0/24 dev eth1 scope link src 10.1.1.10 table main",
				"route 10.1.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
				"rule from 10.1.1.10/32 lookup 20001 priority 20001",
				"rule from 10.1.1.11/32 lookup 20001 priority 20001",
				"sysctl net.ipv4.conf.eth1.rp_filter=2",
				"route 10.1.1.0/24 dev eth2 scope link src 10.1.1.20 table 20002",
				"route default via 10.1.1.1 dev eth2 src 10.1.1.20 table 20002",
				"rule from 10.1.1.20/32 lookup 20002 priority 20002",
				"sysctl net.ipv4.conf.eth2.rp_filter=2",
			},
		},
		{
			name: "two other VPCs overlapping each other: each keeps only its own CIDRs",
			enis: []imds.ENI{desPrimary(), desSecondary(1), func() imds.ENI {
				e := desSecondary(2)
				e.VPCID, e.VPCIPv4CIDRs = "vpc-c", desPfxs("10.1.2.0/24", "10.3.0.0/16")
				e.LocalIPv4s = e.LocalIPv4s[:1]
				return e
			}()},
			links: desLinks(0, 1, 2),
			want: with(without(eth1Basic, "route 10.1.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main"),
				"addr 10.1.2.10/24 dev eth2",
				"route 10.1.2.0/24 dev eth2 scope link src 10.1.2.10 table 20002",
				"route default via 10.1.2.1 dev eth2 src 10.1.2.10 table 20002",
				"route 10.3.0.0/16 via 10.1.2.1 dev eth2 src 10.1.2.10 table main",
				"rule from 10.1.2.10/32 lookup 20002 priority 20002",
				"sysctl net.ipv4.conf.eth2.rp_filter=2",
			),
			warns: []string{
				"not routing 10.1.0.0/16 of vpc-b through eth1 in the main table: it overlaps 10.1.2.0/24 of vpc-c",
			},
		},
		{
			name: "two ENIs of one other VPC: the lower device carries the VPC routes",
			enis: []imds.ENI{desPrimary(), desSecondary(1), func() imds.ENI {
				e := desSecondary(2)
				e.LocalIPv4s = e.LocalIPv4s[:1]
				return e
			}()},
			links: desLinks(0, 1, 2),
			want: with(eth1Basic,
				"addr 10.1.2.10/24 dev eth2",
				"route 10.1.2.0/24 dev eth2 scope link src 10.1.2.10 table 20002",
				"route default via 10.1.2.1 dev eth2 src 10.1.2.10 table 20002",
				"rule from 10.1.2.10/32 lookup 20002 priority 20002",
				"sysctl net.ipv4.conf.eth2.rp_filter=2",
			),
		},
		{
			name:  "excluded by interface id, VPC, MAC or device number",
			enis:  []imds.ENI{desPrimary(), desSecondary(1), desSecondary(2), desSecondary(3), desSecondary(4)},
			links: desLinks(0, 1, 2, 3, 4),
			config: func(c *Config) {
				c.ENIs = []ENIConfig{
					{Match: Selector{InterfaceID: "eni-1"}, VPCRoutes: VPCRoutesAuto}, // first match wins: eni-1 stays managed
					{Match: Selector{VPCID: "vpc-b", DeviceNumber: desInt(2)}, Exclude: true},
					{Match: Selector{MAC: strings.ToUpper(desMAC(3))}, Exclude: true},
					{Match: Selector{DeviceNumber: desInt(4)}, Exclude: true},
					{Match: Selector{VPCID: "vpc-b"}, Exclude: true},
				}
			},
			want: eth1Basic,
			states: map[string]ENIState{
				desMAC(1): ENIConfigured, desMAC(2): ENIExcluded, desMAC(3): ENIExcluded, desMAC(4): ENIExcluded,
			},
		},
		{
			name:  "excluded ENI loses what we owned on it",
			enis:  []imds.ENI{desPrimary(), desSecondary(1)},
			links: desLinks(0, 1),
			owned: State{
				Rules: []Rule{{Priority: 20001, Src: desPfx("10.1.1.10/32"), Table: 20001}},
				Addrs: []Addr{{LinkIndex: 2, Prefix: desPfx("10.1.1.11/32"), NoPrefixRoute: true}},
			},
			addrs:  map[int][]netip.Prefix{1: desPfxs("10.0.0.10/24"), 2: desPfxs("10.1.1.11/32")},
			config: func(c *Config) { c.ENIs = []ENIConfig{{Match: Selector{InterfaceID: "eni-1"}, Exclude: true}} },
			want:   nil,
			states: map[string]ENIState{desMAC(1): ENIExcluded},
		},
		{
			name: "not ready: nothing new, what we own on its link is kept",
			enis: []imds.ENI{desPrimary(), func() imds.ENI {
				e := desSecondary(1)
				e.Ready, e.NotReadyReason, e.DeviceNumber = false, "device-number 0 on a secondary MAC", 0
				return e
			}(), func() imds.ENI {
				e := desSecondary(2)
				e.Ready, e.NotReadyReason = false, "device-number missing"
				return e
			}()},
			links: desLinks(0, 1, 2),
			owned: State{
				Routes: []Route{{Table: 20001, Dst: desPfx("0.0.0.0/0"), Gateway: desIP("10.1.1.1"), LinkIndex: 2, Src: desIP("10.1.1.10")}},
				Rules: []Rule{
					{Priority: 20001, Src: desPfx("10.1.1.10/32"), Table: 20001},
					{Priority: 20009, Src: desPfx("10.9.9.9/32"), Table: 20009}, // a detached ENI's: goes
				},
				Addrs:     []Addr{{LinkIndex: 2, Prefix: desPfx("10.1.1.10/24")}},
				RPFilters: []RPFilter{{LinkName: "eth1", Value: 2}},
			},
			addrs: map[int][]netip.Prefix{1: desPfxs("10.0.0.10/24"), 2: desPfxs("10.1.1.10/24")},
			want: []string{
				"route default via 10.1.1.1 dev eth1 src 10.1.1.10 table 20001",
				"rule from 10.1.1.10/32 lookup 20001 priority 20001",
				"addr 10.1.1.10/24 dev eth1",
				"sysctl net.ipv4.conf.eth1.rp_filter=2",
			},
			states: map[string]ENIState{desMAC(1): ENIWaitingIMDS, desMAC(2): ENIWaitingIMDS},
		},
		{
			name:   "no link yet",
			enis:   []imds.ENI{desPrimary(), desSecondary(1)},
			links:  desLinks(0),
			want:   nil,
			states: map[string]ENIState{desMAC(1): ENIWaitingLink},
		},
		{
			name:   "primary table option",
			enis:   []imds.ENI{desPrimary(), desSecondary(1)},
			links:  desLinks(0, 1),
			config: func(c *Config) { c.PrimaryTable = true },
			want: with(eth1Basic,
				"route 10.0.0.0/24 dev eth0 scope link src 10.0.0.10 table 20000",
				"route default via 10.0.0.1 dev eth0 src 10.0.0.10 table 20000",
				"rule from 10.0.0.10/32 lookup 20000 priority 20000",
			),
		},
		{
			name: "primary addresses are managed, first one foreign with another length",
			enis: []imds.ENI{func() imds.ENI {
				e := desPrimary()
				e.LocalIPv4s = desIPs("10.0.0.10", "10.0.0.11")
				e.IPv6s = desIPs("2600:1f18:0:1::10")
				return e
			}()},
			links: desLinks(0),
			addrs: map[int][]netip.Prefix{1: desPfxs("10.0.0.10/32")},
			want: []string{
				"addr 10.0.0.11/32 dev eth0 noprefixroute",
				"addr 2600:1f18:0:1::10/128 dev eth0 noprefixroute",
			},
		},
		{
			name:  "our own addresses stay desired although they are on the link",
			enis:  []imds.ENI{desPrimary(), desSecondary(1)},
			links: desLinks(0, 1),
			addrs: map[int][]netip.Prefix{1: desPfxs("10.0.0.10/24"), 2: desPfxs("10.1.1.10/24", "10.1.1.11/32")},
			owned: State{Addrs: []Addr{
				{LinkIndex: 2, Prefix: desPfx("10.1.1.10/24")},
				{LinkIndex: 2, Prefix: desPfx("10.1.1.11/32"), NoPrefixRoute: true},
			}},
			want: eth1Basic,
		},
		{
			name:  "a foreign address is never ours to add",
			enis:  []imds.ENI{desPrimary(), desSecondary(1)},
			links: desLinks(0, 1),
			addrs: map[int][]netip.Prefix{1: desPfxs("10.0.0.10/24"), 2: desPfxs("10.1.1.11/24")},
			want:  without(eth1Basic, "addr 10.1.1.11/32 dev eth1 noprefixroute"),
		},
		{
			name: "a one-subnet VPC shared by two ENIs: the carrier holds it in main",
			enis: []imds.ENI{desPrimary(), func() imds.ENI {
				e := desSecondary(1)
				e.VPCIPv4CIDRs, e.LocalIPv4s = desPfxs("10.1.1.0/24"), e.LocalIPv4s[:1]
				return e
			}(), func() imds.ENI {
				e := desSecondary(2)
				e.VPCIPv4CIDRs, e.SubnetIPv4CIDR, e.LocalIPv4s = desPfxs("10.1.1.0/24"), desPfx("10.1.1.0/24"), desIPs("10.1.1.20")
				return e
			}()},
			links: desLinks(0, 1, 2),
			want: []string{
				"addr 10.1.1.10/24 dev eth1 noprefixroute",
				"addr 10.1.1.20/24 dev eth2 noprefixroute",
				"route 10.1.1.0/24 dev eth1 scope link src 10.1.1.10 table 20001",
				"route default via 10.1.1.1 dev eth1 src 10.1.1.10 table 20001",
				"route 10.1.1.0/24 dev eth1 scope link src 10.1.1.10 table main",
				"rule from 10.1.1.10/32 lookup 20001 priority 20001",
				"sysctl net.ipv4.conf.eth1.rp_filter=2",
				"route 10.1.1.0/24 dev eth2 scope link src 10.1.1.20 table 20002",
				"route default via 10.1.1.1 dev eth2 src 10.1.1.20 table 20002",
				"rule from 10.1.1.20/32 lookup 20002 priority 20002",
				"sysctl net.ipv4.conf.eth2.rp_filter=2",
			},
		},
		{
			name: "an overlap arriving later: our existing address keeps its prefix route",
			enis: []imds.ENI{desPrimary(), desSecondary(1), func() imds.ENI {
				e := desSecondary(2)
				e.SubnetIPv4CIDR, e.LocalIPv4s = desPfx("10.1.1.0/24"), desIPs("10.1.1.20")
				return e
			}()},
			links: desLinks(0, 1, 2),
			addrs: map[int][]netip.Prefix{1: desPfxs("10.0.0.10/24"), 2: desPfxs("10.1.1.10/24")},
			owned: State{Addrs: []Addr{{LinkIndex: 2, Prefix: desPfx("10.1.1.10/24")}}},
			want: with(eth1Basic,
				"addr 10.1.1.20/24 dev eth2 noprefixroute",
				"route 10.1.1.0/24 dev eth2 scope link src 10.1.1.20 table 20002",
				"route default via 10.1.1.1 dev eth2 src 10.1.1.20 table 20002",
				"rule from 10.1.1.20/32 lookup 20002 priority 20002",
				"sysctl net.ipv4.conf.eth2.rp_filter=2",
			),
		},
		{
			name:  "first address added by somebody else as /32: the carrier holds its subnet in main",
			enis:  []imds.ENI{desPrimary(), desSecondary(1)},
			links: desLinks(0, 1),
			addrs: map[int][]netip.Prefix{1: desPfxs("10.0.0.10/24"), 2: desPfxs("10.1.1.10/32")},
			want: with(without(eth1Basic, "addr 10.1.1.10/24 dev eth1"),
				"route 10.1.1.0/24 dev eth1 scope link src 10.1.1.10 table main"),
		},
		{
			name:   "addresses unmanaged and missing: no IPv4 routing",
			enis:   []imds.ENI{desPrimary(), desSecondary(1)},
			links:  desLinks(0, 1),
			config: func(c *Config) { c.ManageAddresses = false },
			want:   []string{"sysctl net.ipv4.conf.eth1.rp_filter=2"},
			warns:  []string{"10.1.1.10 is not on eth1"},
		},
		{
			name: "routes, VPC routes off, strict rp_filter",
			enis: []imds.ENI{desPrimary(), func() imds.ENI {
				e := desSecondary(1)
				e.IPv6s = desIPs("2600:1f18:1:1::10")
				return e
			}()},
			links: desLinks(0, 1),
			config: func(c *Config) {
				c.RPFilter = RPFilterStrict
				c.ENIs = []ENIConfig{{Match: Selector{InterfaceID: "eni-1"}, VPCRoutes: VPCRoutesOff,
					Routes: cfgPfxs("192.168.0.0/16", "fd00:1::/48")}}
			},
			want: with(without(eth1Basic,
				"route 10.1.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
				"sysctl net.ipv4.conf.eth1.rp_filter=2"),
				"addr 2600:1f18:1:1::10/128 dev eth1 noprefixroute",
				"route default via fe80:ec2::1 dev eth1 table 20001",
				"rule from 2600:1f18:1:1::10/128 lookup 20001 priority 20001",
				"route 192.168.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
				"route fd00:1::/48 via fe80:ec2::1 dev eth1 src 2600:1f18:1:1::10 table main",
				"sysctl net.ipv4.conf.eth1.rp_filter=1",
			),
		},
		{
			name:  "rp_filter keep, routes of a family the ENI lacks",
			enis:  []imds.ENI{desPrimary(), desSecondary(1)},
			links: desLinks(0, 1),
			config: func(c *Config) {
				c.RPFilter = RPFilterKeep
				c.ENIs = []ENIConfig{{Match: Selector{VPCID: "vpc-b"}, Routes: cfgPfxs("fd00:1::/48")}}
			},
			want:  without(eth1Basic, "sysctl net.ipv4.conf.eth1.rp_filter=2"),
			warns: []string{"test.yaml:1: not routing fd00:1::/48 through eth1: the ENI has no routing for that address family"},
		},
		{
			name:  "routes overlapping the primary ENI's subnet, or matching two ENIs",
			enis:  []imds.ENI{desPrimary(), desSecondary(1), desSecondary(2)},
			links: desLinks(0, 1, 2),
			config: func(c *Config) {
				c.ENIs = []ENIConfig{
					{Match: Selector{InterfaceID: "eni-0"}, Routes: cfgPfxs("172.16.0.0/12")},
					{Match: Selector{VPCID: "vpc-b"}, Routes: cfgPfxs("10.0.0.0/8", "10.0.0.128/25", "192.168.0.0/16")},
				}
			},
			want: with(eth1Basic,
				"route 192.168.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
				"addr 10.1.2.10/24 dev eth2",
				"addr 10.1.2.11/32 dev eth2 noprefixroute",
				"route 10.1.2.0/24 dev eth2 scope link src 10.1.2.10 table 20002",
				"route default via 10.1.2.1 dev eth2 src 10.1.2.10 table 20002",
				"rule from 10.1.2.10/32 lookup 20002 priority 20002",
				"rule from 10.1.2.11/32 lookup 20002 priority 20002",
				"sysctl net.ipv4.conf.eth2.rp_filter=2",
			),
			warns: []string{
				"test.yaml:1: not routing 172.16.0.0/12 through eth0: it is the primary ENI",
				"test.yaml:1: not routing 10.0.0.0/8 through eth1: it overlaps the primary ENI's subnet 10.0.0.0/24",
				"test.yaml:2: not routing 10.0.0.128/25 through eth1: it overlaps the primary ENI's subnet 10.0.0.0/24",
				"test.yaml:3: not routing 192.168.0.0/16 through eth2: the entry matches eth1 too, which routes it",
			},
		},
		{
			name: "routes overlapping VPC routes: the longer prefix wins, an equal one is ours",
			enis: []imds.ENI{desPrimary(), desSecondary(1), func() imds.ENI {
				e := desSecondary(2)
				e.VPCID, e.VPCIPv4CIDRs, e.SubnetIPv4CIDR = "vpc-c", desPfxs("172.20.0.0/16", "10.9.0.0/16"), desPfx("172.20.2.0/24")
				e.LocalIPv4s = desIPs("172.20.2.10")
				return e
			}()},
			links: desLinks(0, 1, 2),
			config: func(c *Config) {
				c.ENIs = []ENIConfig{{Match: Selector{InterfaceID: "eni-1"}, Routes: cfgPfxs("172.16.0.0/12", "10.9.0.0/16")}}
			},
			want: with(eth1Basic,
				"route 172.16.0.0/12 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
				"route 10.9.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
				"addr 172.20.2.10/24 dev eth2",
				"route 172.20.2.0/24 dev eth2 scope link src 172.20.2.10 table 20002",
				"route default via 172.20.2.1 dev eth2 src 172.20.2.10 table 20002",
				"route 172.20.0.0/16 via 172.20.2.1 dev eth2 src 172.20.2.10 table main",
				"rule from 172.20.2.10/32 lookup 20002 priority 20002",
				"sysctl net.ipv4.conf.eth2.rp_filter=2",
			),
			warns: []string{
				"test.yaml:1: 172.16.0.0/12 through eth1 overlaps 172.20.0.0/16 through eth2: the longer prefix wins, 172.20.0.0/16 goes through eth2",
				"not routing 10.9.0.0/16 of vpc-c through eth2 in the main table: test.yaml:2 routes it through eth1",
			},
		},
		{
			name: "two ENIs claim one table: the one owning it keeps it",
			enis: []imds.ENI{desPrimary(), func() imds.ENI {
				e := desSecondary(1)
				e.LocalIPv4s = e.LocalIPv4s[:1]
				return e
			}(), func() imds.ENI {
				e := desSecondary(2)
				e.DeviceNumber = 1
				return e
			}()},
			links: desLinks(0, 1, 2),
			owned: State{Routes: []Route{{Table: 20001, Dst: desPfx("10.1.2.0/24"), LinkIndex: 3, Src: desIP("10.1.2.10"), ScopeLink: true}}},
			want: []string{
				"addr 10.1.2.10/24 dev eth2",
				"addr 10.1.2.11/32 dev eth2 noprefixroute",
				"route 10.1.2.0/24 dev eth2 scope link src 10.1.2.10 table 20001",
				"route default via 10.1.2.1 dev eth2 src 10.1.2.10 table 20001",
				"route 10.1.0.0/16 via 10.1.2.1 dev eth2 src 10.1.2.10 table main",
				"rule from 10.1.2.10/32 lookup 20001 priority 20001",
				"rule from 10.1.2.11/32 lookup 20001 priority 20001",
				"sysctl net.ipv4.conf.eth2.rp_filter=2",
			},
			states: map[string]ENIState{desMAC(1): ENIInvalid, desMAC(2): ENIConfigured},
			warns:  []string{"table 20001 is already used by eni-2"},
		},
		{
			name: "device number beyond the card stride",
			enis: []imds.ENI{desPrimary(), func() imds.ENI {
				e := desSecondary(1)
				e.DeviceNumber = 100
				return e
			}()},
			links:  desLinks(0, 1),
			want:   nil,
			states: map[string]ENIState{desMAC(1): ENIInvalid},
			warns:  []string{"outside the table layout"},
		},
		{
			name: "messy IMDS data: mapped, invalid, duplicate and wrong-family values",
			enis: []imds.ENI{desPrimary(), {
				MAC: strings.ToUpper(desMAC(1)), Ready: true, DeviceNumber: 1, InterfaceID: "eni-1", VPCID: "vpc-b",
				SubnetIPv4CIDR:  netip.PrefixFrom(netip.AddrFrom16(desIP("10.1.1.77").As16()), 120),
				VPCIPv4CIDRs:    []netip.Prefix{{}, desPfx("2600::/56"), desPfx("10.1.0.0/16"), desPfx("10.1.0.0/16")},
				LocalIPv4s:      []netip.Addr{netip.AddrFrom16(desIP("10.1.1.10").As16()), {}, desIP("10.1.1.10"), desIP("::"), desIP("0.0.0.0")},
				IPv4Prefixes:    []netip.Prefix{{}},
				SubnetIPv6CIDRs: desPfxs("10.9.0.0/16"),
			}},
			links: desLinks(0, 1),
			want: []string{
				"addr 10.1.1.10/24 dev eth1",
				"route 10.1.1.0/24 dev eth1 scope link src 10.1.1.10 table 20001",
				"route default via 10.1.1.1 dev eth1 src 10.1.1.10 table 20001",
				"route 10.1.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main",
				"rule from 10.1.1.10/32 lookup 20001 priority 20001",
				"sysctl net.ipv4.conf.eth1.rp_filter=2",
			},
		},
		{
			name: "IPv4 addresses without a subnet",
			enis: []imds.ENI{desPrimary(), func() imds.ENI {
				e := desSecondary(1)
				e.SubnetIPv4CIDR = netip.Prefix{}
				return e
			}()},
			links: desLinks(0, 1),
			want: []string{
				"addr 10.1.1.10/32 dev eth1 noprefixroute",
				"addr 10.1.1.11/32 dev eth1 noprefixroute",
				"sysctl net.ipv4.conf.eth1.rp_filter=2",
			},
			warns: []string{"no subnet-ipv4-cidr-block"},
		},
		{
			name:  "primary missing from the snapshot: no multi-VPC routes",
			enis:  []imds.ENI{desSecondary(1)},
			links: desLinks(0, 1),
			want:  without(eth1Basic, "route 10.1.0.0/16 via 10.1.1.1 dev eth1 src 10.1.1.10 table main"),
			warns: []string{"primary ENI"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := DefaultConfig()
			if tt.config != nil {
				tt.config(&cfg)
			}
			addrs := tt.addrs
			if addrs == nil {
				addrs = primaryAddr
			}
			snap := imds.Snapshot{PrimaryMAC: desMAC(0), ENIs: tt.enis}
			obs := Observed{Links: tt.links, Addrs: addrs, Owned: tt.owned}
			res := Desired(snap, obs, cfg)
			desDiff(t, desLines(res.State, desNames(8)), tt.want)

			for mac, want := range tt.states {
				i := slices.IndexFunc(res.ENIs, func(s ENIStatus) bool { return s.MAC == mac })
				if i < 0 {
					t.Errorf("no status for %s", mac)
				} else if res.ENIs[i].State != want {
					t.Errorf("%s: state %q, want %q (warnings %q)", mac, res.ENIs[i].State, want, res.ENIs[i].Warnings)
				}
			}
			for _, w := range tt.warns {
				if !slices.ContainsFunc(res.Warnings, func(g Warning) bool { return strings.Contains(g.String(), w) }) {
					t.Errorf("no warning containing %q in %v", w, res.Warnings)
				}
			}
			if len(res.ENIs) != len(tt.enis) {
				t.Errorf("%d statuses for %d ENIs", len(res.ENIs), len(tt.enis))
			}

			// Pure and deterministic: the same inputs give the same result,
			// and the state comes out sorted.
			again := Desired(snap, obs, cfg)
			if !again.State.Equal(res.State) || len(again.Warnings) != len(res.Warnings) {
				t.Error("Desired is not deterministic")
			}
			sorted := res.State.clone()
			sorted.Sort()
			if !slices.Equal(sorted.Routes, res.State.Routes) || !slices.Equal(sorted.Rules, res.State.Rules) || !slices.Equal(sorted.Addrs, res.State.Addrs) {
				t.Error("Desired's state is not sorted")
			}
		})
	}
}

func TestDesiredStatus(t *testing.T) {
	snap := imds.Snapshot{PrimaryMAC: desMAC(0), ENIs: []imds.ENI{desSecondary(2), desSecondary(1), desPrimary()}}
	res := Desired(snap, Observed{Links: desLinks(0, 1)}, DefaultConfig())
	var got []string
	for _, s := range res.ENIs {
		got = append(got, s.InterfaceID+" "+string(s.State)+" "+s.Link)
	}
	want := []string{"eni-0 primary eth0", "eni-1 configured eth1", "eni-2 waiting for link "}
	if !slices.Equal(got, want) {
		t.Errorf("statuses %q, want %q", got, want)
	}
	s := res.ENIs[1]
	if !s.MultiVPC || s.Primary || s.Table != 20001 || s.Priority != 20001 || s.LinkIndex != 2 || s.Device != 1 ||
		!slices.Equal(s.Addresses, desIPs("10.1.1.10", "10.1.1.11")) {
		t.Errorf("eni-1 status %+v", s)
	}
	if p := res.ENIs[0]; !p.Primary || p.MultiVPC || p.Table != 0 || p.Priority != 0 {
		t.Errorf("primary status %+v", p)
	}
}
