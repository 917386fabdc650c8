package netcfg

// The shared NAT's nftables table `inet dualhomed`, pure: the ruleset a NAT
// wants, and the canonical form in which Observe's read of the table and
// Desired's table compare. Kernel I/O is in nat_kernel.go.

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// NATTableName is dualhomed's nftables table, family inet: one table holds
// the NAT (IPv4) and the drop of forwarding between our ENIs, which applies
// to IPv6 as well. dualhomed creates it, owns all of it and deletes it on
// cleanup.
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
// counters count connections (NATCounters).
const natCommentAllowed = "allowed source"

// NFTable is the table `inet dualhomed` with net.ipv4.ip_forward, an object
// of the desired state (NAT.table) and of the owned one (Kernel.readNAT).
type NFTable struct {
	chains []nftChain // what Apply writes; nil when read from the kernel
	canon  string     // the table, "" for none; equal strings, equal tables (canonical)
	// Forwarding: ip_forward on (desired); on, with its original recorded
	// (owned).
	Forwarding bool
}

// Equal reports whether t and u are the same table and forwarding (nil: none).
func (t *NFTable) Equal(u *NFTable) bool {
	if t == nil || u == nil {
		return t == u
	}
	return t.canon == u.canon && t.Forwarding == u.Forwarding
}

// String describes the table in a plan.
func (t *NFTable) String() string {
	rules := 0
	for _, c := range t.chains {
		rules += len(c.Rules)
	}
	return fmt.Sprintf("table inet %s (%d chains, %d rules)", NATTableName, len(t.chains), rules)
}

// nftChain is one chain of the table. A base chain has a type, hook,
// priority and policy (ours: accept); a regular chain (a jump target) none.
type nftChain struct {
	Name     string
	Type     string // "filter", "nat"; "" for a regular chain
	Hook     uint32 // unix.NF_INET_*
	Priority int32
	Policy   uint32 // nfAccept; 0 for a regular chain
	Rules    []nftRule
}

// nftRule is one rule: its expressions, each as the kernel takes them
// (NFTA_EXPR_NAME, NFTA_EXPR_DATA), and its userdata (nft's comment).
type nftRule struct {
	Exprs    [][]byte
	UserData []byte
}

const nfAccept = 1 // NF_ACCEPT, linux/netfilter.h

// table is the NFTable of n.
func (n NAT) table() *NFTable {
	chains := n.ruleset()
	return &NFTable{chains: chains, canon: canonical(0, uint32(len(chains)), chains), Forwarding: true}
}

// ruleset is the table for n, chains in the order they are created.
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
	base := func(name, typ string, hook uint32, priority int32) nftChain {
		return nftChain{Name: name, Type: typ, Hook: hook, Priority: priority, Policy: nfAccept}
	}
	egress := n.Egress
	zones := base(natChainZones, "filter", unix.NF_INET_PRE_ROUTING, -300)
	restore := base(natChainRestoreMark, "filter", unix.NF_INET_PRE_ROUTING, -150)
	forward := base(natChainForward, "filter", unix.NF_INET_FORWARD, 0)
	snat := base(natChainSNAT, "nat", unix.NF_INET_POST_ROUTING, 100)
	var admits []nftChain
	var jumps []nftRule
	sources := map[int]bool{}
	for _, s := range n.Sources {
		sources[s.Link.Index] = true
		zones.Rules = append(zones.Rules, natRule(s.Link.Name+": conntrack zone of its clients", func(b *ruleBuilder) {
			b.nfprotoIPv4()
			b.link(expr.MetaKeyIIF, s.Link)
			b.setZoneOriginal(s.Zone)
		}))
		restore.Rules = append(restore.Rules, natRule(s.Link.Name+": replies route through its table", func(b *ruleBuilder) {
			b.link(expr.MetaKeyIIF, egress)
			b.ctDirection(1)
			b.ctMarkIs(s.Mark)
			b.setMark(false, s.Mark)
		}))
		forward.Rules = append(forward.Rules, natRule(s.Link.Name+": NAT traffic out", func(b *ruleBuilder) {
			b.link(expr.MetaKeyIIF, s.Link)
			b.link(expr.MetaKeyOIF, egress)
			b.ctDirection(0)
			b.ctMarkIs(s.Mark)
			b.verdict(expr.VerdictAccept, "")
		}), natRule(s.Link.Name+": NAT replies in", func(b *ruleBuilder) {
			b.link(expr.MetaKeyIIF, egress)
			b.link(expr.MetaKeyOIF, s.Link)
			b.ctDirection(1)
			b.ctMarkIs(s.Mark)
			b.verdict(expr.VerdictAccept, "")
		}))
		admit := n.admitChain(s)
		admits = append(admits, admit)
		// New connections after the established ones: most packets stop
		// at the first rules.
		jumps = append(jumps, natRule(s.Link.Name+": new NAT connections", func(b *ruleBuilder) {
			b.link(expr.MetaKeyIIF, s.Link)
			b.link(expr.MetaKeyOIF, egress)
			b.ctBits(expr.CtKeySTATE, expr.CtStateBitNEW)
			b.verdict(expr.VerdictJump, admit.Name)
		}))
		snat.Rules = append(snat.Rules, natRule(s.Link.Name+": masquerade to the egress", func(b *ruleBuilder) {
			b.link(expr.MetaKeyOIF, egress)
			b.ctMarkIs(s.Mark)
			a := n.EgressAddr.As4()
			b.add(&expr.Immediate{Register: natReg, Data: a[:]},
				&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: natReg, RegAddrMax: natReg})
		}))
	}
	forward.Rules = append(forward.Rules, jumps...)
	toENIs := nftChain{Name: natChainToENIs}
	for _, l := range n.ENIs {
		target, comment := natChainToENIs, "from an ENI"
		if sources[l.Index] {
			target, comment = natChainFromSource, "from a NAT source"
		}
		forward.Rules = append(forward.Rules, natRule(comment, func(b *ruleBuilder) {
			b.link(expr.MetaKeyIIF, l)
			b.verdict(expr.VerdictJump, target)
		}))
		toENIs.Rules = append(toENIs.Rules, natRule("between two ENIs", func(b *ruleBuilder) {
			b.link(expr.MetaKeyOIF, l)
			b.add(&expr.Counter{})
			b.verdict(expr.VerdictDrop, "")
		}))
	}
	// Every chain is created before any rule, so jumps find their target;
	// `nft list` shows them in this order.
	return slices.Concat([]nftChain{zones, restore, forward}, admits, []nftChain{toENIs, fromSourceChain(), snat})
}

