package netcfg

// The nftables netlink messages NATTable sends and reads: requests that name
// our table, the batch that carries them, the parsing of the kernel's
// answers, and the comparison of expressions as we encode them with as the
// kernel dumps them.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// nftMsg is an nftables request for family inet.
func nftMsg(msgType uint16, flags netlink.HeaderFlags, attrs []netlink.Attribute) (netlink.Message, error) {
	data, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		return netlink.Message{}, err
	}
	return netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | msgType), Flags: flags},
		Data:   append(nfgenmsg(unix.NFPROTO_INET, 0), data...),
	}, nil
}

// nfgenmsg is the header of every nfnetlink message: family, version, resource id.
func nfgenmsg(family uint8, resID uint16) []byte {
	h := []byte{family, unix.NFNETLINK_V0, 0, 0}
	binary.BigEndian.PutUint16(h[2:], resID)
	return h
}

func batchMsg(msgType uint16) netlink.Message {
	return netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(msgType), Flags: netlink.Request},
		Data:   nfgenmsg(unix.AF_UNSPEC, unix.NFNL_SUBSYS_NFTABLES),
	}
}

// mustNFTMsg builds a write request (acknowledged); its attributes are
// always well formed.
func mustNFTMsg(msgType uint16, flags netlink.HeaderFlags, attrs []netlink.Attribute) netlink.Message {
	m, err := nftMsg(msgType, netlink.Request|netlink.Acknowledge|flags, attrs)
	if err != nil {
		panic(fmt.Sprintf("encoding nftables message %d: %v", msgType, err))
	}
	return m
}

// newTableMsg is `nft add table inet dualhomed`.
func newTableMsg() netlink.Message {
	return mustNFTMsg(unix.NFT_MSG_NEWTABLE, netlink.Create, []netlink.Attribute{
		{Type: unix.NFTA_TABLE_NAME, Data: cstring(NATTableName)},
		{Type: unix.NFTA_TABLE_FLAGS, Data: be32(0)},
	})
}

// delTableMsg is `nft delete table inet dualhomed`: its chains and rules go with it.
func delTableMsg() netlink.Message {
	return mustNFTMsg(unix.NFT_MSG_DELTABLE, 0, []netlink.Attribute{{Type: unix.NFTA_TABLE_NAME, Data: cstring(NATTableName)}})
}

// newChainMsg is `nft add chain inet dualhomed <name> { type .. hook ..
// priority ..; policy accept; }`, or a regular chain.
func newChainMsg(c nftChain) netlink.Message {
	attrs := []netlink.Attribute{
		{Type: unix.NFTA_CHAIN_TABLE, Data: cstring(NATTableName)},
		{Type: unix.NFTA_CHAIN_NAME, Data: cstring(c.Name)},
	}
	if c.base() {
		hook, err := netlink.MarshalAttributes([]netlink.Attribute{
			{Type: unix.NFTA_HOOK_HOOKNUM, Data: be32(c.Hook)},
			{Type: unix.NFTA_HOOK_PRIORITY, Data: be32(uint32(c.Priority))},
		})
		if err != nil {
			panic(err)
		}
		attrs = append(attrs,
			netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_CHAIN_HOOK, Data: hook},
			netlink.Attribute{Type: unix.NFTA_CHAIN_POLICY, Data: be32(c.policy)},
			netlink.Attribute{Type: unix.NFTA_CHAIN_TYPE, Data: cstring(c.Type)})
	}
	return mustNFTMsg(unix.NFT_MSG_NEWCHAIN, netlink.Create, attrs)
}

// flushChainMsg is `nft flush chain inet dualhomed <name>`.
func flushChainMsg(chain string) netlink.Message {
	return mustNFTMsg(unix.NFT_MSG_DELRULE, 0, []netlink.Attribute{
		{Type: unix.NFTA_RULE_TABLE, Data: cstring(NATTableName)},
		{Type: unix.NFTA_RULE_CHAIN, Data: cstring(chain)},
	})
}

// newRuleMsg is `nft add rule inet dualhomed <chain> ...`: appended.
func newRuleMsg(chain string, r nftRule) netlink.Message {
	list := make([]netlink.Attribute, len(r.Exprs))
	for i, e := range r.Exprs {
		list[i] = netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_LIST_ELEM, Data: e}
	}
	exprs, err := netlink.MarshalAttributes(list)
	if err != nil {
		panic(err)
	}
	attrs := []netlink.Attribute{
		{Type: unix.NFTA_RULE_TABLE, Data: cstring(NATTableName)},
		{Type: unix.NFTA_RULE_CHAIN, Data: cstring(chain)},
		{Type: unix.NLA_F_NESTED | unix.NFTA_RULE_EXPRESSIONS, Data: exprs},
	}
	if ud := r.userData(); ud != nil {
		attrs = append(attrs, netlink.Attribute{Type: unix.NFTA_RULE_USERDATA, Data: ud})
	}
	return mustNFTMsg(unix.NFT_MSG_NEWRULE, netlink.Create|netlink.Append, attrs)
}

