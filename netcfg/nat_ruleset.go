package netcfg

// The shared NAT's nftables table `inet dualhomed`, pure: the ruleset a NAT
// wants, and the canonical form in which Observe's read of the table and
// Desired's table compare. Kernel I/O is in nat_kernel.go.

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"

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

// table is the NFTable of n: its chains in the order they are created, and
// ip_forward on.
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
func (n NAT) table() *NFTable {
	base := func(name, typ string, hook uint32, priority int32) nftChain {
		return nftChain{Name: name, Type: typ, Hook: hook, Priority: priority, Policy: nfAccept}
	}
	egressAddr := n.EgressAddr.As4()
	zones := base(natChainZones, "filter", unix.NF_INET_PRE_ROUTING, -300)
	restore := base(natChainRestoreMark, "filter", unix.NF_INET_PRE_ROUTING, -150)
	forward := base(natChainForward, "filter", unix.NF_INET_FORWARD, 0)
	snat := base(natChainSNAT, "nat", unix.NF_INET_POST_ROUTING, 100)
	var admits []nftChain
	var jumps []nftRule
	for _, s := range n.Sources {
		name := s.Link.Name
		zones.Rules = append(zones.Rules, natRule(name+": conntrack zone of its clients",
			nfprotoIPv4(), iif(s.Link), setZoneOriginal(s.Zone)))
		restore.Rules = append(restore.Rules, natRule(name+": replies route through its table",
			iif(n.Egress), ctDirection(1), ctMarkIs(s.Mark), setMark(false, s.Mark)))
		forward.Rules = append(forward.Rules,
			natRule(name+": NAT traffic out", iif(s.Link), oif(n.Egress), ctDirection(0), ctMarkIs(s.Mark), accept()),
			natRule(name+": NAT replies in", iif(n.Egress), oif(s.Link), ctDirection(1), ctMarkIs(s.Mark), accept()))
		admit := nftChain{Name: natChainAdmitPrefix + name}
		for _, f := range n.Forbidden {
			admit.Rules = append(admit.Rules, natRule("forbidden destination", ipAddr(16, f), countedDrop()))
		}
		for _, a := range s.Allowed {
			admit.Rules = append(admit.Rules, natRule(natCommentAllowed, ipAddr(12, a), natExprs(&expr.Counter{}), setMark(true, s.Mark), accept()))
		}
		admit.Rules = append(admit.Rules, natRule("source not allowed", countedDrop()))
		admits = append(admits, admit)
		// New connections after the established ones: most packets stop
		// at the first rules.
		jumps = append(jumps, natRule(name+": new NAT connections",
			iif(s.Link), oif(n.Egress), ctBits(expr.CtKeySTATE, expr.CtStateBitNEW), jump(admit.Name)))
		snat.Rules = append(snat.Rules, natRule(name+": masquerade to the egress", oif(n.Egress), ctMarkIs(s.Mark),
			natExprs(&expr.Immediate{Register: natReg, Data: egressAddr[:]},
				&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: natReg, RegAddrMax: natReg})))
	}
	forward.Rules = append(forward.Rules, jumps...)
	toENIs := nftChain{Name: natChainToENIs}
	for _, l := range n.ENIs {
		target, comment := natChainToENIs, "from an ENI"
		if slices.ContainsFunc(n.Sources, func(s NATSource) bool { return s.Link.Index == l.Index }) {
			target, comment = natChainFromSource, "from a NAT source"
		}
		forward.Rules = append(forward.Rules, natRule(comment, iif(l), jump(target)))
		toENIs.Rules = append(toENIs.Rules, natRule("between two ENIs", oif(l), countedDrop()))
	}
	fromSource := nftChain{Name: natChainFromSource, Rules: []nftRule{
		natRule("", jump(natChainToENIs)),
		natRule("replies of connections into the VPC", ctDirection(1), accept()),
		natRule("published by another program's DNAT", ctBits(expr.CtKeySTATUS, 1<<5), accept()), // IPS_DST_NAT, as Docker's published ports
		natRule("a source VPC routes through the instance", countedDrop()),
	}}
	// Every chain is created before any rule, so jumps find their target;
	// `nft list` shows them in this order.
	chains := slices.Concat([]nftChain{zones, restore, forward}, admits, []nftChain{toENIs, fromSource, snat})
	return &NFTable{chains: chains, canon: canonical(0, uint32(len(chains)), chains), Forwarding: true}
}

