package netcfg

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/netcfg/nsthread"
)

// NATTable keeps the table `inet dualhomed` and net.ipv4.ip_forward of one
// network namespace as a NAT wants them.
//
// It speaks nftables netlink itself: google/nftables encodes the
// expressions, but its Conn cannot carry the one expression it cannot
// encode (`ct original zone set`, see setZoneOriginal) in the same batch as
// the rest, and one batch is what makes a change atomic. The only requests
// it sends name our table: it never lists, reads or changes another one.
//
// Its methods may be called from several goroutines; they are serialised.
type NATTable struct {
	ns       netns.NsHandle // our duplicate; sysctls are written from a thread inside it
	stateDir string         // where ip_forward's original value is recorded

	mu   sync.Mutex
	conn *netlink.Conn // reads; each write batch has a socket of its own
}

// NewNATTable returns a NATTable acting in namespace ns (netns.None() for
// the caller's namespace), recording state under stateDir. It keeps its own
// duplicate of ns: the caller may close ns afterwards.
func NewNATTable(ns netns.NsHandle, stateDir string) (*NATTable, error) {
	if stateDir == "" {
		return nil, errors.New("creating NAT table: empty state directory")
	}
	own := netns.None()
	if ns.IsOpen() {
		fd, err := unix.FcntlInt(uintptr(ns), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("duplicating namespace handle: %w", err)
		}
		own = netns.NsHandle(fd)
	}
	t := &NATTable{ns: own, stateDir: stateDir}
	conn, err := t.dial()
	if err != nil {
		own.Close()
		return nil, err
	}
	t.conn = conn
	return t, nil
}

// Close releases the netlink socket and the namespace handle.
func (t *NATTable) Close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.conn.Close()
	if t.ns.IsOpen() {
		t.ns.Close()
	}
}

// dial opens a NETLINK_NETFILTER socket in the namespace.
func (t *NATTable) dial() (*netlink.Conn, error) {
	cfg := &netlink.Config{}
	if t.ns.IsOpen() {
		cfg.NetNS = int(t.ns)
	}
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	// The kernel's own words for a refused batch ("Could not process rule:
	// No such file or directory" says little).
	_ = conn.SetOption(netlink.ExtendedAcknowledge, true)
	return conn, nil
}

// Apply makes the table and ip_forward what n wants, and returns the number
// of netlink messages and sysctl writes it made: 0 when they already are.
// The table changes in one nftables transaction: the kernel applies all of
// it or none, so no packet ever meets a half-built table.
//
// Make before break: the table is in place before forwarding is turned on;
// forwarding is turned off (its recorded original restored) before the
// table goes.
func (t *NATTable) Apply(n NAT) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	writes := 0
	if !n.Enabled() {
		w, err := t.restoreForwarding()
		writes += w
		if err != nil {
			return writes, err
		}
	}
	msgs, err := t.plan(n.ruleset())
	if err != nil {
		return writes, err
	}
	if len(msgs) > 0 {
		if err := t.send(msgs); err != nil {
			return writes, fmt.Errorf("applying nftables table inet %s: %w", NATTableName, err)
		}
		writes += len(msgs)
	}
	if n.Enabled() {
		w, err := t.enableForwarding()
		writes += w
		if err != nil {
			return writes, err
		}
	}
	return writes, nil
}

// Cleanup removes the table and restores ip_forward: Apply of the zero NAT.
func (t *NATTable) Cleanup() (int, error) { return t.Apply(NAT{}) }

// InSync reports whether the table and ip_forward are what n wants, reading
// only (for plan and status).
func (t *NATTable) InSync(n NAT) (bool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	msgs, err := t.plan(n.ruleset())
	if err != nil || len(msgs) > 0 {
		return false, err
	}
	fwd, err := t.readForwarding()
	if err != nil {
		return false, err
	}
	return !n.Enabled() || fwd == 1, nil
}

// plan reads the table and returns the messages that make it want: none
// when it already is. When only rules differ, each differing chain is
// flushed and refilled; anything else (the table missing, dormant, holding
// an object or chain we do not want, a chain of another kind) replaces the
// whole table, its deletion and re-creation in the same transaction.
func (t *NATTable) plan(want []nftChain) ([]netlink.Message, error) {
	got, err := t.read(want)
	if err != nil {
		return nil, err
	}
	if len(want) == 0 {
		if got.exists {
			return []netlink.Message{delTableMsg()}, nil
		}
		return nil, nil
	}
	if !got.exists || got.flags != 0 || int(got.objects) != len(want) || len(got.chains) != len(want) {
		return rebuildMsgs(got.exists, want)
	}
	for _, c := range want {
		if !got.chains[c.Name].sameKind(c) {
			return rebuildMsgs(true, want)
		}
	}
	var msgs []netlink.Message
	for _, c := range want {
		same, err := sameRules(c.Rules, got.rules[c.Name])
		if err != nil {
			return nil, err
		}
		if same {
			continue
		}
		msgs = append(msgs, flushChainMsg(c.Name))
		for _, r := range c.Rules {
			msgs = append(msgs, newRuleMsg(c.Name, r))
		}
	}
	return msgs, nil
}