// Kernel constants golang.org/x/sys/unix lacks (linux/netfilter.h,
// linux/netlink.h, linux/netfilter/nf_tables.h).
const (
	nfAccept         = 1
	natAttrTypeMask  = ^uint16(unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
	nftaBitwiseOp    = 6
	nftaBitwiseData  = 7
	nftBitwiseBool   = 0
	nfNATRangeMapIPs = 1
)

func cstring(s string) []byte { return append([]byte(s), 0) }

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// decodeAttrs walks the attributes of an nftables message (after its nfgenmsg).
func decodeAttrs(m netlink.Message, fn func(ad *netlink.AttributeDecoder)) error {
	if len(m.Data) < 4 {
		return fmt.Errorf("message of %d bytes", len(m.Data))
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[4:])
	if err != nil {
		return err
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		fn(ad)
	}
	return ad.Err()
}

// parseChain reads a chain's name, type, hook and priority.
func parseChain(m netlink.Message) (nftChain, error) {
	var c nftChain
	err := decodeAttrs(m, func(ad *netlink.AttributeDecoder) {
		switch ad.Type() {
		case unix.NFTA_CHAIN_NAME:
			c.Name = ad.String()
		case unix.NFTA_CHAIN_TYPE:
			c.Type = ad.String()
		case unix.NFTA_CHAIN_POLICY:
			c.policy = ad.Uint32()
		case unix.NFTA_CHAIN_HOOK:
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					switch nad.Type() {
					case unix.NFTA_HOOK_HOOKNUM:
						c.Hook = nad.Uint32()
					case unix.NFTA_HOOK_PRIORITY:
						c.Priority = int32(nad.Uint32())
					}
				}
				return nil
			})
		}
	})
	return c, err
}

// parseNFTRule reads a rule's chain, expressions and comment.
func parseNFTRule(m netlink.Message) (string, nftRule, error) {
	var chain string
	var r nftRule
	err := decodeAttrs(m, func(ad *netlink.AttributeDecoder) {
		switch ad.Type() {
		case unix.NFTA_RULE_CHAIN:
			chain = ad.String()
		case unix.NFTA_RULE_EXPRESSIONS:
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					r.Exprs = append(r.Exprs, slices.Clone(nad.Bytes()))
				}
				return nil
			})
		case unix.NFTA_RULE_USERDATA:
			if s, ok := userdata.GetString(ad.Bytes(), userdata.TypeComment); ok {
				r.Comment = s
			} else {
				// Userdata we never write: it cannot compare equal.
				r.Comment = fmt.Sprintf("\x00userdata %x", ad.Bytes())
			}
		}
	})
	return chain, r, err
}

// appendCanonicalExpr appends to dst one expression (NFTA_EXPR_NAME and
// NFTA_EXPR_DATA attributes) in a form in which our encoding and the
// kernel's dump of the same expression are equal bytes: attributes sorted
// by type, without the NLA_F_NESTED flag (which the kernel's dumps omit),
// nested ones in the same form, a counter's values left out, and the
// attributes the kernel adds with their default values (natExprDefaults)
// present on both sides. Each attribute is its type, then its length and
// value, or the length of its nested attributes and them.
func appendCanonicalExpr(dst, b []byte) ([]byte, error) {
	name, data, err := splitExpr(b)
	if err != nil {
		return dst, err
	}
	dst = append(append(dst, name...), 0)
	if name == "counter" {
		return dst, nil
	}
	if dst, err = appendCanonicalAttrs(dst, name, data, 0); err != nil {
		return dst, fmt.Errorf("expression %s: %w", name, err)
	}
	return dst, nil
}

// nlAttr is one netlink attribute, its type without flags.
type nlAttr struct {
	typ uint16
	val []byte
}

// appendAttrs appends the attributes of b to dst, without copying them.
func appendAttrs(dst []nlAttr, b []byte) ([]nlAttr, error) {
	for len(b) > 0 {
		if len(b) < 4 {
			return dst, fmt.Errorf("%d bytes left after the last attribute", len(b))
		}
		l := int(binary.NativeEndian.Uint16(b))
		if l < 4 || l > len(b) {
			return dst, fmt.Errorf("attribute of length %d in %d bytes", l, len(b))
		}
		dst = append(dst, nlAttr{typ: binary.NativeEndian.Uint16(b[2:]) & natAttrTypeMask, val: b[4:l]})
		b = b[min((l+3)&^3, len(b)):]
	}
	return dst, nil
}

