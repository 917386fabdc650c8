package netcfg

// The shared NAT's nftables table `inet dualhomed`: the ruleset a NAT wants
// (pure), its canonical form, Observe's read of it, the transaction Apply
// writes, and its counters.
//
// google/nftables encodes the expressions; the messages are built here on
// mdlayher/netlink, because google/nftables v0.3.0 cannot encode `ct
// original zone set` (see setZoneOriginal) and its Conn cannot carry an
// expression of ours in the one batch that makes a change atomic. Every
// request names our table: dualhomed never lists, reads or changes another.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

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
	rule := func(comment string, build func(b *ruleBuilder)) nftRule {
		b := &ruleBuilder{}
		build(b)
		r := nftRule{Exprs: b.exprs}
		if comment != "" {
			r.UserData = userdata.AppendString(nil, userdata.TypeComment, comment)
		}
		return r
	}
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
		zones.Rules = append(zones.Rules, rule(s.Link.Name+": conntrack zone of its clients", func(b *ruleBuilder) {
			b.nfprotoIPv4()
			b.link(expr.MetaKeyIIF, s.Link)
			b.setZoneOriginal(s.Zone)
		}))
		restore.Rules = append(restore.Rules, rule(s.Link.Name+": replies route through its table", func(b *ruleBuilder) {
			b.link(expr.MetaKeyIIF, egress)
			b.ctDirection(1)
			b.ctMarkIs(s.Mark)
			b.setMark(false, s.Mark)
		}))
		forward.Rules = append(forward.Rules, rule(s.Link.Name+": NAT traffic out", func(b *ruleBuilder) {
			b.link(expr.MetaKeyIIF, s.Link)
			b.link(expr.MetaKeyOIF, egress)
			b.ctDirection(0)
			b.ctMarkIs(s.Mark)
			b.verdict(expr.VerdictAccept, "")
		}), rule(s.Link.Name+": NAT replies in", func(b *ruleBuilder) {
			b.link(expr.MetaKeyIIF, egress)
			b.link(expr.MetaKeyOIF, s.Link)
			b.ctDirection(1)
			b.ctMarkIs(s.Mark)
			b.verdict(expr.VerdictAccept, "")
		}))
		admit := nftChain{Name: natChainAdmitPrefix + s.Link.Name}
		for _, f := range n.Forbidden {
			admit.Rules = append(admit.Rules, rule("forbidden destination", func(b *ruleBuilder) {
				b.ipAddr(16, f)
				b.add(&expr.Counter{})
				b.verdict(expr.VerdictDrop, "")
			}))
		}
		for _, a := range s.Allowed {
			admit.Rules = append(admit.Rules, rule(natCommentAllowed, func(b *ruleBuilder) {
				b.ipAddr(12, a)
				b.add(&expr.Counter{})
				b.setMark(true, s.Mark)
				b.verdict(expr.VerdictAccept, "")
			}))
		}
		admit.Rules = append(admit.Rules, rule("source not allowed", func(b *ruleBuilder) {
			b.add(&expr.Counter{})
			b.verdict(expr.VerdictDrop, "")
		}))
		admits = append(admits, admit)
		// New connections after the established ones: most packets stop
		// at the first rules.
		jumps = append(jumps, rule(s.Link.Name+": new NAT connections", func(b *ruleBuilder) {
			b.link(expr.MetaKeyIIF, s.Link)
			b.link(expr.MetaKeyOIF, egress)
			b.ctBits(expr.CtKeySTATE, expr.CtStateBitNEW)
			b.verdict(expr.VerdictJump, admit.Name)
		}))
		snat.Rules = append(snat.Rules, rule(s.Link.Name+": masquerade to the egress", func(b *ruleBuilder) {
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
		forward.Rules = append(forward.Rules, rule(comment, func(b *ruleBuilder) {
			b.link(expr.MetaKeyIIF, l)
			b.verdict(expr.VerdictJump, target)
		}))
		toENIs.Rules = append(toENIs.Rules, rule("between two ENIs", func(b *ruleBuilder) {
			b.link(expr.MetaKeyOIF, l)
			b.add(&expr.Counter{})
			b.verdict(expr.VerdictDrop, "")
		}))
	}
	fromSource := nftChain{Name: natChainFromSource, Rules: []nftRule{
		rule("", func(b *ruleBuilder) { b.verdict(expr.VerdictJump, natChainToENIs) }),
		rule("replies of connections into the VPC", func(b *ruleBuilder) {
			b.ctDirection(1)
			b.verdict(expr.VerdictAccept, "")
		}),
		rule("published by another program's DNAT", func(b *ruleBuilder) {
			b.ctBits(expr.CtKeySTATUS, 1<<5) // IPS_DST_NAT, as Docker's published ports
			b.verdict(expr.VerdictAccept, "")
		}),
		rule("a source VPC routes through the instance", func(b *ruleBuilder) {
			b.add(&expr.Counter{})
			b.verdict(expr.VerdictDrop, "")
		}),
	}}
	// Every chain is created before any rule, so jumps find their target;
	// `nft list` shows them in this order.
	return slices.Concat([]nftChain{zones, restore, forward}, admits, []nftChain{toENIs, fromSource, snat})
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
	var name string
	var data []byte
	if !forEachAttr(b, func(typ uint16, v []byte) {
		switch typ {
		case unix.NFTA_EXPR_NAME:
			name = string(bytes.TrimRight(v, "\x00"))
		case unix.NFTA_EXPR_DATA:
			data = v
		}
	}) {
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

// readNAT reads our table and ip_forward for Observe: nil when there is
// neither a table nor a recorded ip_forward original. It asks for our
// table, our rules and each chain of ours by name.
func (k *Kernel) readNAT() (*NFTable, error) {
	orig, err := k.originals(ipForwardStateFile)
	if err != nil {
		return nil, err
	}
	t := &NFTable{}
	if _, recorded := orig[ipForwardKey]; recorded {
		v, err := readSysctl(k.ns, ipForwardPath)
		if err != nil {
			return nil, err
		}
		t.Forwarding = v == 1
	}
	msgs, err := k.nftGet(unix.NFT_MSG_GETTABLE, false, netlink.Attribute{Type: unix.NFTA_TABLE_NAME, Data: []byte(NATTableName + "\x00")})
	if errors.Is(err, unix.ENOENT) {
		if len(orig) == 0 {
			return nil, nil
		}
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading nftables table inet %s: %w", NATTableName, err)
	}
	var flags, use uint32
	for _, m := range msgs {
		nftAttrs(m, func(typ uint16, v []byte) {
			switch typ {
			case unix.NFTA_TABLE_FLAGS:
				flags = beU32(v)
			case unix.NFTA_TABLE_USE:
				use = beU32(v)
			}
		})
	}
	chains, err := k.nftRules()
	if err != nil {
		return nil, err
	}
	for i := range chains {
		c := &chains[i]
		msgs, err := k.nftGet(unix.NFT_MSG_GETCHAIN, false, netlink.Attribute{Type: unix.NFTA_CHAIN_TABLE, Data: []byte(NATTableName + "\x00")},
			netlink.Attribute{Type: unix.NFTA_CHAIN_NAME, Data: []byte(c.Name + "\x00")})
		if err != nil && !errors.Is(err, unix.ENOENT) { // gone since: the table differs
			return nil, fmt.Errorf("reading chain %s of table inet %s: %w", c.Name, NATTableName, err)
		}
		for _, m := range msgs {
			nftAttrs(m, func(typ uint16, v []byte) {
				switch typ {
				case unix.NFTA_CHAIN_TYPE:
					c.Type = unix.ByteSliceToString(v)
				case unix.NFTA_CHAIN_POLICY:
					c.Policy = beU32(v)
				case unix.NFTA_CHAIN_HOOK:
					forEachAttr(v, func(typ uint16, v []byte) {
						switch typ {
						case unix.NFTA_HOOK_HOOKNUM:
							c.Hook = beU32(v)
						case unix.NFTA_HOOK_PRIORITY:
							c.Priority = int32(beU32(v))
						}
					})
				}
			})
		}
	}
	t.canon = canonical(flags, use, chains)
	return t, nil
}

// nftRules dumps the rules of our table by chain, in the kernel's order
// (the chains' creation order); none without the table.
func (k *Kernel) nftRules() ([]nftChain, error) {
	msgs, err := k.nftGet(unix.NFT_MSG_GETRULE, true, netlink.Attribute{Type: unix.NFTA_RULE_TABLE, Data: []byte(NATTableName + "\x00")})
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the rules of table inet %s: %w", NATTableName, err)
	}
	var chains []nftChain
	for _, m := range msgs {
		var chain string
		var r nftRule
		nftAttrs(m, func(typ uint16, v []byte) {
			switch typ {
			case unix.NFTA_RULE_CHAIN:
				chain = unix.ByteSliceToString(v)
			case unix.NFTA_RULE_EXPRESSIONS:
				forEachAttr(v, func(_ uint16, e []byte) { r.Exprs = append(r.Exprs, slices.Clone(e)) })
			case unix.NFTA_RULE_USERDATA:
				r.UserData = slices.Clone(v)
			}
		})
		if len(chains) == 0 || chains[len(chains)-1].Name != chain {
			chains = append(chains, nftChain{Name: chain})
		}
		chains[len(chains)-1].Rules = append(chains[len(chains)-1].Rules, r)
	}
	return chains, nil
}

// applyNAT makes our table and ip_forward what op says, and returns the
// writes it made. The table changes in one nftables transaction, which the
// kernel applies all of or none of, so no packet ever meets a half-built
// table and a process killed around it leaves the old table or the new.
// Make before break: the table is in place before forwarding is turned on;
// forwarding is back to its recorded original before the table goes.
func (k *Kernel) applyNAT(op Op) (int, error) {
	del := nftMsg(unix.NFT_MSG_DELTABLE, 0, netlink.Attribute{Type: unix.NFTA_TABLE_NAME, Data: []byte(NATTableName + "\x00")})
	if op.Delete {
		writes, err := k.restoreSysctl(k.ipForward())
		if err != nil {
			return writes, err
		}
		if err := k.sendNFT([]netlink.Message{del}); err != nil && !errors.Is(err, unix.ENOENT) {
			return writes + 1, fmt.Errorf("deleting nftables table inet %s: %w", NATTableName, err)
		}
		return writes + 1, nil
	}
	// `add table; delete table; add table ...`: whatever table was there
	// goes, in the same transaction.
	table := nftMsg(unix.NFT_MSG_NEWTABLE, netlink.Create, netlink.Attribute{Type: unix.NFTA_TABLE_NAME, Data: []byte(NATTableName + "\x00")})
	msgs := []netlink.Message{table, del, table}
	for _, c := range op.NAT.chains {
		attrs := []netlink.Attribute{{Type: unix.NFTA_CHAIN_TABLE, Data: []byte(NATTableName + "\x00")}, {Type: unix.NFTA_CHAIN_NAME, Data: []byte(c.Name + "\x00")}}
		if c.Type != "" {
			attrs = append(attrs,
				netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_CHAIN_HOOK, Data: mustAttrs(
					netlink.Attribute{Type: unix.NFTA_HOOK_HOOKNUM, Data: be32(c.Hook)},
					netlink.Attribute{Type: unix.NFTA_HOOK_PRIORITY, Data: be32(uint32(c.Priority))})},
				netlink.Attribute{Type: unix.NFTA_CHAIN_POLICY, Data: be32(c.Policy)},
				netlink.Attribute{Type: unix.NFTA_CHAIN_TYPE, Data: []byte(c.Type + "\x00")})
		}
		msgs = append(msgs, nftMsg(unix.NFT_MSG_NEWCHAIN, netlink.Create, attrs...))
	}
	for _, c := range op.NAT.chains {
		for _, r := range c.Rules {
			var list []netlink.Attribute
			for _, e := range r.Exprs {
				list = append(list, netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: e})
			}
			attrs := []netlink.Attribute{
				{Type: unix.NFTA_RULE_TABLE, Data: []byte(NATTableName + "\x00")},
				{Type: unix.NFTA_RULE_CHAIN, Data: []byte(c.Name + "\x00")},
				{Type: unix.NLA_F_NESTED | unix.NFTA_RULE_EXPRESSIONS, Data: mustAttrs(list...)},
			}
			if r.UserData != nil {
				attrs = append(attrs, netlink.Attribute{Type: unix.NFTA_RULE_USERDATA, Data: r.UserData})
			}
			msgs = append(msgs, nftMsg(unix.NFT_MSG_NEWRULE, netlink.Create|netlink.Append, attrs...))
		}
	}
	if err := k.sendNFT(msgs); err != nil {
		return len(msgs), fmt.Errorf("writing nftables table inet %s: %w", NATTableName, err)
	}
	writes, err := k.setSysctl(k.ipForward(), 1)
	return len(msgs) + writes, err
}