// natRule is one rule of the table, built by build, with its comment.
func natRule(comment string, build func(b *ruleBuilder)) nftRule {
	b := &ruleBuilder{}
	build(b)
	r := nftRule{Exprs: b.exprs}
	if comment != "" {
		r.UserData = userdata.AppendString(nil, userdata.TypeComment, comment)
	}
	return r
}

// admitChain is admit_<link> of source s: a new connection is dropped
// towards a forbidden destination, marked from an allowed source, dropped
// from any other.
func (n NAT) admitChain(s NATSource) nftChain {
	admit := nftChain{Name: natChainAdmitPrefix + s.Link.Name}
	for _, f := range n.Forbidden {
		admit.Rules = append(admit.Rules, natRule("forbidden destination", func(b *ruleBuilder) {
			b.ipAddr(16, f)
			b.add(&expr.Counter{})
			b.verdict(expr.VerdictDrop, "")
		}))
	}
	for _, a := range s.Allowed {
		admit.Rules = append(admit.Rules, natRule(natCommentAllowed, func(b *ruleBuilder) {
			b.ipAddr(12, a)
			b.add(&expr.Counter{})
			b.setMark(true, s.Mark)
			b.verdict(expr.VerdictAccept, "")
		}))
	}
	admit.Rules = append(admit.Rules, natRule("source not allowed", func(b *ruleBuilder) {
		b.add(&expr.Counter{})
		b.verdict(expr.VerdictDrop, "")
	}))
	return admit
}

// fromSourceChain is from_source: a source's traffic to another ENI is
// dropped (to_enis); to a link that is not an ENI only replies and what
// another program's DNAT published pass.
func fromSourceChain() nftChain {
	return nftChain{Name: natChainFromSource, Rules: []nftRule{
		natRule("", func(b *ruleBuilder) { b.verdict(expr.VerdictJump, natChainToENIs) }),
		natRule("replies of connections into the VPC", func(b *ruleBuilder) {
			b.ctDirection(1)
			b.verdict(expr.VerdictAccept, "")
		}),
		natRule("published by another program's DNAT", func(b *ruleBuilder) {
			b.ctBits(expr.CtKeySTATUS, 1<<5) // IPS_DST_NAT, as Docker's published ports
			b.verdict(expr.VerdictAccept, "")
		}),
		natRule("a source VPC routes through the instance", func(b *ruleBuilder) {
			b.add(&expr.Counter{})
			b.verdict(expr.VerdictDrop, "")
		}),
	}}
}

// ruleBuilder encodes a rule's expressions with google/nftables/expr, all in
// register 1.
type ruleBuilder struct{ exprs [][]byte }

const natReg = unix.NFT_REG_1

func (b *ruleBuilder) add(es ...expr.Any) {
	for _, e := range es {
		enc, err := expr.Marshal(unix.NFPROTO_INET, e)
		if err != nil {
			// Every expression here is a fixed shape the library always
			// encodes: an error is a programming error.
			panic(fmt.Sprintf("encoding nftables expression %T: %v", e, err))
		}
		b.exprs = append(b.exprs, enc)
	}
}