// splitExpr returns an expression's name and its data attributes.
func splitExpr(b []byte) (name string, data []byte, err error) {
	var buf [2]nlAttr
	attrs, err := appendAttrs(buf[:0], b)
	if err != nil {
		return "", nil, err
	}
	for _, a := range attrs {
		switch a.typ {
		case unix.NFTA_EXPR_NAME:
			name = string(bytes.TrimRight(a.val, "\x00"))
		case unix.NFTA_EXPR_DATA:
			data = a.val
		}
	}
	if name == "" {
		return "", nil, errors.New("expression without a name")
	}
	return name, data, nil
}

// natNestedAttrs lists, per expression, the attributes of its data that are
// nested (struct nft_data: a value, or a verdict holding a code and a chain).
var natNestedAttrs = map[string][]uint16{
	"cmp":       {unix.NFTA_CMP_DATA},
	"bitwise":   {unix.NFTA_BITWISE_MASK, unix.NFTA_BITWISE_XOR, nftaBitwiseData},
	"immediate": {unix.NFTA_IMMEDIATE_DATA},
	"range":     {unix.NFTA_RANGE_FROM_DATA, unix.NFTA_RANGE_TO_DATA},
}

// natExprDefaults are attributes the kernel dumps although we do not send
// them, with the value it then uses: expression -> type -> value. A nat
// expression with an address register gets NF_NAT_RANGE_MAP_IPS in its
// flags (nft_nat_init), and every nat expression here has one.
var natExprDefaults = map[string]map[uint16][]byte{
	"bitwise": {nftaBitwiseOp: be32(nftBitwiseBool)},
	"nat":     {unix.NFTA_NAT_FLAGS: be32(nfNATRangeMapIPs)},
}

// appendCanonicalAttrs appends the attributes of b (the data of expression
// expr at nesting depth) in canonical form.
func appendCanonicalAttrs(dst []byte, expr string, b []byte, depth int) ([]byte, error) {
	var buf [8]nlAttr
	attrs, err := appendAttrs(buf[:0], b)
	if err != nil {
		return dst, err
	}
	if depth == 0 {
		for typ, v := range natExprDefaults[expr] {
			if !slices.ContainsFunc(attrs, func(a nlAttr) bool { return a.typ == typ }) {
				attrs = append(attrs, nlAttr{typ: typ, val: v})
			}
		}
	}
	slices.SortStableFunc(attrs, func(a, b nlAttr) int { return int(a.typ) - int(b.typ) })
	for _, a := range attrs {
		dst = binary.BigEndian.AppendUint16(dst, a.typ)
		nested := depth == 0 && slices.Contains(natNestedAttrs[expr], a.typ) ||
			depth == 1 && a.typ == unix.NFTA_DATA_VERDICT
		if !nested {
			dst = binary.BigEndian.AppendUint32(dst, uint32(len(a.val)))
			dst = append(dst, a.val...)
			continue
		}
		at := len(dst)
		dst = append(dst, 0, 0, 0, 0)
		if dst, err = appendCanonicalAttrs(dst, expr, a.val, depth+1); err != nil {
			return dst, err
		}
		binary.BigEndian.PutUint32(dst[at:], uint32(len(dst)-at-4))
	}
	return dst, nil
}

// sameKind: the same hook, priority, type and policy (or both regular
// chains).
func (c nftChain) sameKind(w nftChain) bool {
	return c.Name == w.Name && c.Type == w.Type && c.Hook == w.Hook && c.Priority == w.Priority && c.policy == w.policy
}

// sameRules compares rules as the kernel dumped them (got) with the rules we
// want, expression by expression (see appendCanonicalExpr), comment
// included.
func sameRules(want, got []nftRule) (bool, error) {
	if len(want) != len(got) {
		return false, nil
	}
	var w, g []byte
	for i := range want {
		if want[i].Comment != got[i].Comment || len(want[i].Exprs) != len(got[i].Exprs) {
			return false, nil
		}
		for j := range want[i].Exprs {
			var err error
			if w, err = appendCanonicalExpr(w[:0], want[i].Exprs[j]); err != nil {
				return false, err
			}
			if g, err = appendCanonicalExpr(g[:0], got[i].Exprs[j]); err != nil {
				return false, fmt.Errorf("reading rule %d of chain: %w", i, err)
			}
			if !bytes.Equal(w, g) {
				return false, nil
			}
		}
	}
	return true, nil
}

// rulePackets is the packet count of the rule's counter expression.
func rulePackets(r nftRule) (uint64, bool, error) {
	for _, e := range r.Exprs {
		name, data, err := splitExpr(e)
		if err != nil {
			return 0, false, err
		}
		if name != "counter" {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(data)
		if err != nil {
			return 0, false, err
		}
		ad.ByteOrder = binary.BigEndian
		var packets uint64
		for ad.Next() {
			if ad.Type() == unix.NFTA_COUNTER_PACKETS {
				packets = ad.Uint64()
			}
		}
		return packets, true, ad.Err()
	}
	return 0, false, nil
}
