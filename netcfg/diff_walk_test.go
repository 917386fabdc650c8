package netcfg

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
)

// The random walk drives Desired and Diff through many reproducible
// sequences of IMDS snapshots, link changes, foreign addresses and
// configuration changes. A perfect kernel (applyToState) executes each plan;
// after every transition the owned state must equal the desired state, a
// second round must plan nothing, and every plan must keep its invariants.

const (
	walkSequences = 150
	walkSteps     = 30
	walkENIs      = 6 // ENI 0 is the primary
)

// walkVPCs are the VPCs an ENI can be in; some overlap on purpose.
var walkVPCs = []struct {
	id     string
	v4, v6 []netip.Prefix
}{
	{"vpc-a", desPfxs("10.0.0.0/16"), desPfxs("2600:1f18:a::/56")},
	{"vpc-b", desPfxs("10.1.0.0/16"), desPfxs("2600:1f18:b::/56")},
	{"vpc-c", desPfxs("10.2.0.0/16", "100.64.0.0/16"), nil},
	{"vpc-d", desPfxs("10.1.128.0/17"), desPfxs("2600:1f18:d::/56")}, // overlaps vpc-b
	{"vpc-e", desPfxs("10.0.0.0/16"), nil},                           // overlaps vpc-a
}

// walkENI is one ENI of the simulated instance.
type walkENI struct {
	attached, ready, link bool
	linkIndex             int
	card, device          int
	vpc                   int
	subnet                int // third octet of the /24, -1 for IPv6-only
	v4, v6, v4pfx, v6pfx  int // how many addresses and prefixes
}

type walkWorld struct {
	rng       *rand.Rand
	enis      [walkENIs]walkENI
	nextIndex int
	// foreign are the addresses somebody else put on each link.
	foreign map[int][]netip.Prefix
	cfg     Config
	owned   State
	log     []string
}

func newWalkWorld(seed uint64) *walkWorld {
	w := &walkWorld{rng: rand.New(rand.NewPCG(seed, 0x6475616c)), nextIndex: 2, foreign: map[int][]netip.Prefix{}, cfg: DefaultConfig()}
	for n := range w.enis {
		// Most ENIs start attached, ready and linked, as on a running instance.
		up := w.rng.IntN(10) < 7
		w.enis[n] = walkENI{attached: up, ready: up, link: up, device: n, subnet: n, v4: 1 + w.rng.IntN(3), v6: w.rng.IntN(2)}
		w.enis[n].vpc = w.rng.IntN(len(walkVPCs))
		if up {
			w.enis[n].linkIndex = w.nextIndex
			w.nextIndex++
		}
	}
	w.enis[0] = walkENI{attached: true, ready: true, link: true, linkIndex: 1, v4: 2, v6: 1}
	w.foreign[1] = desPfxs("10.0.0.10/24")
	return w
}

func (w *walkWorld) mac(n int) string { return desMAC(n) }

// v4Addr is ENI n's i-th IPv4: hosts differ between ENIs so that two ENIs
// sharing a subnet (overlap) still have distinct addresses.
func (e walkENI) v4Addr(n, i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, walkVPCs[e.vpc].v4[0].Addr().As4()[1], byte(max(e.subnet, 0)), byte(10 + 10*n + i)})
}

func (e walkENI) v6Addr(n, i int) netip.Addr {
	return netip.MustParseAddr(fmt.Sprintf("2600:1f18:%x:%x::%x", e.vpc, n, 0x10+i))
}

