package netcfg

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// NATTableName is dualhomed's nftables table, family inet: one table holds
// the NAT (IPv4) and the drop of forwarding between our ENIs, which applies
// to IPv6 as well. dualhomed creates it, owns all of it and deletes it on
// cleanup; it never reads or changes another table.
const NATTableName = "dualhomed"

// The chains of the table. Base chains never drop by policy: the NAT's drops
// are explicit rules about our ENIs, so forwarding that is not ours (a Docker
// bridge and eth0) passes through untouched, and other tables decide.
const (
	natChainZones       = "zones"        // prerouting, raw: zone of each source, before conntrack
	natChainRestoreMark = "restore_mark" // prerouting, mangle: reply mark, before routing
	natChainForward     = "forward"      // forward, filter: what may cross
	natChainToENIs      = "to_enis"      // drop when the output is one of our ENIs
	natChainFromSource  = "from_source"  // a source's traffic to a link that is not an ENI
	natChainSNAT        = "egress_nat"   // postrouting, srcnat: masquerade to the egress
	natChainAdmitPrefix = "admit_"       // admit_<link>: admits a source's new connections
)

// natCommentAllowed marks the rules that admit a new NAT connection: their
// counters count connections (NATTable.Counters).
const natCommentAllowed = "allowed source"

// nftChain is one chain of the table as dualhomed wants it and reads it back.
// A base chain has a type, hook, priority and policy (we want accept); a
// regular chain (a jump target) has none.
type nftChain struct {
	Name     string
	Type     string // "filter", "nat"; "" for a regular chain
	Hook     uint32 // unix.NF_INET_*
	Priority int32
	policy   uint32 // NF_ACCEPT or NF_DROP; 0 for a regular chain
	Rules    []nftRule
}

// baseChain is a base chain with the policy accept.
func baseChain(name, typ string, hook uint32, priority int32) nftChain {
	return nftChain{Name: name, Type: typ, Hook: hook, Priority: priority, policy: nfAccept}
}

func (c nftChain) base() bool { return c.Type != "" }

// nftRule is one rule: its expressions, each encoded as the kernel takes
// them (NFTA_EXPR_NAME, NFTA_EXPR_DATA), its comment (the rule's userdata,
// which `nft list` prints), and its text as `nft list` prints it.
type nftRule struct {
	Exprs   [][]byte
	Comment string
	Text    string
}

// userData is the rule's NFTA_RULE_USERDATA: the comment, in nft's format.
func (r nftRule) userData() []byte {
	if r.Comment == "" {
		return nil
	}
	return userdata.AppendString(nil, userdata.TypeComment, r.Comment)
}

