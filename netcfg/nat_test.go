package netcfg

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

// natENIs is a host as the packet tests build it: eth0 primary in VPC A,
// eth1 in VPC B and eth2 in VPC C (overlapping B, plus a second CIDR), eth3
// on card 1 in VPC D without NAT.
func natENIs() []NATENI {
	link := func(i int, name string) Link { return Link{Index: 10 + i, Name: name, MAC: ktMAC(i)} }
	return []NATENI{
		{Link: link(0, "eth0"), Primary: true, FirstIPv4: netip.MustParseAddr("10.0.0.10"), VPCCIDRs: prefixes("10.0.0.0/16")},
		{Link: link(1, "eth1"), Device: 1, FirstIPv4: netip.MustParseAddr("10.1.0.11"), VPCCIDRs: prefixes("10.1.0.0/16"), NAT: true},
		{Link: link(2, "eth2"), Device: 2, FirstIPv4: netip.MustParseAddr("10.1.0.12"), VPCCIDRs: prefixes("10.1.0.0/16", "100.64.0.0/16"), NAT: true},
		{Link: link(3, "eth3"), Card: 1, Device: 1, FirstIPv4: netip.MustParseAddr("172.31.5.30"), VPCCIDRs: prefixes("172.31.0.0/16")},
	}
}

func TestDesiredNAT(t *testing.T) {
	enis := natENIs()
	n, err := DesiredNAT(DefaultConfig(), enis)
	if err != nil {
		t.Fatal(err)
	}
	want := NAT{
		Egress: NATEgress{Link: enis[0].Link, Addr: netip.MustParseAddr("10.0.0.10")},
		Sources: []NATSource{
			{Link: enis[1].Link, Table: 20001, Priority: 20001, Mark: 0x00100000, Zone: 1, Allowed: prefixes("10.1.0.0/16")},
			{Link: enis[2].Link, Table: 20002, Priority: 20002, Mark: 0x00200000, Zone: 2, Allowed: prefixes("10.1.0.0/16", "100.64.0.0/16")},
		},
		ENIs:      []Link{enis[0].Link, enis[1].Link, enis[2].Link, enis[3].Link},
		Forbidden: prefixes("10.0.0.0/16", "10.1.0.0/16", "100.64.0.0/16", "169.254.0.0/16", "172.31.0.0/16"),
	}
	if !reflect.DeepEqual(n, want) {
		t.Fatalf("DesiredNAT:\n got %+v\nwant %+v", n, want)
	}

	// Card 1 device 1 is number 101: table 20101, mark 101<<20, zone 101.
	enis[3].NAT = true
	enis[3].NATSources = prefixes("172.31.5.0/24", "172.31.5.128/25", "172.31.7.0/24")
	n, err = DesiredNAT(DefaultConfig(), enis)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := n.Sources[2], (NATSource{Link: enis[3].Link, Table: 20101, Priority: 20101, Mark: 101 << 20, Zone: 101,
		Allowed: prefixes("172.31.5.0/24", "172.31.7.0/24")}); !reflect.DeepEqual(got, want) {
		t.Fatalf("card 1 source:\n got %+v\nwant %+v", got, want)
	}

	// Without a NAT source there is no NAT, whatever else is there.
	enis = natENIs()
	for i := range enis {
		enis[i].NAT = false
	}
	enis = append(enis, NATENI{Link: Link{Index: 99, Name: "eth9"}, Primary: true})
	if n, err := DesiredNAT(DefaultConfig(), enis); err != nil || n.Enabled() || n.Ruleset() != "" {
		t.Fatalf("no source: %+v, %v; want the zero NAT", n, err)
	}
}

func TestDesiredNATRefuses(t *testing.T) {
	for _, c := range []struct {
		name   string
		change func(e []NATENI) []NATENI
		want   string
	}{
		{"NAT on the primary", func(e []NATENI) []NATENI { e[0].NAT = true; return e }, "primary ENI eth0 is the egress"},
		{"no primary", func(e []NATENI) []NATENI { return e[1:] }, "no primary ENI"},
		{"two primaries", func(e []NATENI) []NATENI { e[3].Primary = true; return e }, "two primary ENIs"},
		{"primary without a link", func(e []NATENI) []NATENI { e[0].Link.Index = 0; return e }, "primary ENI eth0 has no link index"},
		{"primary without IPv4", func(e []NATENI) []NATENI { e[0].FirstIPv4 = netip.Addr{}; return e }, "no IPv4 address to masquerade to"},
		{"nat_sources outside the VPC", func(e []NATENI) []NATENI { e[1].NATSources = prefixes("10.2.0.0/24"); return e }, "10.2.0.0/24 is outside its VPC's CIDRs"},
		{"nat_sources wider than the VPC", func(e []NATENI) []NATENI { e[1].NATSources = prefixes("10.0.0.0/8"); return e }, "outside its VPC's CIDRs"},
		{"nat_sources with host bits", func(e []NATENI) []NATENI { e[1].NATSources = prefixes("10.1.5.5/24"); return e }, "did you mean 10.1.5.0/24"},
		{"IPv6 nat_sources", func(e []NATENI) []NATENI { e[1].NATSources = prefixes("2600:1f18::/56"); return e }, "AWS has no IPv6 NAT"},
		{"no VPC CIDR", func(e []NATENI) []NATENI { e[1].VPCCIDRs = nil; return e }, "no IPv4 VPC CIDR"},
		{"IPv6 VPC CIDR", func(e []NATENI) []NATENI { e[3].VPCCIDRs = prefixes("2600:1f18::/56"); return e }, "is not IPv4"},
		{"number beyond the mark", func(e []NATENI) []NATENI { e[3].NAT, e[3].Card = true, 41; return e }, "does not fit the 12-bit mark field"},
		{"device beyond the stride", func(e []NATENI) []NATENI { e[1].Device = 100; return e }, "outside the table numbering"},
		{"same card and device", func(e []NATENI) []NATENI { e[2].Device = 1; return e }, "same card and device"},
		{"same link twice", func(e []NATENI) []NATENI { e[3].Link.Index = e[1].Link.Index; return e }, "given for two ENIs"},
		{"odd link name", func(e []NATENI) []NATENI { e[1].Link.Name = "vpc b"; return e }, "cannot name a chain"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := DesiredNAT(DefaultConfig(), c.change(natENIs()))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
		})
	}
}

