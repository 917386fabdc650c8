package netcfg

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/imds"
)

// natSnap is a host as the NAT tests build it: eni-0 primary on eth0 in
// vpc-a, eni-1 on eth1 in vpc-b, eni-2 on eth2 in vpc-c (overlapping vpc-b,
// plus a second CIDR), eni-3 on card 1 in vpc-d; cfg makes eni-1 and eni-2
// NAT sources.
func natSnap() (imds.Snapshot, Observed, Config) {
	eni := func(n, card, dev int, vpc, subnet, addr string, cidrs ...string) imds.ENI {
		return imds.ENI{MAC: desMAC(n), Ready: true, NetworkCard: card, DeviceNumber: dev, InterfaceID: fmt.Sprintf("eni-%d", n),
			VPCID: vpc, SubnetIPv4CIDR: desPfx(subnet), VPCIPv4CIDRs: desPfxs(cidrs...), LocalIPv4s: desIPs(addr)}
	}
	snap := imds.Snapshot{PrimaryMAC: desMAC(0), ENIs: []imds.ENI{
		eni(0, 0, 0, "vpc-a", "10.0.0.0/24", "10.0.0.10", "10.0.0.0/16"),
		eni(1, 0, 1, "vpc-b", "10.1.0.0/24", "10.1.0.11", "10.1.0.0/16"),
		eni(2, 0, 2, "vpc-c", "10.1.0.0/24", "10.1.0.12", "10.1.0.0/16", "100.64.0.0/16"),
		eni(3, 1, 1, "vpc-d", "172.31.5.0/24", "172.31.5.30", "172.31.0.0/16"),
	}}
	obs := Observed{Links: desLinks(0, 1, 2, 3), Addrs: map[int][]netip.Prefix{1: desPfxs("10.0.0.10/24")}}
	cfg := DefaultConfig()
	cfg.ENIs = []ENIConfig{{Match: Selector{InterfaceID: "eni-1"}, NAT: true}, {Match: Selector{InterfaceID: "eni-2"}, NAT: true}}
	return snap, obs, cfg
}

// desiredNAT runs Desired and returns the NAT it computed.
func desiredNAT(snap imds.Snapshot, obs Observed, cfg Config) (NAT, Result, error) {
	d := newDesirer(snap, obs, cfg)
	d.run()
	n, err := d.nat()
	return n, d.result(), err
}

func TestDesiredNAT(t *testing.T) {
	snap, obs, cfg := natSnap()
	n, res, err := desiredNAT(snap, obs, cfg)
	if err != nil {
		t.Fatal(err)
	}
	links := desLinks(0, 1, 2, 3)
	want := NAT{
		Egress: links[0], EgressAddr: desIP("10.0.0.10"),
		Sources: []NATSource{
			{Link: links[1], Mark: 0x00100000, Zone: 1, Allowed: desPfxs("10.1.0.0/16")},
			{Link: links[2], Mark: 0x00200000, Zone: 2, Allowed: desPfxs("10.1.0.0/16", "100.64.0.0/16")},
		},
		ENIs:      links,
		Forbidden: desPfxs("10.0.0.0/16", "10.1.0.0/16", "100.64.0.0/16", "169.254.0.0/16", "172.31.0.0/16"),
	}
	if !reflect.DeepEqual(n, want) {
		t.Fatalf("NAT:\n got %+v\nwant %+v", n, want)
	}
	if !res.State.NAT.Equal(want.table()) || !res.State.NAT.Forwarding {
		t.Errorf("desired table is not the NAT's")
	}
	var marks []string
	for _, r := range res.State.Rules {
		if r.Mark != 0 {
			marks = append(marks, r.String())
		}
	}
	if w := []string{"from 0.0.0.0/0 fwmark 0x100000/0xfff00000 lookup 20001 priority 20001",
		"from 0.0.0.0/0 fwmark 0x200000/0xfff00000 lookup 20002 priority 20002"}; !slices.Equal(marks, w) {
		t.Errorf("mark rules %q, want %q", marks, w)
	}
	var roles []string
	for _, e := range res.ENIs {
		roles = append(roles, e.Link+":"+e.NAT)
	}
	if w := []string{"eth0:egress", "eth1:source", "eth2:source", "eth3:"}; !slices.Equal(roles, w) {
		t.Errorf("NAT roles %q, want %q", roles, w)
	}

	// Card 1 device 1 is number 101: table 20101, mark 101<<20, zone 101;
	// nat_sources narrow the VPC's CIDRs.
	cfg.ENIs = append(cfg.ENIs, ENIConfig{Match: Selector{InterfaceID: "eni-3"}, NAT: true,
		NATSources: cfgPfxs("172.31.5.0/24", "172.31.5.128/25", "172.31.7.0/24")})
	if n, _, err = desiredNAT(snap, obs, cfg); err != nil {
		t.Fatal(err)
	}
	if got, want := n.Sources[2], (NATSource{Link: links[3], Mark: 101 << 20, Zone: 101,
		Allowed: desPfxs("172.31.5.0/24", "172.31.7.0/24")}); !reflect.DeepEqual(got, want) {
		t.Fatalf("card 1 source:\n got %+v\nwant %+v", got, want)
	}
}

