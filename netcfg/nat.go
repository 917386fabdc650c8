package netcfg

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"
)

// The shared NAT (docs/nat.md): secondary ENIs in other VPCs (B, C, ...)
// whose route tables send 0.0.0.0/0 to the instance are NAT sources; their
// clients reach the internet masqueraded to the primary ENI's first IPv4
// (the egress), and nothing else crosses between the VPCs. IPv4 only: AWS
// has no IPv6 NAT. Desired computes it (addNAT) as one more object of the
// desired state, the nftables table `inet dualhomed` with ip_forward
// (NFTable: nat_ruleset.go; in the kernel: nat_kernel.go), plus one mark
// rule per source.

// NATMarkMask is the part of the packet and connection marks the NAT owns: the
// 12 high bits. The low 20 bits are where the marks of common neighbours
// live, and the NAT never changes them: kube-proxy (0x4000, 0x8000), the AWS
// VPC CNI (0x80), Cilium (0x0f00), Tailscale (0x40000 and 0x80000 in its
// 0xff0000 field). Calico's default mask 0xffff0000 overlaps (docs/nat.md).
const NATMarkMask uint32 = 0xfff00000

// natMarkShift places a source's number in NATMarkMask.
const natMarkShift = 20

// NATLinkLocal is never a NAT destination: the link-local services of the
// egress's VPC (IMDS at 169.254.169.254, the DNS resolver, time sync) would
// answer a forwarded client as if it were the instance, IAM credentials
// included.
var NATLinkLocal = netip.MustParsePrefix("169.254.0.0/16")

// NAT is the shared NAT a host wants.
type NAT struct {
	Egress     Link
	EgressAddr netip.Addr  // the primary ENI's first IPv4, which sources are masqueraded to
	Sources    []NATSource // sorted by mark
	// ENIs are every ENI with a link that dualhomed does not exclude, the
	// egress included, by link index: forwarding between two of them is
	// dropped unless it is NAT traffic of a source.
	ENIs []Link
	// Forbidden are destinations a source never reaches through the NAT:
	// every VPC CIDR of every ENI, and NATLinkLocal. Sorted, none inside
	// another.
	Forbidden []netip.Prefix
}

// NATSource is one ENI whose VPC uses the instance as its NAT. Its number
// n = CardStride*card + device (its table minus TableBase) gives the
// connection mark n << 20 and the conntrack zone n: they follow from card
// and device alone, so a restart computes the same ones.
type NATSource struct {
	Link    Link
	Mark    uint32         // connection mark of its NAT connections, within NATMarkMask
	Zone    uint16         // conntrack zone of the packets it receives, original direction
	Allowed []netip.Prefix // sources forwarded to the egress, sorted
}

// NAT roles in ENIStatus.NAT.
const (
	NATRoleSource = "source"
	NATRoleEgress = "egress"
)

// addNAT wants the shared NAT when an enis entry has nat: true (nobody else
// gets anything): its table and a mark rule per source, which routes the
// replies of the source's connections through the source's table. While
// the NAT cannot be computed (an ENI not ready in IMDS, nat_sources outside
// the VPC, no egress address), the table and the mark rules the kernel
// holds stay as they are, with a warning.
func (d *desirer) addNAT() {
	if !slices.ContainsFunc(d.enis, func(e *eniInfo) bool { return e.conf.NAT }) {
		return
	}
	n, err := d.nat()
	if err != nil {
		d.warn(nil, "NAT: "+err.Error()+": the NAT stays as the kernel has it", "see docs/nat.md")
		d.st.NAT = d.obs.Owned.NAT
		for _, r := range d.obs.Owned.Rules {
			if r.Mark != 0 {
				d.rule(r)
			}
		}
		return
	}
	d.st.NAT = n.table()
	for _, r := range n.markRules(d.cfg) {
		d.rule(r)
	}
}

// markRules are the rules that route the replies of each source's
// connections through its table: `ip rule add fwmark <mark>/0xfff00000
// lookup <table> priority <priority>`, at the source's priority.
func (n NAT) markRules(cfg Config) []Rule {
	var rules []Rule
	for _, s := range n.Sources {
		num := int(s.Mark >> natMarkShift)
		rules = append(rules, Rule{Priority: cfg.PriorityBase + num, Src: anyPrefix(unix.AF_INET), Table: cfg.TableBase + num, Mark: s.Mark, Mask: NATMarkMask})
	}
	return rules
}