// rebuildMsgs creates the whole table, after deleting the old one.
func rebuildMsgs(exists bool, want []nftChain) ([]netlink.Message, error) {
	var msgs []netlink.Message
	if exists {
		msgs = append(msgs, delTableMsg())
	}
	msgs = append(msgs, newTableMsg())
	for _, c := range want {
		msgs = append(msgs, newChainMsg(c))
	}
	for _, c := range want {
		for _, r := range c.Rules {
			msgs = append(msgs, newRuleMsg(c.Name, r))
		}
	}
	return msgs, nil
}

// sameKind: the same hook, priority, type and policy (or both regular
// chains).
func (c nftChain) sameKind(w nftChain) bool {
	return c.Name == w.Name && c.Type == w.Type && c.Hook == w.Hook && c.Priority == w.Priority && c.policy == w.policy
}

// sameRules compares rules as the kernel dumped them (got) with the rules we
// want, expression by expression (see canonicalExpr), comment included.
func sameRules(want, got []nftRule) (bool, error) {
	if len(want) != len(got) {
		return false, nil
	}
	for i := range want {
		if want[i].Comment != got[i].Comment || len(want[i].Exprs) != len(got[i].Exprs) {
			return false, nil
		}
		for j := range want[i].Exprs {
			w, err := canonicalExpr(want[i].Exprs[j])
			if err != nil {
				return false, err
			}
			g, err := canonicalExpr(got[i].Exprs[j])
			if err != nil {
				return false, fmt.Errorf("reading rule %d of chain: %w", i, err)
			}
			if w != g {
				return false, nil
			}
		}
	}
	return true, nil
}

// NATCounters are the counters of the table: the connections each source
// opened through the NAT, and the packets dropped, by reason.
type NATCounters struct {
	// Connections counts, per source link, the packets that opened a NAT
	// connection (a retransmitted first packet counts again).
	Connections map[string]uint64 `json:"connections"`
	// Dropped counts dropped packets by reason (the rule's comment:
	// "forbidden destination", "source not allowed", "between two ENIs",
	// "a source VPC routes through the instance").
	Dropped map[string]uint64 `json:"dropped"`
}

