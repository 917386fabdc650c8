package netcfg

import (
	"cmp"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
)

// The shared NAT: secondary ENIs in other VPCs (B, C, ...) whose route
// tables send 0.0.0.0/0 to the instance are NAT sources; their clients reach
// the internet masqueraded to the primary ENI's first IPv4 (the egress), and
// nothing else crosses between the VPCs. IPv4 only: AWS has no IPv6 NAT
// (private IPv6 egress is an egress-only internet gateway in each VPC).
//
// DesiredNAT turns plain values into a NAT (pure); NAT.ruleset turns that into
// the nftables table `inet dualhomed` (pure); NATTable reads the table back,
// compares and applies it in one transaction (nat_kernel.go).

// NATMarkMask is the part of the packet and connection marks the NAT owns: the
// 12 high bits. The low 20 bits are where the marks of common neighbours
// live, and the NAT never changes them: kube-proxy (0x4000, 0x8000), the AWS
// VPC CNI (0x80), Cilium (0x0f00), Tailscale (0x40000 and 0x80000 in its
// 0xff0000 field). Calico's default mask 0xffff0000 overlaps (docs/nat.md).
const NATMarkMask uint32 = 0xfff00000

// natMarkShift places a source's number in NATMarkMask.
const natMarkShift = 20

// natMaxSourceNumber is the largest number a mark of 12 bits can carry.
const natMaxSourceNumber = int(NATMarkMask >> natMarkShift)

// NATLinkLocal is never a NAT destination: the link-local services of the
// egress's VPC (IMDS at 169.254.169.254, the DNS resolver, time sync) would
// answer a forwarded client as if it were the instance, IAM credentials
// included.
var NATLinkLocal = netip.MustParsePrefix("169.254.0.0/16")

// NATENI is what the NAT needs to know of one ENI dualhomed manages and whose
// link exists. The caller passes every such ENI, the primary included: the
// NAT forbids forwarding between any two of them.
type NATENI struct {
	Link      Link
	Card      int
	Device    int
	Primary   bool
	FirstIPv4 netip.Addr     // the ENI's primary private IPv4; invalid when it has none
	VPCCIDRs  []netip.Prefix // its VPC's IPv4 CIDRs (IMDS vpc-ipv4-cidr-blocks)
	// NAT makes the ENI a NAT source (`nat: true` in its enis entry).
	NAT bool
	// NATSources narrows the sources allowed through the NAT (`nat_sources:`);
	// empty means VPCCIDRs.
	NATSources []netip.Prefix
}

// NAT is the shared NAT a host wants. The zero value is "no NAT": no table,
// no forwarding.
type NAT struct {
	Egress  NATEgress
	Sources []NATSource // sorted by table
	// ENIs are every ENI dualhomed manages, the egress included, sorted by
	// link index: forwarding between two of them is dropped unless it is
	// NAT traffic of a source.
	ENIs []Link
	// Forbidden are destinations a source never reaches through the NAT:
	// every VPC CIDR of every ENI, and NATLinkLocal. Sorted, none inside
	// another.
	Forbidden []netip.Prefix
}

// NATEgress is where NAT traffic leaves: the primary ENI, masqueraded to Addr.
type NATEgress struct {
	Link Link
	Addr netip.Addr
}

// NATSource is one ENI whose VPC uses the instance as its NAT.
//
// Its number n = CardStride*card + device is the ENI's table minus TableBase.
// The connection mark is n << 20 (within NATMarkMask) and the conntrack zone
// is n: both follow from card and device alone, so a restart or another
// instance computes the same ones.
type NATSource struct {
	Link     Link
	Table    int            // the ENI's routing table: replies are routed there
	Priority int            // the ENI's rule priority: the fwmark rule sits there
	Mark     uint32         // connection mark of its NAT connections, within NATMarkMask
	Zone     uint16         // conntrack zone of the packets it receives, original direction
	Allowed  []netip.Prefix // sources forwarded to the egress, sorted
}

// clone is a copy of n that shares no slice with it.
func (n NAT) clone() *NAT {
	c := n
	c.Sources = slices.Clone(n.Sources)
	for i := range c.Sources {
		c.Sources[i].Allowed = slices.Clone(n.Sources[i].Allowed)
	}
	c.ENIs = slices.Clone(n.ENIs)
	c.Forbidden = slices.Clone(n.Forbidden)
	return &c
}

// Enabled reports whether the NAT has anything to do.
func (n NAT) Enabled() bool { return len(n.Sources) > 0 }

