package netcfg

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
)

// The largest instances have 32 network cards, and EC2 attaches each card's
// first ENI at device 0. Every card's device 0 and the highest device the
// layout allows (CardStride-1) get their own table and priority, inside
// dualhomed's bands (so Observe finds them again), and no two ENIs share one;
// every link gets its own device-number altname.
func TestDesiredEveryCard(t *testing.T) {
	cfg := DefaultConfig()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	top := cfg.CardStride - 1
	snap := imds.Snapshot{PrimaryMAC: desMAC(0), MultiCard: true, ENIs: []imds.ENI{desPrimary()}}
	obs := Observed{Links: desLinks(0), AltNames: map[string]int{}}
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
	names := map[string]bool{}
	for _, a := range res.State.AltNames {
		names[a.Name] = true
	}
	for _, want := range []string{"device-number-0", "device-number-99", "device-number-0.1", "device-number-99.1", "device-number-0.31", "device-number-99.31"} {
		if !names[want] {
			t.Errorf("no altname %s", want)
		}
	}
	if len(names) != 2*len(snap.ENIs) || len(res.State.AltNames) != len(names) {
		t.Errorf("%d altnames (%d distinct) for %d ENIs, want 2 each, all distinct", len(res.State.AltNames), len(names), len(snap.ENIs))
	}
}

// Desired's altnames: the ENI id and the device-number name on every
// managed ENI's link, the primary's included; none where another program
// holds the name (its link or altname), none for an excluded ENI; a
// not-ready ENI keeps the ones we own.
func TestDesiredAltNames(t *testing.T) {
	names := func(res Result) []string {
		var out []string
		for _, a := range res.State.AltNames {
			out = append(out, fmt.Sprintf("%s@%d", a.Name, a.LinkIndex))
		}
		return out
	}
	snap := imds.Snapshot{PrimaryMAC: desMAC(0), ENIs: []imds.ENI{desPrimary(), desSecondary(1), desSecondary(2)}}
	snap.ENIs[2].NetworkCard = 3
	base := func() Observed { return Observed{Links: desLinks(0, 1, 2), AltNames: map[string]int{}} }
	for _, tc := range []struct {
		name   string
		change func(*Observed, *imds.Snapshot, *Config)
		want   []string
		warn   string
	}{
		{"every ENI", func(*Observed, *imds.Snapshot, *Config) {},
			[]string{"device-number-0@1", "eni-0@1", "device-number-1@2", "eni-1@2", "device-number-2.3@3", "eni-2@3"}, ""},
		{"kernel without altnames", func(o *Observed, _ *imds.Snapshot, _ *Config) { o.AltNames = nil }, nil, ""},
		{"another tool named this link so", func(o *Observed, _ *imds.Snapshot, _ *Config) { o.AltNames["eni-1"] = 2 },
			[]string{"device-number-0@1", "eni-0@1", "device-number-1@2", "device-number-2.3@3", "eni-2@3"}, ""},
		{"another link holds the name", func(o *Observed, _ *imds.Snapshot, _ *Config) { o.AltNames["eni-1"] = 3 },
			[]string{"device-number-0@1", "eni-0@1", "device-number-1@2", "device-number-2.3@3", "eni-2@3"}, "altname eni-1 is taken by link #3"},
		{"a link is named so", func(o *Observed, _ *imds.Snapshot, _ *Config) { o.Links[2].Name = "device-number-1" },
			[]string{"device-number-0@1", "eni-0@1", "eni-1@2", "device-number-2.3@3", "eni-2@3"}, "altname device-number-1 is taken by link #3"},
		{"ours on another link moves", func(o *Observed, _ *imds.Snapshot, _ *Config) {
			o.AltNames["eni-1"] = 3
			o.Owned.AltNames = []AltName{{LinkIndex: 3, Name: "eni-1"}}
		}, []string{"device-number-0@1", "eni-0@1", "device-number-1@2", "eni-1@2", "device-number-2.3@3", "eni-2@3"}, ""},
		{"excluded ENI", func(_ *Observed, _ *imds.Snapshot, c *Config) {
			c.ENIs = []ENIConfig{{Match: Selector{InterfaceID: "eni-1"}, Exclude: true}}
		}, []string{"device-number-0@1", "eni-0@1", "device-number-2.3@3", "eni-2@3"}, ""},
		{"not ready keeps ours", func(o *Observed, s *imds.Snapshot, _ *Config) {
			s.ENIs[1].Ready = false
			o.AltNames["eni-1"], o.AltNames["old"] = 2, 2
			o.Owned.AltNames = []AltName{{LinkIndex: 2, Name: "eni-1"}}
		}, []string{"device-number-0@1", "eni-0@1", "eni-1@2", "device-number-2.3@3", "eni-2@3"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			obs, s, cfg := base(), snap, DefaultConfig()
			s.ENIs = slices.Clone(snap.ENIs)
			tc.change(&obs, &s, &cfg)
			res := Desired(s, obs, cfg)
			if got := names(res); !slices.Equal(got, tc.want) {
				t.Errorf("altnames %v, want %v", got, tc.want)
			}
			warned := slices.ContainsFunc(res.Warnings, func(w Warning) bool { return tc.warn != "" && strings.Contains(w.Message, tc.warn) })
			if warned != (tc.warn != "") {
				t.Errorf("warnings %v, want one containing %q", res.Warnings, tc.warn)
			}
		})
	}
}