// Counters reads the table's counters (one dump of our rules). They start
// at zero whenever a chain is refilled or the table replaced.
func (t *NATTable) Counters() (NATCounters, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := NATCounters{Connections: map[string]uint64{}, Dropped: map[string]uint64{}}
	msgs, err := t.get(unix.NFT_MSG_GETRULE, true, []netlink.Attribute{{Type: unix.NFTA_RULE_TABLE, Data: cstring(NATTableName)}})
	if errors.Is(err, unix.ENOENT) {
		return c, nil
	}
	if err != nil {
		return c, fmt.Errorf("reading rules of table inet %s: %w", NATTableName, err)
	}
	for _, m := range msgs {
		chain, r, err := parseRule(m)
		if err != nil {
			return c, fmt.Errorf("parsing a rule of table inet %s: %w", NATTableName, err)
		}
		packets, ok, err := rulePackets(r)
		if err != nil {
			return c, err
		}
		if !ok {
			continue
		}
		if link, admit := strings.CutPrefix(chain, natChainAdmitPrefix); admit && r.Comment == natCommentAllowed {
			c.Connections[link] += packets
		} else {
			c.Dropped[r.Comment] += packets
		}
	}
	return c, nil
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

// natReadback is our table as the kernel reports it.
type natReadback struct {
	exists  bool
	flags   uint32 // NFTA_TABLE_FLAGS: dormant, owner...
	objects uint32 // NFTA_TABLE_USE: chains, sets, objects and flowtables in it
	chains  map[string]nftChain
	rules   map[string][]nftRule // by chain, in the kernel's order
}

// read asks for our table, each chain we want by name, and the rules of
// our table: never a listing of other tables.
func (t *NATTable) read(want []nftChain) (natReadback, error) {
	got := natReadback{chains: map[string]nftChain{}, rules: map[string][]nftRule{}}
	msgs, err := t.get(unix.NFT_MSG_GETTABLE, false, []netlink.Attribute{{Type: unix.NFTA_TABLE_NAME, Data: cstring(NATTableName)}})
	if errors.Is(err, unix.ENOENT) {
		return got, nil
	}
	if err != nil {
		return got, fmt.Errorf("reading nftables table inet %s: %w", NATTableName, err)
	}
	got.exists = true
	for _, m := range msgs {
		err := decodeAttrs(m, func(ad *netlink.AttributeDecoder) {
			switch ad.Type() {
			case unix.NFTA_TABLE_FLAGS:
				got.flags = ad.Uint32()
			case unix.NFTA_TABLE_USE:
				got.objects = ad.Uint32()
			}
		})
		if err != nil {
			return got, fmt.Errorf("parsing table inet %s: %w", NATTableName, err)
		}
	}
	for _, w := range want {
		msgs, err := t.get(unix.NFT_MSG_GETCHAIN, false, []netlink.Attribute{
			{Type: unix.NFTA_CHAIN_TABLE, Data: cstring(NATTableName)},
			{Type: unix.NFTA_CHAIN_NAME, Data: cstring(w.Name)},
		})
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return got, fmt.Errorf("reading chain %s: %w", w.Name, err)
		}
		for _, m := range msgs {
			c, err := parseChain(m)
			if err != nil {
				return got, fmt.Errorf("parsing chain %s: %w", w.Name, err)
			}
			if c.Name == w.Name {
				got.chains[c.Name] = c
			}
		}
	}
	msgs, err = t.get(unix.NFT_MSG_GETRULE, true, []netlink.Attribute{{Type: unix.NFTA_RULE_TABLE, Data: cstring(NATTableName)}})
	if errors.Is(err, unix.ENOENT) {
		return got, nil // deleted since: the next step sees it
	}
	if err != nil {
		return got, fmt.Errorf("reading rules of table inet %s: %w", NATTableName, err)
	}
	for _, m := range msgs {
		chain, r, err := parseRule(m)
		if err != nil {
			return got, fmt.Errorf("parsing a rule of table inet %s: %w", NATTableName, err)
		}
		got.rules[chain] = append(got.rules[chain], r)
	}
	return got, nil
}

// get sends one GET request for family inet (a dump when dump is set) and
// returns the replies.
func (t *NATTable) get(msgType uint16, dump bool, attrs []netlink.Attribute) ([]netlink.Message, error) {
	m, err := nftMsg(msgType, netlink.Request, attrs)
	if err != nil {
		return nil, err
	}
	if dump {
		m.Header.Flags |= netlink.Dump
	}
	if err := t.conn.SetDeadline(time.Now().Add(netlinkTimeout)); err != nil {
		return nil, err
	}
	return t.conn.Execute(m)
}