// natLinkName is what a link name must look like to name a chain
// (admit_<link>) that `nft` prints and parses back without quoting.
var natLinkName = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.-]{0,14}$`)

// DesiredNAT computes the NAT for enis under cfg's table numbering. It is
// pure. No ENI with NAT set gives the zero NAT. Errors name the ENI's link
// and the value at fault; they are configuration or IMDS errors that no NAT
// can be built from.
func DesiredNAT(cfg Config, enis []NATENI) (NAT, error) {
	if !slices.ContainsFunc(enis, func(e NATENI) bool { return e.NAT }) {
		return NAT{}, nil // nothing changes for anyone who does not configure it
	}
	var primary *NATENI
	for i := range enis {
		e := &enis[i]
		if !e.Primary {
			continue
		}
		if primary != nil {
			return NAT{}, fmt.Errorf("NAT: two primary ENIs (%s and %s)", primary.Link.Name, e.Link.Name)
		}
		primary = e
	}
	if primary == nil {
		return NAT{}, fmt.Errorf("NAT: no primary ENI with a link: it is the NAT's egress")
	}
	if primary.Link.Index <= 0 {
		return NAT{}, fmt.Errorf("NAT: the primary ENI %s has no link index", primary.Link.Name)
	}
	if !primary.FirstIPv4.Is4() {
		return NAT{}, fmt.Errorf("NAT: the primary ENI %s has no IPv4 address to masquerade to", primary.Link.Name)
	}
	n := NAT{Egress: NATEgress{Link: primary.Link, Addr: primary.FirstIPv4}}
	var forbidden []netip.Prefix
	for i := range enis {
		e := &enis[i]
		n.ENIs = append(n.ENIs, e.Link)
		for _, c := range e.VPCCIDRs {
			if !c.Addr().Is4() {
				return NAT{}, fmt.Errorf("NAT: VPC CIDR %s of %s is not IPv4", c, e.Link.Name)
			}
			forbidden = append(forbidden, c.Masked())
		}
		if !e.NAT {
			continue
		}
		s, err := natSource(cfg, e)
		if err != nil {
			return NAT{}, err
		}
		n.Sources = append(n.Sources, s)
	}
	n.Forbidden = outermostPrefixes(append(forbidden, NATLinkLocal))
	slices.SortFunc(n.ENIs, func(a, b Link) int { return cmp.Compare(a.Index, b.Index) })
	slices.SortFunc(n.Sources, func(a, b NATSource) int { return cmp.Compare(a.Table, b.Table) })
	for i := 1; i < len(n.ENIs); i++ {
		if n.ENIs[i].Index == n.ENIs[i-1].Index {
			return NAT{}, fmt.Errorf("NAT: link index %d given for two ENIs (%s, %s)", n.ENIs[i].Index, n.ENIs[i-1].Name, n.ENIs[i].Name)
		}
	}
	for i := 1; i < len(n.Sources); i++ {
		if n.Sources[i].Table == n.Sources[i-1].Table {
			return NAT{}, fmt.Errorf("NAT: sources %s and %s have the same card and device", n.Sources[i-1].Link.Name, n.Sources[i].Link.Name)
		}
	}
	return n, nil
}

// natSource builds the source for ENI e: its number, mark and zone, and its
// allowed sources (nat_sources, which may only narrow the VPC's CIDRs).
func natSource(cfg Config, e *NATENI) (NATSource, error) {
	name := e.Link.Name
	if e.Primary {
		return NATSource{}, fmt.Errorf("NAT: the primary ENI %s is the egress; it cannot be a NAT source", name)
	}
	if e.Link.Index <= 0 {
		return NATSource{}, fmt.Errorf("NAT: source %s has no link index", name)
	}
	if !natLinkName.MatchString(name) {
		return NATSource{}, fmt.Errorf("NAT: link name %q cannot name a chain (letters, digits, '_', '.', '-')", name)
	}
	if e.Card < 0 || e.Device < 0 || e.Device >= cfg.CardStride {
		return NATSource{}, fmt.Errorf("NAT: source %s: card %d device %d outside the table numbering (card stride %d)", name, e.Card, e.Device, cfg.CardStride)
	}
	num := cfg.CardStride*e.Card + e.Device
	if num < 1 || num > natMaxSourceNumber {
		return NATSource{}, fmt.Errorf("NAT: source %s: number %d (card %d, device %d) does not fit the 12-bit mark field (1..%d)",
			name, num, e.Card, e.Device, natMaxSourceNumber)
	}
	var vpc []netip.Prefix
	for _, c := range e.VPCCIDRs {
		vpc = append(vpc, c.Masked())
	}
	allowed := vpc
	if len(e.NATSources) > 0 {
		allowed = nil
		for _, p := range e.NATSources {
			if !p.IsValid() || !p.Addr().Is4() {
				return NATSource{}, fmt.Errorf("NAT: nat_sources of %s: %s is not an IPv4 CIDR (AWS has no IPv6 NAT)", name, p)
			}
			if p.Masked() != p {
				return NATSource{}, fmt.Errorf("NAT: nat_sources of %s: %s has host bits set (did you mean %s?)", name, p, p.Masked())
			}
			if !slices.ContainsFunc(vpc, func(c netip.Prefix) bool { return c.Bits() <= p.Bits() && c.Contains(p.Addr()) }) {
				return NATSource{}, fmt.Errorf("NAT: nat_sources of %s: %s is outside its VPC's CIDRs %v; nat_sources can only narrow them", name, p, vpc)
			}
			allowed = append(allowed, p)
		}
	}
	allowed = outermostPrefixes(allowed)
	if len(allowed) == 0 {
		return NATSource{}, fmt.Errorf("NAT: source %s: no IPv4 VPC CIDR known to allow sources from", name)
	}
	return NATSource{
		Link:     e.Link,
		Table:    cfg.TableBase + num,
		Priority: cfg.PriorityBase + num,
		Mark:     uint32(num) << natMarkShift,
		Zone:     uint16(num),
		Allowed:  allowed,
	}, nil
}

// outermostPrefixes sorts ps and drops duplicates and prefixes inside another.
func outermostPrefixes(ps []netip.Prefix) []netip.Prefix {
	ps = slices.Clone(ps)
	// Shorter first among equal addresses, so that a covering prefix
	// comes before what it covers.
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.Bits(), b.Bits())
	})
	out := ps[:0]
	for _, p := range ps {
		if len(out) > 0 {
			last := out[len(out)-1]
			if last.Bits() <= p.Bits() && last.Contains(p.Addr()) {
				continue
			}
		}
		out = append(out, p)
	}
	return out
}
