package netcfg

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
)

// benchScale is the largest instance dualhomed plans for: 15 ENIs (two
// network cards), each with 50 IPv4s, 50 IPv6s and 4 IPv4 prefixes.
const (
	benchENIs     = 15
	benchIPv4s    = 50
	benchIPv6s    = 50
	benchPrefixes = 4
)

// benchWorld builds the snapshot and a steady-state Observed: every address
// on its link, the owned state equal to the desired one.
func benchWorld(tb testing.TB) (imds.Snapshot, Observed, Result) {
	snap := imds.Snapshot{PrimaryMAC: desMAC(0)}
	obs := Observed{Addrs: map[int][]netip.Prefix{}}
	for n := range benchENIs {
		e := imds.ENI{
			MAC: desMAC(n), Ready: true, InterfaceID: fmt.Sprintf("eni-%d", n),
			NetworkCard: n / 8, DeviceNumber: n % 8,
			VPCID: "vpc-b", VPCIPv4CIDRs: desPfxs("10.1.0.0/16"), VPCIPv6CIDRs: desPfxs("2600:1f18:b::/56"),
			SubnetIPv4CIDR:  netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, byte(16 * n), 0}), 20),
			SubnetIPv6CIDRs: []netip.Prefix{desPfx(fmt.Sprintf("2600:1f18:b:%x::/64", n))},
		}
		if n == 0 {
			e.VPCID, e.VPCIPv4CIDRs, e.VPCIPv6CIDRs = "vpc-a", desPfxs("10.0.0.0/16"), desPfxs("2600:1f18:a::/56")
			e.SubnetIPv4CIDR, e.SubnetIPv6CIDRs = desPfx("10.0.0.0/20"), desPfxs("2600:1f18:a:0::/64")
		}
		base := e.SubnetIPv4CIDR.Addr().As4()
		for i := range benchIPv4s {
			e.LocalIPv4s = append(e.LocalIPv4s, netip.AddrFrom4([4]byte{base[0], base[1], base[2] + 1, byte(10 + i)}))
		}
		for i := range benchIPv6s {
			e.IPv6s = append(e.IPv6s, desIP(fmt.Sprintf("%s%x", e.SubnetIPv6CIDRs[0].Addr(), 0x100+i)))
		}
		for i := range benchPrefixes {
			e.IPv4Prefixes = append(e.IPv4Prefixes, netip.PrefixFrom(netip.AddrFrom4([4]byte{base[0], base[1], base[2] + 2, byte(16 * i)}), 28))
		}
		snap.ENIs = append(snap.ENIs, e)
		obs.Links = append(obs.Links, Link{Index: n + 1, Name: fmt.Sprintf("eth%d", n), MAC: e.MAC})
	}
	// The primary's first address comes from DHCP.
	obs.Addrs[1] = []netip.Prefix{netip.PrefixFrom(snap.ENIs[0].LocalIPv4s[0], 20)}
	cold := Desired(snap, obs, DefaultConfig())
	obs.Owned = cold.State
	for _, a := range cold.State.Addrs {
		obs.Addrs[a.LinkIndex] = append(obs.Addrs[a.LinkIndex], a.Prefix)
	}
	steady := Desired(snap, obs, DefaultConfig())
	if len(steady.Warnings) != 0 || !steady.State.Equal(cold.State) {
		tb.Fatalf("the benchmark world is not steady: warnings %v", steady.Warnings)
	}
	return snap, obs, steady
}

func TestBenchWorldScale(t *testing.T) {
	_, _, res := benchWorld(t)
	st := res.State
	// 14 secondaries: 2 v4 + 2 v6 table routes each, 1 v4 + 1 v6 main route
	// (one carrier for vpc-b); 104 rules each; every address on every ENI.
	if len(st.Routes) != 14*4+2 || len(st.Rules) != 14*104 || len(st.Addrs) != benchENIs*(benchIPv4s+benchIPv6s)-1 || len(st.RPFilters) != 14 {
		t.Errorf("scale: %d routes, %d rules, %d addresses, %d rp_filters", len(st.Routes), len(st.Rules), len(st.Addrs), len(st.RPFilters))
	}
}

// BenchmarkDesired measures one steady-state reconcile's Desired at full scale.
func BenchmarkDesired(b *testing.B) {
	snap, obs, _ := benchWorld(b)
	cfg := DefaultConfig()
	b.ReportAllocs()
	for b.Loop() {
		Desired(snap, obs, cfg)
	}
}

// BenchmarkDiff measures Diff at full scale: steady (nothing to do, the
// common case), cold (everything to add) and churn (one ENI detached, one
// address moved).
func BenchmarkDiff(b *testing.B) {
	_, _, res := benchWorld(b)
	desired := res.State
	churn := desired.clone()
	churn.Rules = churn.Rules[104:]
	churn.Addrs[5].NoPrefixRoute = !churn.Addrs[5].NoPrefixRoute
	for _, bc := range []struct {
		name           string
		owned, desired State
	}{
		{"steady", desired, desired},
		{"cold", State{}, desired},
		{"churn", desired, churn},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				Diff(bc.owned, bc.desired)
			}
		})
	}
}