// snapshot renders the world as IMDS would describe it.
func (w *walkWorld) snapshot() imds.Snapshot {
	snap := imds.Snapshot{PrimaryMAC: w.mac(0)}
	for n, e := range w.enis {
		if !e.attached {
			continue
		}
		vpc := walkVPCs[e.vpc]
		ie := imds.ENI{
			MAC: w.mac(n), Ready: e.ready, NetworkCard: e.card, DeviceNumber: e.device,
			InterfaceID: fmt.Sprintf("eni-%d", n), VPCID: vpc.id,
			VPCIPv4CIDRs: vpc.v4, VPCIPv6CIDRs: vpc.v6,
		}
		if !e.ready {
			ie.NotReadyReason = "device-number missing"
		}
		if e.subnet >= 0 {
			ie.SubnetIPv4CIDR = netip.PrefixFrom(e.v4Addr(n, 0), 24).Masked()
			for i := range e.v4 {
				ie.LocalIPv4s = append(ie.LocalIPv4s, e.v4Addr(n, i))
			}
			for i := range e.v4pfx {
				ie.IPv4Prefixes = append(ie.IPv4Prefixes, netip.PrefixFrom(e.v4Addr(n, 100+16*i), 28).Masked())
			}
		}
		if e.v6 > 0 || e.v6pfx > 0 {
			ie.SubnetIPv6CIDRs = []netip.Prefix{netip.PrefixFrom(e.v6Addr(n, 0), 64).Masked()}
			for i := range e.v6 {
				ie.IPv6s = append(ie.IPv6s, e.v6Addr(n, i))
			}
			for i := range e.v6pfx {
				ie.IPv6Prefixes = append(ie.IPv6Prefixes, netip.PrefixFrom(e.v6Addr(n, 0x1000*(i+1)), 80).Masked())
			}
		}
		snap.ENIs = append(snap.ENIs, ie)
	}
	slices.SortFunc(snap.ENIs, func(a, b imds.ENI) int { return strings.Compare(a.MAC, b.MAC) })
	return snap
}

// observed is what Kernel.Observe would return: every address on the links,
// ours included, and the owned state.
func (w *walkWorld) observed() Observed {
	obs := Observed{Addrs: map[int][]netip.Prefix{}, Owned: w.owned}
	for n, e := range w.enis {
		if e.link {
			obs.Links = append(obs.Links, Link{Index: e.linkIndex, Name: fmt.Sprintf("eth%d", n), MAC: w.mac(n)})
		}
	}
	for idx, ps := range w.foreign {
		obs.Addrs[idx] = append(obs.Addrs[idx], ps...)
	}
	for _, a := range w.owned.Addrs {
		obs.Addrs[a.LinkIndex] = append(obs.Addrs[a.LinkIndex], a.Prefix)
	}
	return obs
}