// send sends msgs as one batch (one transaction) on a socket of its own and
// waits for the kernel's answer to each. A refused batch changes nothing.
// One sendmsg carries the whole batch: a process killed around it has sent
// all of it or nothing, and a batch without its end is aborted by the kernel.
func (t *NATTable) send(msgs []netlink.Message) error {
	conn, err := t.dial()
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(netlinkTimeout)); err != nil {
		return err
	}
	batch := make([]netlink.Message, 0, len(msgs)+2)
	batch = append(batch, batchMsg(unix.NFNL_MSG_BATCH_BEGIN))
	batch = append(batch, msgs...)
	batch = append(batch, batchMsg(unix.NFNL_MSG_BATCH_END))
	if _, err := conn.SendMessages(batch); err != nil {
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

// parseRule reads a rule's chain, expressions and comment.
func parseRule(m netlink.Message) (string, nftRule, error) {
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

// canonicalExpr renders one expression (NFTA_EXPR_NAME and NFTA_EXPR_DATA
// attributes) so that our encoding and the kernel's dump of the same
// expression render alike: attributes sorted by type, without the
// NLA_F_NESTED flag (which the kernel's dumps omit), nested ones rendered
// recursively, a counter's values left out, and the attributes the kernel
// adds with their default values (natExprDefaults) present on both sides.
func canonicalExpr(b []byte) (string, error) {
	name, data, err := splitExpr(b)
	if err != nil {
		return "", err
	}
	if name == "counter" {
		return name, nil
	}
	s, err := canonicalAttrs(name, data, 0)
	if err != nil {
		return "", fmt.Errorf("expression %s: %w", name, err)
	}
	return name + s, nil
}

// splitExpr returns an expression's name and its data attributes.
func splitExpr(b []byte) (name string, data []byte, err error) {
	attrs, err := netlink.UnmarshalAttributes(b)
	if err != nil {
		return "", nil, err
	}
	for _, a := range attrs {
		switch a.Type & natAttrTypeMask {
		case unix.NFTA_EXPR_NAME:
			name = strings.TrimRight(string(a.Data), "\x00")
		case unix.NFTA_EXPR_DATA:
			data = a.Data
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

func canonicalAttrs(expr string, b []byte, depth int) (string, error) {
	attrs, err := netlink.UnmarshalAttributes(b)
	if err != nil {
		return "", err
	}
	type kv struct {
		t uint16
		v string
	}
	var out []kv
	seen := map[uint16]bool{}
	for _, a := range attrs {
		typ := a.Type & natAttrTypeMask
		seen[typ] = true
		nested := false
		switch depth {
		case 0:
			nested = slices.Contains(natNestedAttrs[expr], typ)
		case 1:
			nested = typ == unix.NFTA_DATA_VERDICT
		}
		v := fmt.Sprintf("%x", a.Data)
		if nested {
			if v, err = canonicalAttrs(expr, a.Data, depth+1); err != nil {
				return "", err
			}
		}
		out = append(out, kv{typ, v})
	}
	if depth == 0 {
		for typ, v := range natExprDefaults[expr] {
			if !seen[typ] {
				out = append(out, kv{typ, fmt.Sprintf("%x", v)})
			}
		}
	}
	slices.SortFunc(out, func(a, b kv) int { return int(a.t) - int(b.t) })
	var sb strings.Builder
	sb.WriteString("{")
	for _, a := range out {
		fmt.Fprintf(&sb, "%d:%s;", a.t, a.v)
	}
	sb.WriteString("}")
	return sb.String(), nil
}

// ipForwardStateFile records net.ipv4.ip_forward as it was before the NAT
// turned it on, so that cleanup can restore it. The kernel has no owner mark
// for sysctls: this file is the only record.
const ipForwardStateFile = "ip_forward.json"

const ipForwardPath = "/proc/sys/net/ipv4/ip_forward"

type ipForwardRecord struct {
	Original int `json:"original"`
}

func (t *NATTable) ipForwardStatePath() string { return filepath.Join(t.stateDir, ipForwardStateFile) }

// readForwarding is `sysctl net.ipv4.ip_forward` inside the namespace.
func (t *NATTable) readForwarding() (int, error) {
	var v int
	err := nsthread.Do(t.ns, func() error {
		b, err := os.ReadFile(ipForwardPath)
		if err != nil {
			return err
		}
		v, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("reading net.ipv4.ip_forward: %w", err)
	}
	return v, nil
}

// writeForwarding is `sysctl -w net.ipv4.ip_forward=<v>` inside the namespace.
func (t *NATTable) writeForwarding(v int) error {
	err := nsthread.Do(t.ns, func() error {
		return os.WriteFile(ipForwardPath, []byte(strconv.Itoa(v)), 0o644)
	})
	if err != nil {
		return fmt.Errorf("setting net.ipv4.ip_forward=%d: %w", v, err)
	}
	return nil
}

// enableForwarding records ip_forward's value (the first time only, before
// writing, so that a crash never loses it) and sets it to 1.
func (t *NATTable) enableForwarding() (int, error) {
	cur, err := t.readForwarding()
	if err != nil {
		return 0, err
	}
	var rec *ipForwardRecord
	if err := readJSON(t.ipForwardStatePath(), &rec); err != nil {
		return 0, fmt.Errorf("reading ip_forward original: %w", err)
	}
	if rec == nil {
		if err := writeJSONAtomic(t.ipForwardStatePath(), ipForwardRecord{Original: cur}); err != nil {
			return 0, fmt.Errorf("recording original ip_forward: %w", err)
		}
	}
	if cur == 1 {
		return 0, nil
	}
	return 1, t.writeForwarding(1)
}

// restoreForwarding puts back the recorded value and forgets the record.
// Without a record the NAT never changed ip_forward: nothing to do.
func (t *NATTable) restoreForwarding() (int, error) {
	var rec *ipForwardRecord
	if err := readJSON(t.ipForwardStatePath(), &rec); err != nil {
		return 0, fmt.Errorf("reading ip_forward original: %w", err)
	}
	if rec == nil {
		return 0, nil
	}
	cur, err := t.readForwarding()
	if err != nil {
		return 0, err
	}
	writes := 0
	if cur != rec.Original {
		writes = 1
		if err := t.writeForwarding(rec.Original); err != nil {
			return writes, err
		}
	}
	if err := os.Remove(t.ipForwardStatePath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return writes, fmt.Errorf("forgetting ip_forward original: %w", err)
	}
	return writes, nil
}