// natRule is one rule of the table: the expressions of parts, in order, and
// its comment.
func natRule(comment string, parts ...[][]byte) nftRule {
	r := nftRule{Exprs: slices.Concat(parts...)}
	if comment != "" {
		r.UserData = userdata.AppendString(nil, userdata.TypeComment, comment)
	}
	return r
}

// The parts of a rule below are encoded with google/nftables/expr, all in
// register 1.
const natReg = unix.NFT_REG_1

// natExprs encodes es.
func natExprs(es ...expr.Any) [][]byte {
	var exprs [][]byte
	for _, e := range es {
		enc, err := expr.Marshal(unix.NFPROTO_INET, e)
		if err != nil {
			// Every expression here is a fixed shape the library always
			// encodes: an error is a programming error.
			panic(fmt.Sprintf("encoding nftables expression %T: %v", e, err))
		}
		exprs = append(exprs, enc)
	}
	return exprs
}

// regIs compares the register with data.
func regIs(data []byte) *expr.Cmp {
	return &expr.Cmp{Op: expr.CmpOpEq, Register: natReg, Data: data}
}

// bitwise sets the register to register & mask ^ xor.
func bitwise(mask, xor []byte) *expr.Bitwise {
	return &expr.Bitwise{SourceRegister: natReg, DestRegister: natReg, Len: 4, Mask: mask, Xor: xor}
}

// metaIs is `meta <key> <data>`.
func metaIs(key expr.MetaKey, data []byte) [][]byte {
	return natExprs(&expr.Meta{Key: key, Register: natReg}, regIs(data))
}

// iif and oif are `iif <link>` and `oif <link>`: by index, so that a link
// renamed or replaced never inherits the rule.
func iif(l Link) [][]byte { return metaIs(expr.MetaKeyIIF, ne32(uint32(l.Index))) }
func oif(l Link) [][]byte { return metaIs(expr.MetaKeyOIF, ne32(uint32(l.Index))) }

// nfprotoIPv4 is `meta nfproto ipv4`.
func nfprotoIPv4() [][]byte { return metaIs(expr.MetaKeyNFPROTO, []byte{unix.NFPROTO_IPV4}) }

// ipAddr is `ip saddr <p>` (offset 12) or `ip daddr <p>` (16), with the
// `meta nfproto ipv4` it needs in an inet table.
func ipAddr(offset uint32, p netip.Prefix) [][]byte {
	es := []expr.Any{&expr.Payload{DestRegister: natReg, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4}}
	if p.Bits() < 32 {
		es = append(es, bitwise(net.CIDRMask(p.Bits(), 32), make([]byte, 4)))
	}
	a := p.Addr().As4()
	return append(nfprotoIPv4(), natExprs(append(es, regIs(a[:]))...)...)
}

// ctDirection is `ct direction original` (0) or `ct direction reply` (1).
func ctDirection(dir byte) [][]byte {
	return natExprs(&expr.Ct{Key: expr.CtKeyDIRECTION, Register: natReg}, regIs([]byte{dir}))
}

// ctBits is `ct state new` or `ct status dnat`: any of bits set in key.
func ctBits(key expr.CtKey, bits uint32) [][]byte {
	return natExprs(&expr.Ct{Key: key, Register: natReg}, bitwise(ne32(bits), make([]byte, 4)),
		&expr.Cmp{Op: expr.CmpOpNeq, Register: natReg, Data: make([]byte, 4)})
}

// ctMarkIs is `ct mark & NATMarkMask == mark`.
func ctMarkIs(mark uint32) [][]byte {
	return natExprs(&expr.Ct{Key: expr.CtKeyMARK, Register: natReg}, bitwise(ne32(NATMarkMask), make([]byte, 4)), regIs(ne32(mark)))
}