// NATCounters are the counters of our table: the connections each source
// opened through the NAT, and the packets dropped, by reason. They start at
// zero whenever the table is written.
type NATCounters struct {
	// Connections counts, by source link, the packets that opened a NAT
	// connection (a retransmitted first packet counts again).
	Connections map[string]uint64 `json:"connections"`
	// Dropped counts dropped packets by reason (the rule's comment:
	// "forbidden destination", "source not allowed", "between two ENIs",
	// "a source VPC routes through the instance").
	Dropped map[string]uint64 `json:"dropped"`
}

// NATCounters reads the counters of our table (one dump of its rules); all
// zero without it.
func (k *Kernel) NATCounters() (NATCounters, error) {
	c := NATCounters{Connections: map[string]uint64{}, Dropped: map[string]uint64{}}
	chains, err := k.nftRules()
	for _, ch := range chains {
		for _, r := range ch.Rules {
			for _, e := range r.Exprs {
				var counter bool
				var packets uint64
				forEachAttr(e, func(typ uint16, v []byte) {
					switch typ {
					case unix.NFTA_EXPR_NAME:
						counter = string(v) == "counter\x00"
					case unix.NFTA_EXPR_DATA:
						forEachAttr(v, func(typ uint16, v []byte) {
							if typ == unix.NFTA_COUNTER_PACKETS && len(v) == 8 {
								packets = binary.BigEndian.Uint64(v)
							}
						})
					}
				})
				if !counter {
					continue
				}
				comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
				if link, admit := strings.CutPrefix(ch.Name, natChainAdmitPrefix); admit && comment == natCommentAllowed {
					c.Connections[link] += packets
				} else {
					c.Dropped[comment] += packets
				}
			}
		}
	}
	return c, err
}