// link is `iif <link>` or `oif <link>` (key): by index, so that a link
// renamed or replaced never inherits the rule.
func (b *ruleBuilder) link(key expr.MetaKey, l Link) {
	b.add(&expr.Meta{Key: key, Register: natReg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: binaryutil.NativeEndian.PutUint32(uint32(l.Index))})
}

// nfprotoIPv4 is `meta nfproto ipv4`.
func (b *ruleBuilder) nfprotoIPv4() {
	b.add(&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: natReg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: []byte{unix.NFPROTO_IPV4}})
}

// ipAddr is `ip saddr <p>` (offset 12) or `ip daddr <p>` (16), with the
// `meta nfproto ipv4` it needs in an inet table.
func (b *ruleBuilder) ipAddr(offset uint32, p netip.Prefix) {
	b.nfprotoIPv4()
	b.add(&expr.Payload{DestRegister: natReg, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4})
	if p.Bits() < 32 {
		b.add(&expr.Bitwise{SourceRegister: natReg, DestRegister: natReg, Len: 4,
			Mask: binary.BigEndian.AppendUint32(nil, ^uint32(0)<<(32-p.Bits())), Xor: make([]byte, 4)})
	}
	a := p.Addr().As4()
	b.add(&expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: a[:]})
}

// ctDirection is `ct direction original` (0) or `ct direction reply` (1).
func (b *ruleBuilder) ctDirection(dir byte) {
	b.add(&expr.Ct{Key: expr.CtKeyDIRECTION, Register: natReg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: []byte{dir}})
}

// ctBits is `ct state new` or `ct status dnat`: any of bits set in key.
func (b *ruleBuilder) ctBits(key expr.CtKey, bits uint32) {
	b.add(&expr.Ct{Key: key, Register: natReg},
		&expr.Bitwise{SourceRegister: natReg, DestRegister: natReg, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bits), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: natReg, Data: make([]byte, 4)})
}

// ctMarkIs is `ct mark & NATMarkMask == mark`.
func (b *ruleBuilder) ctMarkIs(mark uint32) {
	b.add(&expr.Ct{Key: expr.CtKeyMARK, Register: natReg},
		&expr.Bitwise{SourceRegister: natReg, DestRegister: natReg, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(NATMarkMask), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: binaryutil.NativeEndian.PutUint32(mark)})
}

// setMark is `ct mark set ct mark & ~NATMarkMask | mark` (ct) or the same
// for `meta mark`: our field set to mark, every other bit kept.
func (b *ruleBuilder) setMark(ct bool, mark uint32) {
	keep := &expr.Bitwise{SourceRegister: natReg, DestRegister: natReg, Len: 4,
		Mask: binaryutil.NativeEndian.PutUint32(^NATMarkMask), Xor: binaryutil.NativeEndian.PutUint32(mark)}
	if ct {
		b.add(&expr.Ct{Key: expr.CtKeyMARK, Register: natReg}, keep, &expr.Ct{Key: expr.CtKeyMARK, Register: natReg, SourceRegister: true})
	} else {
		b.add(&expr.Meta{Key: expr.MetaKeyMARK, Register: natReg}, keep, &expr.Meta{Key: expr.MetaKeyMARK, Register: natReg, SourceRegister: true})
	}
}

// setZoneOriginal is `ct original zone set <zone>`. google/nftables v0.3.0
// cannot encode it: its Ct sends NFTA_CT_DIRECTION only for address and port
// keys (google/nftables pull request 364), and without a direction the zone
// applies to replies too, which then miss their connection. So this one
// expression is encoded here, as the kernel dumps it (nft_ct_set_dump):
// key, source register, direction as u8.
func (b *ruleBuilder) setZoneOriginal(zone uint16) {
	b.add(&expr.Immediate{Register: natReg, Data: binaryutil.NativeEndian.PutUint16(zone)})
	b.exprs = append(b.exprs, mustAttrs(
		netlink.Attribute{Type: unix.NFTA_EXPR_NAME, Data: []byte("ct\x00")},
		netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_EXPR_DATA, Data: mustAttrs(
			netlink.Attribute{Type: unix.NFTA_CT_KEY, Data: be32(unix.NFT_CT_ZONE)},
			netlink.Attribute{Type: unix.NFTA_CT_SREG, Data: be32(natReg)},
			netlink.Attribute{Type: unix.NFTA_CT_DIRECTION, Data: []byte{0}}, // IP_CT_DIR_ORIGINAL
		)}))
}

// verdict is accept, drop or `jump <chain>`.
func (b *ruleBuilder) verdict(kind expr.VerdictKind, chain string) {
	b.add(&expr.Verdict{Kind: kind, Chain: chain})
}