// ruleset is the table for n, chains in the order they are created. The
// zero NAT has no table.
//
// The packet's path, for a client of source S (link s) and egress E:
//   - zones: a packet entering s gets conntrack zone Z_S on its original
//     direction, so that equal tuples from two overlapping VPCs are two
//     connections; replies, masqueraded, are found in the default zone.
//   - forward, admit_<s>: a new connection from s to E is dropped towards a
//     forbidden destination, marked M_S from an allowed source, and dropped
//     from any other; marked connections pass both ways.
//   - egress_nat: marked connections leave E with the egress address.
//   - restore_mark: a reply entering E of a connection marked M_S gets the
//     packet mark M_S, so the fwmark rule routes it through S's table.
//   - to_enis, from_source: every other forwarding between two ENIs is
//     dropped; from a source to a link that is not an ENI, only replies and
//     connections another program's DNAT published pass.
func (n NAT) ruleset() []nftChain {
	if !n.Enabled() {
		return nil
	}
	names := map[int]string{}
	for _, l := range n.ENIs {
		names[l.Index] = l.Name
	}
	names[n.Egress.Link.Index] = n.Egress.Link.Name
	for _, s := range n.Sources {
		names[s.Link.Index] = s.Link.Name
	}
	rule := func(comment string, build func(b *ruleBuilder)) nftRule {
		b := &ruleBuilder{names: names}
		build(b)
		return nftRule{Exprs: b.exprs, Comment: comment, Text: strings.Join(b.text, " ")}
	}
	egress := n.Egress.Link

	zones := baseChain(natChainZones, "filter", unix.NF_INET_PRE_ROUTING, -300)
	restore := baseChain(natChainRestoreMark, "filter", unix.NF_INET_PRE_ROUTING, -150)
	forward := baseChain(natChainForward, "filter", unix.NF_INET_FORWARD, 0)
	snat := baseChain(natChainSNAT, "nat", unix.NF_INET_POST_ROUTING, 100)
	var admits []nftChain
	sources := map[int]bool{}

	for _, s := range n.Sources {
		sources[s.Link.Index] = true
		zones.Rules = append(zones.Rules, rule(s.Link.Name+": conntrack zone of its clients", func(b *ruleBuilder) {
			b.nfprotoIPv4()
			b.iif(s.Link)
			b.setZoneOriginal(s.Zone)
		}))
		restore.Rules = append(restore.Rules, rule(s.Link.Name+": replies route through its table", func(b *ruleBuilder) {
			b.iif(egress)
			b.ctDirection(true)
			b.ctMarkIs(s.Mark)
			b.setMetaMark(s.Mark)
		}))
		forward.Rules = append(forward.Rules, rule(s.Link.Name+": NAT traffic out", func(b *ruleBuilder) {
			b.iif(s.Link)
			b.oif(egress)
			b.ctDirection(false)
			b.ctMarkIs(s.Mark)
			b.verdict(expr.VerdictAccept, "")
		}), rule(s.Link.Name+": NAT replies in", func(b *ruleBuilder) {
			b.iif(egress)
			b.oif(s.Link)
			b.ctDirection(true)
			b.ctMarkIs(s.Mark)
			b.verdict(expr.VerdictAccept, "")
		}))
		admit := nftChain{Name: natChainAdmitPrefix + s.Link.Name}
		for _, f := range n.Forbidden {
			admit.Rules = append(admit.Rules, rule("forbidden destination", func(b *ruleBuilder) {
				b.ipAddr(false, f)
				b.counter()
				b.verdict(expr.VerdictDrop, "")
			}))
		}
		for _, a := range s.Allowed {
			admit.Rules = append(admit.Rules, rule(natCommentAllowed, func(b *ruleBuilder) {
				b.ipAddr(true, a)
				b.counter()
				b.setCtMark(s.Mark)
				b.verdict(expr.VerdictAccept, "")
			}))
		}
		admit.Rules = append(admit.Rules, rule("source not allowed", func(b *ruleBuilder) {
			b.counter()
			b.verdict(expr.VerdictDrop, "")
		}))
		admits = append(admits, admit)
		snat.Rules = append(snat.Rules, rule(s.Link.Name+": masquerade to the egress", func(b *ruleBuilder) {
			b.oif(egress)
			b.ctMarkIs(s.Mark)
			b.snat(n.Egress.Addr)
		}))
	}
	// New connections after the established ones: most packets stop at the
	// first rules.
	for _, s := range n.Sources {
		forward.Rules = append(forward.Rules, rule(s.Link.Name+": new NAT connections", func(b *ruleBuilder) {
			b.iif(s.Link)
			b.oif(egress)
			b.ctStateNew()
			b.verdict(expr.VerdictJump, natChainAdmitPrefix+s.Link.Name)
		}))
	}
	toENIs := nftChain{Name: natChainToENIs}
	for _, l := range n.ENIs {
		target, comment := natChainToENIs, "from an ENI"
		if sources[l.Index] {
			target, comment = natChainFromSource, "from a NAT source"
		}
		forward.Rules = append(forward.Rules, rule(comment, func(b *ruleBuilder) {
			b.iif(l)
			b.verdict(expr.VerdictJump, target)
		}))
		toENIs.Rules = append(toENIs.Rules, rule("between two ENIs", func(b *ruleBuilder) {
			b.oif(l)
			b.counter()
			b.verdict(expr.VerdictDrop, "")
		}))
	}
	fromSource := nftChain{Name: natChainFromSource, Rules: []nftRule{
		rule("", func(b *ruleBuilder) { b.verdict(expr.VerdictJump, natChainToENIs) }),
		rule("replies of connections into the VPC", func(b *ruleBuilder) {
			b.ctDirection(true)
			b.verdict(expr.VerdictAccept, "")
		}),
		rule("published by another program's DNAT", func(b *ruleBuilder) {
			b.ctStatusDNAT()
			b.verdict(expr.VerdictAccept, "")
		}),
		rule("a source VPC routes through the instance", func(b *ruleBuilder) {
			b.counter()
			b.verdict(expr.VerdictDrop, "")
		}),
	}}
	// Reading order: `nft list` shows chains in the order they were created,
	// and every chain is created before any rule, so jumps find their target.
	chains := []nftChain{zones, restore, forward}
	chains = append(chains, admits...)
	return append(chains, toENIs, fromSource, snat)
}

// ruleBuilder encodes a rule's expressions with google/nftables/expr, and
// writes beside them the text `nft list` prints for them (tests compare the
// two). All expressions use register 1.
type ruleBuilder struct {
	exprs [][]byte
	text  []string
	names map[int]string // link index -> name, for the text
}

const natReg = unix.NFT_REG_1

// add encodes es and appends text (which may be empty).
func (b *ruleBuilder) add(text string, es ...expr.Any) {
	for _, e := range es {
		enc, err := expr.Marshal(unix.NFPROTO_INET, e)
		if err != nil {
			// Every expression here is a fixed shape the library always
			// encodes: an error is a programming error.
			panic(fmt.Sprintf("encoding nftables expression %T: %v", e, err))
		}
		b.exprs = append(b.exprs, enc)
	}
	if text != "" {
		b.text = append(b.text, text)
	}
}