// Without nat: true nothing changes: no table, no mark rule, not even one
// the kernel holds (a NAT configured before is removed).
func TestDesiredWithoutNAT(t *testing.T) {
	snap, obs, cfg := natSnap()
	cfg.ENIs = nil
	obs.Owned.NAT = &NFTable{canon: "left from an earlier configuration"}
	obs.Owned.Rules = []Rule{{Priority: 20001, Src: anyPrefix(unix.AF_INET), Table: 20001, Mark: 1 << 20, Mask: NATMarkMask}}
	res := Desired(snap, obs, cfg)
	if res.State.NAT != nil || slices.ContainsFunc(res.State.Rules, func(r Rule) bool { return r.Mark != 0 }) {
		t.Fatalf("NAT wanted without nat: true: %v, rules %v", res.State.NAT, res.State.Rules)
	}
	for _, e := range res.ENIs {
		if e.NAT != "" {
			t.Errorf("%s has NAT role %q", e.Name(), e.NAT)
		}
	}
}

// A NAT that cannot be computed leaves the table and the mark rules the
// kernel holds, and says why.
func TestDesiredNATKeepsTheKernelsOnError(t *testing.T) {
	for _, c := range []struct {
		name   string
		change func(snap *imds.Snapshot, cfg *Config)
		want   string
	}{
		{"NAT on the primary", func(_ *imds.Snapshot, c *Config) {
			c.ENIs = append(c.ENIs, ENIConfig{Match: Selector{InterfaceID: "eni-0"}, NAT: true})
		}, "eni-0 is the primary ENI, the NAT's egress"},
		{"primary without IPv4", func(s *imds.Snapshot, _ *Config) { s.ENIs[0].LocalIPv4s = nil }, "has no IPv4 address on eth0"},
		{"no primary", func(s *imds.Snapshot, _ *Config) { s.PrimaryMAC = desMAC(9) }, "no primary ENI with a link"},
		{"nat_sources outside the VPC", func(_ *imds.Snapshot, c *Config) { c.ENIs[0].NATSources = cfgPfxs("10.2.0.0/24") },
			"test.yaml:1: 10.2.0.0/24 is outside the VPC CIDRs [10.1.0.0/16] of eni-1"},
		{"nat_sources wider than the VPC", func(_ *imds.Snapshot, c *Config) { c.ENIs[0].NATSources = cfgPfxs("10.0.0.0/8") }, "outside the VPC CIDRs"},
		{"no VPC CIDR", func(s *imds.Snapshot, _ *Config) { s.ENIs[1].VPCIPv4CIDRs = nil }, "no IPv4 VPC CIDR of the NAT source eni-1"},
		{"an ENI not ready", func(s *imds.Snapshot, _ *Config) { s.ENIs[3].Ready = false }, "eni-3 is not ready in IMDS"},
		{"number beyond the mark", func(s *imds.Snapshot, c *Config) {
			s.ENIs[3].NetworkCard = 41
			c.ENIs = append(c.ENIs, ENIConfig{Match: Selector{InterfaceID: "eni-3"}, NAT: true})
		}, "beyond the 12-bit mark field"},
		{"source without a table", func(s *imds.Snapshot, _ *Config) { s.ENIs[1].DeviceNumber = 100 }, "eni-1 has no IPv4 routing table"},
	} {
		t.Run(c.name, func(t *testing.T) {
			snap, obs, cfg := natSnap()
			kept := &NFTable{canon: "what the kernel holds", Forwarding: true}
			mark := Rule{Priority: 20001, Src: anyPrefix(unix.AF_INET), Table: 20001, Mark: 1 << 20, Mask: NATMarkMask}
			obs.Owned.NAT, obs.Owned.Rules = kept, []Rule{mark}
			c.change(&snap, &cfg)
			res := Desired(snap, obs, cfg)
			if res.State.NAT != kept || !slices.Contains(res.State.Rules, mark) {
				t.Errorf("the kernel's NAT is not kept: %v, rules %v", res.State.NAT, res.State.Rules)
			}
			var warns []string
			for _, w := range res.Warnings {
				warns = append(warns, w.String())
			}
			if !slices.ContainsFunc(warns, func(w string) bool { return strings.Contains(w, c.want) }) {
				t.Errorf("warnings %q, want one containing %q", warns, c.want)
			}
		})
	}
}

