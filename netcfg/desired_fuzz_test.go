package netcfg

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
)

// garbageWorld builds a snapshot, observation and configuration from a seed,
// with the values IMDS and the kernel should never give but might: invalid
// and IPv4-mapped addresses, prefixes of the wrong family or with host bits,
// negative and huge numbers, duplicate and upper-case MACs, links sharing a
// MAC, nonsense configuration numbers.
func garbageWorld(seed uint64) (imds.Snapshot, Observed, Config) {
	rng := rand.New(rand.NewPCG(seed, 0x67617262))
	pick := func(n int) int { return rng.IntN(n) }
	addr := func() netip.Addr {
		switch pick(7) {
		case 0:
			return netip.Addr{}
		case 1:
			return netip.AddrFrom16(netip.AddrFrom4([4]byte{10, byte(pick(3)), byte(pick(3)), byte(pick(256))}).As16())
		case 2:
			return netip.MustParseAddr(fmt.Sprintf("2600::%x", pick(8)))
		case 3:
			return netip.IPv4Unspecified()
		default:
			return netip.AddrFrom4([4]byte{10, byte(pick(3)), byte(pick(3)), byte(pick(256))})
		}
	}
	prefix := func() netip.Prefix {
		a := addr()
		if !a.IsValid() {
			return netip.Prefix{}
		}
		return netip.PrefixFrom(a, pick(a.BitLen()+1))
	}
	some := func(f func() netip.Prefix) []netip.Prefix {
		var out []netip.Prefix
		for range pick(4) {
			out = append(out, f())
		}
		return out
	}
	macs := []string{desMAC(0), desMAC(1), desMAC(2), "0A:00:00:00:00:03", "", desMAC(4)}
	snap := imds.Snapshot{PrimaryMAC: macs[pick(2)]}
	for range pick(7) {
		e := imds.ENI{
			MAC: macs[pick(len(macs))], Ready: pick(4) > 0,
			DeviceNumber: pick(5) - 1, NetworkCard: pick(3) - 1 + pick(2)*pick(200),
			InterfaceID: []string{"", "eni-1", "eni-2"}[pick(3)], VPCID: []string{"", "vpc-a", "vpc-b", "vpc-c"}[pick(4)],
			SubnetIPv4CIDR: prefix(), SubnetIPv6CIDRs: some(prefix),
			VPCIPv4CIDRs: some(prefix), VPCIPv6CIDRs: some(prefix),
			IPv4Prefixes: some(prefix), IPv6Prefixes: some(prefix),
		}
		for range pick(5) {
			e.LocalIPv4s = append(e.LocalIPv4s, addr())
		}
		for range pick(3) {
			e.IPv6s = append(e.IPv6s, addr())
		}
		snap.ENIs = append(snap.ENIs, e)
	}
	obs := Observed{Addrs: map[int][]netip.Prefix{}}
	for i := range pick(6) {
		obs.Links = append(obs.Links, Link{Index: 1 + pick(5), Name: []string{"", "eth0", "eth1", fmt.Sprintf("x%d", i)}[pick(4)], MAC: macs[pick(len(macs))]})
		obs.Addrs[1+pick(5)] = some(prefix)
	}
	// The owned state comes from the kernel: valid, unmapped, masked values.
	kernelPrefix := func() netip.Prefix {
		for {
			if p := prefix(); p.IsValid() {
				if p = cleanPrefix(p, p.Addr().Unmap().Is4()); p.IsValid() {
					return p
				}
			}
		}
	}
	for range pick(4) {
		obs.Owned.Routes = append(obs.Owned.Routes, Route{Table: 20000 + pick(3), Dst: kernelPrefix(), LinkIndex: 1 + pick(5)})
		obs.Owned.Rules = append(obs.Owned.Rules, Rule{Priority: 20000 + pick(3), Src: kernelPrefix(), Table: 20000 + pick(3)})
		obs.Owned.Addrs = append(obs.Owned.Addrs, Addr{LinkIndex: 1 + pick(5), Prefix: kernelPrefix()})
	}
	cfg := DefaultConfig()
	switch pick(6) {
	case 0:
		cfg.CardStride = pick(3) - 1
	case 1:
		cfg.TableBase = pick(300) - 10
	case 2:
		cfg.PriorityBase = 32760
	case 3:
		cfg.RPFilter = "bogus"
	case 4:
		cfg.PrimaryTable = true
		cfg.ENIs = []ENIConfig{{Match: Selector{}, Routes: []ConfigPrefix{{Prefix: prefix()}, {Prefix: prefix()}}, VPCRoutes: "bogus"}}
	}
	return snap, obs, cfg
}

// checkGarbage runs Desired on one garbage world and checks that the result
// is usable: sorted, one object per identity, and Diff converges.
func checkGarbage(t *testing.T, seed uint64) {
	snap, obs, cfg := garbageWorld(seed)
	res := Desired(snap, obs, cfg)
	for range 3 { // pure: map iteration order must not leak into the result
		if again := Desired(snap, obs, cfg); !reflect.DeepEqual(again, res) {
			t.Fatalf("seed %d: Desired is not deterministic:\n%+v\n%+v", seed, res, again)
		}
	}
	st := res.State
	sorted := st.clone()
	sorted.Sort()
	if !slices.Equal(sorted.Routes, st.Routes) || !slices.Equal(sorted.Rules, st.Rules) || !slices.Equal(sorted.Addrs, st.Addrs) {
		t.Fatalf("seed %d: state not sorted", seed)
	}
	routeKeys, addrKeys := map[RouteKey]bool{}, map[AddrKey]bool{}
	for _, r := range st.Routes {
		if routeKeys[r.Key()] || !r.Dst.IsValid() || r.Dst != r.Dst.Masked() {
			t.Fatalf("seed %d: bad or duplicate route %v", seed, r)
		}
		routeKeys[r.Key()] = true
	}
	for _, a := range st.Addrs {
		if addrKeys[a.Key()] || !a.Prefix.IsValid() || a.Prefix.Addr().Is4In6() {
			t.Fatalf("seed %d: bad or duplicate address %v", seed, a)
		}
		addrKeys[a.Key()] = true
	}
	if len(res.ENIs) != len(snap.ENIs) {
		t.Fatalf("seed %d: %d statuses for %d ENIs", seed, len(res.ENIs), len(snap.ENIs))
	}
	for _, owned := range []State{{}, obs.Owned} {
		p := Diff(owned, st)
		checkPlan(t, owned, st, p)
		if got := applyToState(owned, p); !got.Equal(st) {
			t.Fatalf("seed %d: plan does not converge:\n%s", seed, p)
		}
	}
	if p := Diff(st, st); !p.Empty() {
		t.Fatalf("seed %d: Diff of a state with itself:\n%s", seed, p)
	}
}

func TestDesiredGarbage(t *testing.T) {
	for seed := range uint64(2000) {
		checkGarbage(t, seed)
	}
}

// FuzzDesired explores more seeds: go test -fuzz FuzzDesired ./netcfg/
func FuzzDesired(f *testing.F) {
	f.Add(uint64(0))
	f.Add(uint64(42))
	f.Fuzz(func(t *testing.T, seed uint64) { checkGarbage(t, seed) })
}