func (b *ruleBuilder) link(key expr.MetaKey, word string, l Link) {
	b.add(fmt.Sprintf("%s %q", word, b.names[l.Index]),
		&expr.Meta{Key: key, Register: natReg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: binaryutil.NativeEndian.PutUint32(uint32(l.Index))})
}

// iif is `iif <link>`: the input link, by index, so that a link renamed or
// replaced never inherits the rule.
func (b *ruleBuilder) iif(l Link) { b.link(expr.MetaKeyIIF, "iif", l) }

// oif is `oif <link>`.
func (b *ruleBuilder) oif(l Link) { b.link(expr.MetaKeyOIF, "oif", l) }

// nfprotoIPv4 is `meta nfproto ipv4`.
func (b *ruleBuilder) nfprotoIPv4() {
	b.add("meta nfproto ipv4",
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: natReg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: []byte{unix.NFPROTO_IPV4}})
}

// ipAddr is `ip saddr <p>` (src) or `ip daddr <p>`, with the `meta nfproto
// ipv4` it needs in an inet table (nft prints it implied).
func (b *ruleBuilder) ipAddr(src bool, p netip.Prefix) {
	word, offset := "ip daddr", uint32(16)
	if src {
		word, offset = "ip saddr", 12
	}
	b.add("",
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: natReg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: []byte{unix.NFPROTO_IPV4}})
	b.add("", &expr.Payload{DestRegister: natReg, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4})
	if p.Bits() < 32 {
		m := make([]byte, 4)
		binary.BigEndian.PutUint32(m, ^uint32(0)<<(32-p.Bits()))
		b.add("", &expr.Bitwise{SourceRegister: natReg, DestRegister: natReg, Len: 4, Mask: m, Xor: make([]byte, 4)})
	}
	a := p.Addr().As4()
	text := word + " " + p.String()
	if p.Bits() == 32 {
		text = word + " " + p.Addr().String()
	}
	b.add(text, &expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: a[:]})
}

// ctDirection is `ct direction original` or `ct direction reply`.
func (b *ruleBuilder) ctDirection(reply bool) {
	word, v := "original", byte(0)
	if reply {
		word, v = "reply", 1
	}
	b.add("ct direction "+word,
		&expr.Ct{Key: expr.CtKeyDIRECTION, Register: natReg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: []byte{v}})
}

// ctBits loads the ct key and keeps bits; cmp eq 0 when !set, neq 0 when set.
func (b *ruleBuilder) ctBits(text string, key expr.CtKey, bits uint32) {
	b.add(text,
		&expr.Ct{Key: key, Register: natReg},
		&expr.Bitwise{SourceRegister: natReg, DestRegister: natReg, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bits), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: natReg, Data: make([]byte, 4)})
}

// ctStateNew is `ct state new`.
func (b *ruleBuilder) ctStateNew() { b.ctBits("ct state new", expr.CtKeySTATE, expr.CtStateBitNEW) }

// ctStatusDNAT is `ct status dnat`: another program rewrote the destination
// (IPS_DST_NAT), as Docker does for a published port.
func (b *ruleBuilder) ctStatusDNAT() { b.ctBits("ct status dnat", expr.CtKeySTATUS, 1<<5) }

// ctMarkIs is `ct mark & NATMarkMask == mark`.
func (b *ruleBuilder) ctMarkIs(mark uint32) {
	// nft prints a match on the high bits as a prefix of the mark.
	b.add(fmt.Sprintf("ct mark 0x%08x/%d", mark, 32-natMarkShift),
		&expr.Ct{Key: expr.CtKeyMARK, Register: natReg},
		&expr.Bitwise{SourceRegister: natReg, DestRegister: natReg, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(NATMarkMask), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: binaryutil.NativeEndian.PutUint32(mark)})
}

// keepOthersSetOurs is the bitwise (x & ^NATMarkMask) ^ mark: our field set to
// mark, every other bit kept.
func keepOthersSetOurs(mark uint32) *expr.Bitwise {
	return &expr.Bitwise{SourceRegister: natReg, DestRegister: natReg, Len: 4,
		Mask: binaryutil.NativeEndian.PutUint32(^NATMarkMask), Xor: binaryutil.NativeEndian.PutUint32(mark)}
}

// setCtMark is `ct mark set ct mark & ~NATMarkMask | mark` (nft prints the
// mask with mark's bits, which changes nothing under the or).
func (b *ruleBuilder) setCtMark(mark uint32) {
	b.add(fmt.Sprintf("ct mark set ct mark & 0x%08x | 0x%08x", ^NATMarkMask|mark, mark),
		&expr.Ct{Key: expr.CtKeyMARK, Register: natReg},
		keepOthersSetOurs(mark),
		&expr.Ct{Key: expr.CtKeyMARK, Register: natReg, SourceRegister: true})
}