// mutate applies one random change to the world, as the kernel, IMDS, other
// managers or the operator would.
func (w *walkWorld) mutate() {
	n := 1 + w.rng.IntN(walkENIs-1)
	e := &w.enis[n]
	switch w.rng.IntN(18) {
	case 0, 14: // hot attach or detach
		e.attached = !e.attached
		e.ready = e.attached && w.rng.IntN(3) > 0
		w.logf("eni %d attached=%v ready=%v", n, e.attached, e.ready)
	case 1, 15: // IMDS catches up or glitches
		e.ready = !e.ready
		w.logf("eni %d ready=%v", n, e.ready)
	case 2, 3: // the link comes or goes; the kernel drops its routes and addresses
		if e.link {
			idx := e.linkIndex
			e.link = false
			w.owned.Routes = slices.DeleteFunc(w.owned.Routes, func(r Route) bool { return r.LinkIndex == idx })
			w.owned.Addrs = slices.DeleteFunc(w.owned.Addrs, func(a Addr) bool { return a.LinkIndex == idx })
			delete(w.foreign, idx)
		} else {
			e.link, e.linkIndex = true, w.nextIndex
			w.nextIndex++
		}
		w.logf("eni %d link=%v index %d", n, e.link, e.linkIndex)
	case 4:
		e.v4 = w.rng.IntN(5)
		e.v6 = w.rng.IntN(3)
		w.logf("eni %d v4=%d v6=%d", n, e.v4, e.v6)
	case 5:
		e.v4pfx, e.v6pfx = w.rng.IntN(3), w.rng.IntN(2)
		w.logf("eni %d prefixes v4=%d v6=%d", n, e.v4pfx, e.v6pfx)
	case 6: // another VPC, or an IPv6-only subnet
		e.vpc = w.rng.IntN(len(walkVPCs))
		// 0 is the primary's subnet in vpc-a/vpc-e, 1 another ENI's: overlaps.
		e.subnet = []int{n, n, -1, 0, 1}[w.rng.IntN(5)]
		w.logf("eni %d vpc=%s subnet=%d", n, walkVPCs[e.vpc].id, e.subnet)
	case 7: // device numbers: a clash, card 1, or back to normal
		switch w.rng.IntN(3) {
		case 0:
			e.card, e.device = 0, 1+w.rng.IntN(walkENIs-1)
		case 1:
			e.card, e.device = 1, n
		default:
			e.card, e.device = 0, n
		}
		w.logf("eni %d card=%d device=%d", n, e.card, e.device)
	case 8, 9: // another manager adds an address (maybe one of IMDS's) or removes one
		if !e.link {
			return
		}
		idx := e.linkIndex
		if len(w.foreign[idx]) > 0 && w.rng.IntN(2) == 0 {
			w.foreign[idx] = w.foreign[idx][1:]
			w.logf("eni %d foreign address removed", n)
			return
		}
		p := netip.PrefixFrom(e.v4Addr(n, w.rng.IntN(4)), []int{24, 32}[w.rng.IntN(2)])
		if e.subnet < 0 || w.rng.IntN(3) == 0 {
			p = netip.PrefixFrom(e.v6Addr(n, w.rng.IntN(3)), []int{64, 128}[w.rng.IntN(2)])
		}
		// The kernel refuses a second identical address: only a different
		// length (IPv4) can coexist with ours.
		if slices.ContainsFunc(w.owned.Addrs, func(a Addr) bool {
			return a.LinkIndex == idx && a.Prefix.Addr() == p.Addr() && (a.Prefix.Bits() == p.Bits() || p.Addr().Is6())
		}) || slices.Contains(w.foreign[idx], p) {
			return
		}
		w.foreign[idx] = append(w.foreign[idx], p)
		w.logf("eni %d foreign address %v", n, p)
	case 10:
		w.cfg.PrimaryTable = !w.cfg.PrimaryTable
		w.logf("primary table %v", w.cfg.PrimaryTable)
	case 11:
		w.cfg.RPFilter = []RPFilterMode{RPFilterLoose, RPFilterStrict, RPFilterKeep}[w.rng.IntN(3)]
		w.logf("rp_filter %s", w.cfg.RPFilter)
	case 12:
		w.cfg.ManageAddresses = w.rng.IntN(4) > 0
		w.logf("manage addresses %v", w.cfg.ManageAddresses)
	case 13: // per-ENI configuration
		w.cfg.ENIs = nil
		for range w.rng.IntN(3) {
			m := 1 + w.rng.IntN(walkENIs-1)
			ec := ENIConfig{Match: Selector{InterfaceID: fmt.Sprintf("eni-%d", m)}}
			switch w.rng.IntN(3) {
			case 0:
				ec.Exclude = true
			case 1:
				ec.VPCRoutes = VPCRoutesOff
			default:
				ec.Routes = cfgPfxs("192.168.0.0/16", "fd00:1::/48")
			}
			w.cfg.ENIs = append(w.cfg.ENIs, ec)
		}
		w.logf("eni config %+v", w.cfg.ENIs)
	default: // quiet period: nothing changes
	}
}

func (w *walkWorld) logf(format string, args ...any) {
	w.log = append(w.log, fmt.Sprintf(format, args...))
}

func TestDesiredDiffRandomWalk(t *testing.T) {
	for seq := range walkSequences {
		w := newWalkWorld(uint64(seq))
		for step := range walkSteps {
			for range 1 + w.rng.IntN(3) {
				w.mutate()
			}
			fail := func(format string, args ...any) {
				t.Helper()
				t.Fatalf("sequence %d step %d: %s\nhistory:\n  %s", seq, step, fmt.Sprintf(format, args...), strings.Join(w.log, "\n  "))
			}
			snap, obs := w.snapshot(), w.observed()
			res := Desired(snap, obs, w.cfg)
			plan := Diff(w.owned, res.State)
			checkPlan(t, w.owned, res.State, plan)
			w.checkDesired(res, fail)
			w.checkNotReadyKept(res, plan, fail)

			w.owned = applyToState(w.owned, plan)
			if !w.owned.Equal(res.State) {
				fail("after the plan, owned differs from desired:\nplan:\n%s", plan)
			}
			res2 := Desired(snap, w.observed(), w.cfg)
			if again := Diff(w.owned, res2.State); !again.Empty() {
				fail("second round is not empty:\n%s\nfirst plan:\n%s", again, plan)
			}
		}
	}
}