// nat computes the NAT from the snapshot's ENIs.
func (d *desirer) nat() (NAT, error) {
	n := NAT{Forbidden: []netip.Prefix{NATLinkLocal}}
	for _, e := range d.enis {
		n.Forbidden = append(n.Forbidden, e.eni.VPCIPv4CIDRs...)
		if !e.hasLink || e.conf.Exclude {
			continue
		}
		if !e.eni.Ready {
			return n, fmt.Errorf("%s is not ready in IMDS", e.name())
		}
		n.ENIs = append(n.ENIs, e.link)
		switch {
		case e.primary && e.conf.NAT:
			return n, fmt.Errorf("%s is the primary ENI, the NAT's egress: it cannot be a NAT source", e.name())
		case e.primary:
			if len(e.eni.LocalIPv4s) == 0 || !d.present(e.link.Index, e.eni.LocalIPv4s[0]) {
				return n, fmt.Errorf("the primary ENI %s has no IPv4 address on %s to masquerade to", e.name(), e.link.Name)
			}
			n.Egress, n.EgressAddr = e.link, e.eni.LocalIPv4s[0]
			e.status.NAT = NATRoleEgress
		case e.conf.NAT:
			s, err := d.natSource(e)
			if err != nil {
				return n, err
			}
			n.Sources = append(n.Sources, s)
			e.status.NAT = NATRoleSource
		}
	}
	if !n.EgressAddr.IsValid() {
		return n, fmt.Errorf("no primary ENI with a link: it is the NAT's egress")
	}
	n.Forbidden = outermostPrefixes(n.Forbidden)
	slices.SortFunc(n.ENIs, func(a, b Link) int { return cmp.Compare(a.Index, b.Index) })
	slices.SortFunc(n.Sources, func(a, b NATSource) int { return cmp.Compare(a.Mark, b.Mark) })
	return n, nil
}

// natSource builds the source for ENI e: its number, and its allowed
// sources (nat_sources, which may only narrow its VPC's IPv4 CIDRs).
func (d *desirer) natSource(e *eniInfo) (NATSource, error) {
	num := e.table - d.cfg.TableBase
	switch {
	case e.table == 0 || !e.v4.IsValid():
		return NATSource{}, fmt.Errorf("the NAT source %s has no IPv4 routing table for its replies (state %s)", e.name(), e.status.State)
	case num < 1 || num > int(NATMarkMask>>natMarkShift):
		return NATSource{}, fmt.Errorf("the NAT source %s is number %d (card %d, device %d), beyond the 12-bit mark field (1..%d)",
			e.name(), num, e.eni.NetworkCard, e.eni.DeviceNumber, NATMarkMask>>natMarkShift)
	}
	vpc := e.eni.VPCIPv4CIDRs
	allowed := vpc
	if len(e.conf.NATSources) > 0 {
		allowed = nil
		for _, p := range e.conf.NATSources {
			if !slices.ContainsFunc(vpc, func(c netip.Prefix) bool { return c.Bits() <= p.Bits() && c.Contains(p.Addr()) }) {
				return NATSource{}, fmt.Errorf("%s: %v is outside the VPC CIDRs %v of %s: nat_sources can only narrow them", p.where(), p.Prefix, vpc, e.name())
			}
			allowed = append(allowed, p.Prefix)
		}
	}
	if len(allowed) == 0 {
		return NATSource{}, fmt.Errorf("IMDS gives no IPv4 VPC CIDR of the NAT source %s to allow sources from", e.name())
	}
	return NATSource{Link: e.link, Mark: uint32(num) << natMarkShift, Zone: uint16(num), Allowed: outermostPrefixes(allowed)}, nil
}

// outermostPrefixes sorts ps and drops duplicates and prefixes inside another.
func outermostPrefixes(ps []netip.Prefix) []netip.Prefix {
	ps = slices.Clone(ps)
	slices.SortFunc(ps, comparePrefix) // a covering prefix before what it covers
	out := ps[:0]
	for _, p := range ps {
		if len(out) > 0 && out[len(out)-1].Bits() <= p.Bits() && out[len(out)-1].Contains(p.Addr()) {
			continue
		}
		out = append(out, p)
	}
	return out
}