// setMetaMark is `meta mark set meta mark & ~NATMarkMask | mark`, printed as
// setCtMark is.
func (b *ruleBuilder) setMetaMark(mark uint32) {
	b.add(fmt.Sprintf("meta mark set meta mark & 0x%08x | 0x%08x", ^NATMarkMask|mark, mark),
		&expr.Meta{Key: expr.MetaKeyMARK, Register: natReg},
		keepOthersSetOurs(mark),
		&expr.Meta{Key: expr.MetaKeyMARK, Register: natReg, SourceRegister: true})
}

// setZoneOriginal is `ct original zone set <zone>`. google/nftables v0.3.0
// cannot encode it: its Ct sends NFTA_CT_DIRECTION only for address and port
// keys (google/nftables pull request 364), and without a direction the zone
// applies to replies too, which then miss their connection. So this one
// expression is encoded here, as the kernel dumps it (nft_ct_set_dump):
// key, source register, direction as u8.
func (b *ruleBuilder) setZoneOriginal(zone uint16) {
	b.add("", &expr.Immediate{Register: natReg, Data: binaryutil.NativeEndian.PutUint16(zone)})
	b.exprs = append(b.exprs, ctZoneSetOriginal)
	b.text = append(b.text, fmt.Sprintf("ct original zone set %d", zone))
}

// ctZoneSetOriginal is the expression `ct original zone set <register 1>`.
var ctZoneSetOriginal = func() []byte {
	data, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_CT_KEY, Data: binaryutil.BigEndian.PutUint32(unix.NFT_CT_ZONE)},
		{Type: unix.NFTA_CT_SREG, Data: binaryutil.BigEndian.PutUint32(natReg)},
		{Type: unix.NFTA_CT_DIRECTION, Data: []byte{0}}, // IP_CT_DIR_ORIGINAL
	})
	if err != nil {
		panic(err)
	}
	enc, err := netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_EXPR_NAME, Data: []byte("ct\x00")},
		{Type: unix.NLA_F_NESTED | unix.NFTA_EXPR_DATA, Data: data},
	})
	if err != nil {
		panic(err)
	}
	return enc
}()

// counter is `counter`; nft prints its values, which the text leaves out.
func (b *ruleBuilder) counter() { b.add("counter", &expr.Counter{}) }

// snat is `snat ip to <addr>`.
func (b *ruleBuilder) snat(addr netip.Addr) {
	a := addr.As4()
	b.add("snat ip to "+addr.String(),
		&expr.Immediate{Register: natReg, Data: a[:]},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: natReg, RegAddrMax: natReg})
}

// verdict is accept, drop or `jump <chain>`.
func (b *ruleBuilder) verdict(kind expr.VerdictKind, chain string) {
	text := map[expr.VerdictKind]string{expr.VerdictAccept: "accept", expr.VerdictDrop: "drop", expr.VerdictJump: "jump " + chain}[kind]
	b.add(text, &expr.Verdict{Kind: kind, Chain: chain})
}

// Ruleset renders the table n wants as `nft list table inet dualhomed`
// prints it, counters without their values; "" for the zero NAT. plan and
// status show it.
func (n NAT) Ruleset() string {
	chains := n.ruleset()
	if chains == nil {
		return ""
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "table inet %s {\n", NATTableName)
	for i, c := range chains {
		if i > 0 {
			sb.WriteString("\n")
		}
		fmt.Fprintf(&sb, "\tchain %s {\n", c.Name)
		if c.base() {
			fmt.Fprintf(&sb, "\t\ttype %s hook %s priority %s; policy accept;\n", c.Type, natHookNames[c.Hook], natPriorityName(c.Priority))
		}
		for _, r := range c.Rules {
			line := r.Text
			if r.Comment != "" {
				line += fmt.Sprintf(" comment %q", r.Comment)
			}
			fmt.Fprintf(&sb, "\t\t%s\n", line)
		}
		sb.WriteString("\t}\n")
	}
	sb.WriteString("}\n")
	return sb.String()
}

var natHookNames = map[uint32]string{
	unix.NF_INET_PRE_ROUTING:  "prerouting",
	unix.NF_INET_FORWARD:      "forward",
	unix.NF_INET_POST_ROUTING: "postrouting",
}

// natPriorityName is the name nft gives the standard priorities we use.
func natPriorityName(p int32) string {
	switch p {
	case -300:
		return "raw"
	case -150:
		return "mangle"
	case 0:
		return "filter"
	case 100:
		return "srcnat"
	}
	return fmt.Sprint(p)
}