// checkDesired asserts properties of every desired state.
func (w *walkWorld) checkDesired(res Result, fail func(string, ...any)) {
	primaryLink := w.enis[0].linkIndex
	tables := map[int]bool{}
	for _, r := range res.State.Routes {
		tables[r.Table] = true
		if r.Table != MainTable && (r.Table < w.cfg.TableBase || r.Table >= w.cfg.TableBase+2*w.cfg.CardStride) {
			fail("route %v in a table outside our band", r)
		}
		if r.Table == MainTable && r.LinkIndex == primaryLink {
			fail("main-table route %v through the primary ENI", r)
		}
		if r.Dst.Bits() == 0 && r.Table == MainTable {
			fail("a main-table default route %v", r)
		}
	}
	// The kernel refuses a route via an IPv4 gateway it cannot reach on-link
	// (ENETUNREACH): in our tables through our subnet route, in main through
	// our subnet route or an address's prefix route.
	for _, r := range res.State.Routes {
		if !r.Gateway.Is4() {
			continue
		}
		onLink := slices.ContainsFunc(res.State.Routes, func(o Route) bool {
			return o.Table == r.Table && o.LinkIndex == r.LinkIndex && !o.Gateway.IsValid() && o.Dst.Contains(r.Gateway)
		})
		if r.Table == MainTable {
			onLink = onLink || slices.ContainsFunc(res.State.Addrs, func(a Addr) bool {
				return a.LinkIndex == r.LinkIndex && !a.NoPrefixRoute && a.Prefix.Contains(r.Gateway)
			}) || slices.ContainsFunc(w.foreign[r.LinkIndex], func(p netip.Prefix) bool {
				return p.Contains(r.Gateway) // foreign addresses come with their prefix route
			})
		}
		if !onLink {
			fail("route %v: gateway not reachable on-link in table %d", r, r.Table)
		}
	}
	for _, r := range res.State.Rules {
		if !tables[r.Table] {
			fail("rule %v points at a table without routes", r)
		}
		if r.Priority < w.cfg.PriorityBase || r.Priority >= w.cfg.PriorityBase+2*w.cfg.CardStride {
			fail("rule %v outside our priority band", r)
		}
		if !w.cfg.PrimaryTable && r.Table == w.cfg.TableBase {
			fail("rule %v for the primary without PrimaryTable", r)
		}
	}
	for _, a := range res.State.Addrs {
		if slices.ContainsFunc(w.foreign[a.LinkIndex], func(p netip.Prefix) bool { return p.Addr() == a.Prefix.Addr() }) &&
			!slices.Contains(w.owned.Addrs, a) {
			fail("address %v is already on the link (foreign) but desired", a)
		}
	}
	excluded := map[string]bool{}
	for _, s := range res.ENIs {
		if s.State == ENIExcluded && s.LinkIndex != 0 {
			excluded[s.Link] = true
			for _, r := range res.State.Routes {
				if r.LinkIndex == s.LinkIndex {
					fail("route %v on excluded %s", r, s.Link)
				}
			}
			for _, a := range res.State.Addrs {
				if a.LinkIndex == s.LinkIndex {
					fail("address %v on excluded %s", a, s.Link)
				}
			}
		}
	}
	for _, f := range res.State.RPFilters {
		if excluded[f.LinkName] || f.LinkName == "eth0" {
			fail("rp_filter on %s", f.LinkName)
		}
	}
}

// checkNotReadyKept asserts that an ENI IMDS reports not ready loses nothing:
// an IMDS glitch is never an answer.
func (w *walkWorld) checkNotReadyKept(res Result, plan Plan, fail func(string, ...any)) {
	for _, s := range res.ENIs {
		if s.State != ENIWaitingIMDS || s.LinkIndex == 0 {
			continue
		}
		tables := map[int]bool{}
		for _, r := range w.owned.Routes {
			if r.LinkIndex == s.LinkIndex && r.Table != MainTable {
				tables[r.Table] = true
			}
		}
		for _, op := range plan.Ops {
			if !op.Delete {
				continue
			}
			if (op.Route != nil && op.Route.LinkIndex == s.LinkIndex) || (op.Addr != nil && op.Addr.LinkIndex == s.LinkIndex) ||
				(op.Rule != nil && tables[op.Rule.Table]) || (op.RPFilter != nil && op.RPFilter.LinkName == s.Link) {
				fail("%s is not ready but the plan has %s", s.Link, op)
			}
		}
	}
}