func TestOutermostPrefixes(t *testing.T) {
	got := outermostPrefixes(desPfxs("10.1.2.0/24", "10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "10.0.0.0/8", "192.168.1.0/24", "172.16.0.0/12"))
	if want := desPfxs("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// NATs that differ in any one value give tables that differ, and equal NATs
// equal ones.
func TestNATTableSeesEveryDifference(t *testing.T) {
	base := func() NAT {
		n, _, err := desiredNAT(natSnap())
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if !base().table().Equal(base().table()) {
		t.Fatal("a NAT's table differs from itself")
	}
	for name, change := range map[string]func(n *NAT){
		"egress address":   func(n *NAT) { n.EgressAddr = desIP("10.0.0.11") },
		"egress link":      func(n *NAT) { n.Egress.Index++ },
		"mark":             func(n *NAT) { n.Sources[0].Mark = 0x00300000 },
		"zone":             func(n *NAT) { n.Sources[1].Zone = 7 },
		"source link":      func(n *NAT) { n.Sources[0].Link.Index = 99 },
		"source name":      func(n *NAT) { n.Sources[0].Link.Name = "eth9" },
		"allowed prefix":   func(n *NAT) { n.Sources[0].Allowed = desPfxs("10.1.0.0/17") },
		"allowed address":  func(n *NAT) { n.Sources[0].Allowed = desPfxs("10.1.128.0/17") },
		"forbidden prefix": func(n *NAT) { n.Forbidden[0] = desPfx("10.0.0.0/15") },
		"an ENI":           func(n *NAT) { n.ENIs[3].Index = 77 },
	} {
		n := base()
		change(&n)
		if base().table().Equal(n.table()) {
			t.Errorf("changing the %s left the table equal", name)
		}
	}
}

// Diff writes the table after the mark rules that route its replies, and
// removes it (forwarding restored first) before them.
func TestDiffOrdersTheNAT(t *testing.T) {
	snap, obs, cfg := natSnap()
	on := Desired(snap, obs, cfg).State
	var kinds []string
	for _, op := range Diff(State{}, on).Ops {
		kinds = append(kinds, op.Object())
	}
	if i, j := slices.Index(kinds, "nat"), slices.Index(kinds, "rule"); i < 0 || j < 0 || i < j || slices.Index(kinds[i:], "rule") >= 0 {
		t.Errorf("adding: %q, want the table after every rule", kinds)
	}
	kinds = nil
	for _, op := range Diff(on, State{}).Ops {
		kinds = append(kinds, op.Object())
	}
	if i := slices.Index(kinds, "nat"); i < 0 || slices.Contains(kinds[:i], "rule") {
		t.Errorf("removing: %q, want the table before every rule", kinds)
	}
	if p := Diff(on, on); !p.Empty() {
		t.Errorf("Diff of a NAT with itself: %v", p)
	}
	forwardingOff := *on.NAT
	forwardingOff.Forwarding = false
	off := on
	off.NAT = &forwardingOff
	if p := Diff(off, on); len(p.Ops) != 1 || p.Ops[0].NAT != on.NAT || !p.Ops[0].Replace {
		t.Errorf("Diff with ip_forward off: %v, want the NAT written again", p)
	}
}