// dialNFT opens a NETLINK_NETFILTER socket in k's namespace.
func (k *Kernel) dialNFT() (*netlink.Conn, error) {
	cfg := &netlink.Config{}
	if k.ns.IsOpen() {
		cfg.NetNS = int(k.ns)
	}
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	// The kernel's own words for a refused batch ("Could not process rule:
	// No such file or directory" says little).
	_ = conn.SetOption(netlink.ExtendedAcknowledge, true)
	return conn, conn.SetDeadline(time.Now().Add(netlinkTimeout))
}

// nftGet sends one request about our table (a dump when dump is set) and
// returns the answers.
func (k *Kernel) nftGet(typ uint16, dump bool, attrs ...netlink.Attribute) ([]netlink.Message, error) {
	m := nftMsg(typ, 0, attrs...)
	m.Header.Flags &^= netlink.Acknowledge
	if dump {
		m.Header.Flags |= netlink.Dump
	}
	if err := k.nft.SetDeadline(time.Now().Add(netlinkTimeout)); err != nil {
		return nil, err
	}
	return k.nft.Execute(m)
}

// sendNFT sends msgs as one batch (one transaction) on a socket of its own,
// and waits for the kernel's answer to each. One sendmsg carries the whole
// batch: a process killed around it has sent all of it or nothing, and the
// kernel aborts a batch without its end.
func (k *Kernel) sendNFT(msgs []netlink.Message) error {
	conn, err := k.dialNFT()
	if err != nil {
		return err
	}
	defer conn.Close()
	// The batch's begin and end: family unspecified, the subsystem as resource id.
	edge := func(typ uint16) netlink.Message {
		return netlink.Message{Header: netlink.Header{Type: netlink.HeaderType(typ), Flags: netlink.Request},
			Data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES}}
	}
	if _, err := conn.SendMessages(slices.Concat([]netlink.Message{edge(unix.NFNL_MSG_BATCH_BEGIN)}, msgs, []netlink.Message{edge(unix.NFNL_MSG_BATCH_END)})); err != nil {
		return err
	}
	for acked := 0; acked < len(msgs); {
		replies, err := conn.Receive()
		if err != nil {
			return err
		}
		acked += len(replies)
	}
	return nil
}

// nftMsg is an acknowledged nftables request for family inet.
func nftMsg(typ uint16, flags netlink.HeaderFlags, attrs ...netlink.Attribute) netlink.Message {
	return netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | typ), Flags: netlink.Request | netlink.Acknowledge | flags},
		Data:   append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, mustAttrs(attrs...)...),
	}
}

// mustAttrs encodes attributes of the fixed shapes above, which always encode.
func mustAttrs(attrs ...netlink.Attribute) []byte {
	b, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		panic(fmt.Sprintf("encoding netlink attributes: %v", err))
	}
	return b
}

// nftAttrs calls fn with each attribute of an nftables message (after its
// nfgenmsg header).
func nftAttrs(m netlink.Message, fn func(typ uint16, v []byte)) {
	if len(m.Data) >= 4 {
		forEachAttr(m.Data[4:], fn)
	}
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func beU32(v []byte) uint32 {
	if len(v) < 4 {
		return 0
	}
	return binary.BigEndian.Uint32(v)
}
