package netcfg

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
)

// The largest instances have 32 network cards, and EC2 attaches each card's
// first ENI at device 0. Every card's device 0 and the highest device the
// layout allows (CardStride-1) get their own table and priority, inside
// dualhomed's bands (so Observe finds them again), and no two ENIs share one.
func TestDesiredEveryCard(t *testing.T) {
	cfg := DefaultConfig()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	top := cfg.CardStride - 1
	snap := imds.Snapshot{PrimaryMAC: desMAC(0), MultiCard: true, ENIs: []imds.ENI{desPrimary()}}
	obs := Observed{Links: desLinks(0)}
	for card := range MaxNetworkCards {
		for _, dev := range []int{0, top} {
			if card == 0 && dev == 0 {
				continue // the primary
			}
			n := len(snap.ENIs)
			e := desSecondary(n)
			e.MAC = fmt.Sprintf("0a:00:00:00:%02x:%02x", n/256, n%256)
			e.NetworkCard, e.DeviceNumber, e.VPCID = card, dev, fmt.Sprintf("vpc-%d", n)
			e.SubnetIPv4CIDR = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(n), 0, 0}), 24)
			e.VPCIPv4CIDRs = []netip.Prefix{netip.PrefixFrom(e.SubnetIPv4CIDR.Addr(), 16)}
			e.LocalIPv4s = []netip.Addr{netip.AddrFrom4([4]byte{10, byte(n), 0, 10})}
			snap.ENIs = append(snap.ENIs, e)
			obs.Links = append(obs.Links, Link{Index: n + 1, Name: fmt.Sprintf("eth%d", n), MAC: e.MAC})
		}
	}
	res := Desired(snap, obs, cfg)
	if len(res.Warnings) != 0 {
		t.Errorf("warnings: %v", res.Warnings)
	}
	tables := map[int]string{}
	for _, s := range res.ENIs {
		if s.Primary {
			continue
		}
		want := cfg.TableBase + cfg.CardStride*s.Card + s.Device
		if s.State != ENIConfigured || s.Table != want || s.Priority != cfg.PriorityBase+cfg.CardStride*s.Card+s.Device {
			t.Errorf("card %d device %d: %s, table %d priority %d; want configured, table and priority %d", s.Card, s.Device, s.State, s.Table, s.Priority, want)
		}
		if other, dup := tables[s.Table]; dup {
			t.Errorf("table %d given to %s and %s", s.Table, other, s.MAC)
		}
		tables[s.Table] = s.MAC
	}
	if len(tables) != 2*MaxNetworkCards-1 {
		t.Errorf("%d tables for %d secondary ENIs", len(tables), 2*MaxNetworkCards-1)
	}
	for _, r := range res.State.Rules {
		if _, ok := tables[r.Table]; !ok || !cfg.inPriorityBand(r.Priority) || r.Priority > maxPriority {
			t.Errorf("rule %v: outside the priority band or pointing at no ENI's table", r)
		}
	}
	for _, r := range res.State.Routes {
		if r.Table != MainTable && !cfg.inTableBand(r.Table) {
			t.Errorf("route %v: outside the table band", r)
		}
	}
}