// setMark is `ct mark set ct mark & ~NATMarkMask | mark` (ct) or the same
// for `meta mark`: our field set to mark, every other bit kept.
func setMark(ct bool, mark uint32) [][]byte {
	keep := bitwise(ne32(^NATMarkMask), ne32(mark))
	if ct {
		return natExprs(&expr.Ct{Key: expr.CtKeyMARK, Register: natReg}, keep, &expr.Ct{Key: expr.CtKeyMARK, Register: natReg, SourceRegister: true})
	}
	return natExprs(&expr.Meta{Key: expr.MetaKeyMARK, Register: natReg}, keep, &expr.Meta{Key: expr.MetaKeyMARK, Register: natReg, SourceRegister: true})
}

// setZoneOriginal is `ct original zone set <zone>`. google/nftables v0.3.0
// cannot encode it: its Ct sends NFTA_CT_DIRECTION only for address and port
// keys (google/nftables pull request 364), and without a direction the zone
// applies to replies too, which then miss their connection. So this one
// expression is encoded here, as the kernel dumps it (nft_ct_set_dump):
// key, source register, direction as u8.
func setZoneOriginal(zone uint16) [][]byte {
	return append(natExprs(&expr.Immediate{Register: natReg, Data: binary.NativeEndian.AppendUint16(nil, zone)}), mustAttrs(
		netlink.Attribute{Type: unix.NFTA_EXPR_NAME, Data: []byte("ct\x00")},
		netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_EXPR_DATA, Data: mustAttrs(
			netlink.Attribute{Type: unix.NFTA_CT_KEY, Data: be32(unix.NFT_CT_ZONE)},
			netlink.Attribute{Type: unix.NFTA_CT_SREG, Data: be32(natReg)},
			netlink.Attribute{Type: unix.NFTA_CT_DIRECTION, Data: []byte{0}}, // IP_CT_DIR_ORIGINAL
		)}))
}

// accept, countedDrop and jump are the verdicts of the table's rules; every
// drop is counted (NATCounters).
func accept() [][]byte      { return natExprs(&expr.Verdict{Kind: expr.VerdictAccept}) }
func countedDrop() [][]byte { return natExprs(&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}) }
func jump(chain string) [][]byte {
	return natExprs(&expr.Verdict{Kind: expr.VerdictJump, Chain: chain})
}

// canonical is the table in a form in which our encoding and the kernel's
// dump of the same table are equal strings: its flags and object count
// (chains, sets...), then each chain's kind and rules, userdata and
// expressions. An expression (NFTA_EXPR_NAME and NFTA_EXPR_DATA) is its name
// and its attributes (appendCanonicalAttrs), none for a counter, whose values
// change with traffic. Malformed bytes are kept as they are: they equal
// nothing we want.
func canonical(flags, use uint32, chains []nftChain) string {
	b := fmt.Appendf(nil, "flags %d use %d\n", flags, use)
	for _, c := range chains {
		b = fmt.Appendf(b, "chain %q %q %d %d %d\n", c.Name, c.Type, c.Hook, c.Priority, c.Policy)
		for _, r := range c.Rules {
			b = fmt.Appendf(b, "rule %q", r.UserData)
			for _, e := range r.Exprs {
				name, data, ok := splitExpr(e)
				if !ok {
					b = append(append(b, ' '), e...)
					continue
				}
				if name == "counter" {
					data = nil
				}
				b = appendCanonicalAttrs(fmt.Appendf(b, " %s\x00", name), name, data, 0)
			}
			b = append(b, '\n')
		}
	}
	return string(b)
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
// name at nesting depth) in canonical form, equal bytes for our encoding and
// the kernel's dump: sorted by type, each its type, then its length and
// value, or the length of its nested attributes and them, without
// NLA_F_NESTED (which dumps omit); the attributes the kernel adds with their
// default values (natExprDefaults) are present on both sides.
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
func ne32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

// mustAttrs encodes attributes of the fixed shapes above, which always encode.
func mustAttrs(attrs ...netlink.Attribute) []byte {
	b, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		panic(fmt.Sprintf("encoding netlink attributes: %v", err))
	}
	return b
}