// canonical is the table in a form in which our encoding and the kernel's
// dump of the same table are equal strings: its flags and object count
// (chains, sets...), then each chain's kind and rules, userdata and
// expressions (appendCanonicalExpr).
func canonical(flags, use uint32, chains []nftChain) string {
	b := fmt.Appendf(nil, "flags %d use %d\n", flags, use)
	for _, c := range chains {
		b = fmt.Appendf(b, "chain %q %q %d %d %d\n", c.Name, c.Type, c.Hook, c.Priority, c.Policy)
		for _, r := range c.Rules {
			b = fmt.Appendf(b, "rule %q", r.UserData)
			for _, e := range r.Exprs {
				b = appendCanonicalExpr(append(b, ' '), e)
			}
			b = append(b, '\n')
		}
	}
	return string(b)
}

// appendCanonicalExpr appends one expression (NFTA_EXPR_NAME and
// NFTA_EXPR_DATA) in a form in which our encoding and the kernel's dump of
// it are equal bytes: attributes sorted by type, without NLA_F_NESTED
// (which dumps omit), nested ones in the same form, a counter's values left
// out, and the attributes the kernel adds with their default values
// (natExprDefaults) present on both sides. Malformed bytes are kept as they
// are: they equal nothing we want.
func appendCanonicalExpr(dst, b []byte) []byte {
	name, data, ok := splitExpr(b)
	if !ok {
		return append(dst, b...)
	}
	dst = append(append(dst, name...), 0)
	if name == "counter" {
		return dst // its values change with traffic
	}
	return appendCanonicalAttrs(dst, name, data, 0)
}

// natNestedAttrs lists, per expression, the attributes of its data that are
// nested (struct nft_data: a value, or a verdict holding a code and a chain).
var natNestedAttrs = map[string][]uint16{
	"cmp":       {unix.NFTA_CMP_DATA},
	"bitwise":   {unix.NFTA_BITWISE_MASK, unix.NFTA_BITWISE_XOR},
	"immediate": {unix.NFTA_IMMEDIATE_DATA},
}

// natExprDefaults are attributes the kernel dumps although we do not send
// them, with the value it then uses: expression -> type -> value. A nat
// expression with an address register gets NF_NAT_RANGE_MAP_IPS (1) in its
// flags (nft_nat_init), and every nat expression here has one; a bitwise
// one is NFT_BITWISE_BOOL (0) unless told.
var natExprDefaults = map[string]map[uint16][]byte{
	"bitwise": {6 /* NFTA_BITWISE_OP */ : be32(0)},
	"nat":     {unix.NFTA_NAT_FLAGS: be32(1)},
}

// appendCanonicalAttrs appends the attributes of b (the data of expression
// name at nesting depth) in canonical form: type, then the length and value,
// or the length of the nested attributes and them.
func appendCanonicalAttrs(dst []byte, name string, b []byte, depth int) []byte {
	type attr struct {
		typ uint16
		val []byte
	}
	var attrs []attr
	if !forEachAttr(b, func(typ uint16, v []byte) { attrs = append(attrs, attr{typ, v}) }) {
		return append(dst, b...)
	}
	for typ, v := range natExprDefaults[name] {
		if depth == 0 && !slices.ContainsFunc(attrs, func(a attr) bool { return a.typ == typ }) {
			attrs = append(attrs, attr{typ, v})
		}
	}
	slices.SortStableFunc(attrs, func(a, b attr) int { return int(a.typ) - int(b.typ) })
	for _, a := range attrs {
		dst = binary.BigEndian.AppendUint16(dst, a.typ)
		if depth == 0 && slices.Contains(natNestedAttrs[name], a.typ) || depth == 1 && a.typ == unix.NFTA_DATA_VERDICT {
			at := len(dst)
			dst = appendCanonicalAttrs(append(dst, 0, 0, 0, 0), name, a.val, depth+1)
			binary.BigEndian.PutUint32(dst[at:], uint32(len(dst)-at-4))
		} else {
			dst = append(binary.BigEndian.AppendUint32(dst, uint32(len(a.val))), a.val...)
		}
	}
	return dst
}

// splitExpr is an expression's name and data (NFTA_EXPR_NAME and
// NFTA_EXPR_DATA); ok is false for malformed bytes.
func splitExpr(b []byte) (name string, data []byte, ok bool) {
	ok = forEachAttr(b, func(typ uint16, v []byte) {
		switch typ {
		case unix.NFTA_EXPR_NAME:
			name = unix.ByteSliceToString(v)
		case unix.NFTA_EXPR_DATA:
			data = v
		}
	})
	return name, data, ok
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// mustAttrs encodes attributes of the fixed shapes above, which always encode.
func mustAttrs(attrs ...netlink.Attribute) []byte {
	b, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		panic(fmt.Sprintf("encoding netlink attributes: %v", err))
	}
	return b
}