func TestOutermostPrefixes(t *testing.T) {
	got := outermostPrefixes(prefixes("10.1.2.0/24", "10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "10.0.0.0/8", "192.168.1.0/24", "172.16.0.0/12"))
	if want := prefixes("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// TestNATDropsOnlyBetweenOurENIs checks the shape that keeps forwarding
// that is not ours untouched: no base chain drops (by rule or policy);
// every rule of the forward chain first matches the input link against an
// ENI, and the chains that drop are reached only through those rules.
func TestNATDropsOnlyBetweenOurENIs(t *testing.T) {
	n, err := DesiredNAT(DefaultConfig(), natENIs())
	if err != nil {
		t.Fatal(err)
	}
	enis := map[string]bool{}
	for _, l := range n.ENIs {
		enis[l.Name] = true
	}
	reached := map[string]bool{}
	for _, c := range n.ruleset() {
		for _, r := range c.Rules {
			if c.base() && strings.Contains(r.Text, "drop") {
				t.Errorf("base chain %s drops: %s", c.Name, r.Text)
			}
			_, target, jumps := strings.Cut(r.Text, "jump ")
			if !jumps {
				continue
			}
			if c.base() {
				var link string
				if _, err := fmt.Sscanf(r.Text, "iif %q", &link); err != nil || !enis[link] {
					t.Errorf("base chain %s jumps without matching an ENI first: %s", c.Name, r.Text)
				}
			} else if !reached[c.Name] {
				t.Errorf("chain %s jumps before anything reaches it", c.Name)
			}
			reached[target] = true
		}
		if c.base() && c.policy != nfAccept {
			t.Errorf("base chain %s has policy %d, want accept", c.Name, c.policy)
		}
	}
}

// TestNATRulesetComparesEveryDifference: NATs that differ in any one value
// give rules that do not compare equal, and equal NATs compare equal.
func TestNATRulesetComparesEveryDifference(t *testing.T) {
	base := func() NAT {
		n, err := DesiredNAT(DefaultConfig(), natENIs())
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	same := func(a, b NAT) bool {
		ca, cb := a.ruleset(), b.ruleset()
		if len(ca) != len(cb) {
			return false
		}
		for i := range ca {
			if ca[i].Name != cb[i].Name || !ca[i].sameKind(cb[i]) {
				return false
			}
			ok, err := sameRules(ca[i].Rules, cb[i].Rules)
			if err != nil {
				t.Fatal(err)
			}
			if !ok {
				return false
			}
		}
		return true
	}
	if !same(base(), base()) {
		t.Fatal("a NAT does not compare equal to itself")
	}
	for name, change := range map[string]func(n *NAT){
		"egress address":   func(n *NAT) { n.Egress.Addr = netip.MustParseAddr("10.0.0.11") },
		"egress link":      func(n *NAT) { n.Egress.Link.Index++ },
		"mark":             func(n *NAT) { n.Sources[0].Mark = 0x00300000 },
		"zone":             func(n *NAT) { n.Sources[1].Zone = 7 },
		"source link":      func(n *NAT) { n.Sources[0].Link.Index = 99 },
		"allowed prefix":   func(n *NAT) { n.Sources[0].Allowed = prefixes("10.1.0.0/17") },
		"allowed address":  func(n *NAT) { n.Sources[0].Allowed = prefixes("10.1.128.0/17") },
		"forbidden prefix": func(n *NAT) { n.Forbidden[0] = netip.MustParsePrefix("10.0.0.0/15") },
		"an ENI":           func(n *NAT) { n.ENIs[3].Index = 77 },
	} {
		n := base()
		change(&n)
		if same(base(), n) {
			t.Errorf("changing the %s left the rules equal", name)
		}
	}
}
