package netcfg

// The shared NAT's table in the kernel: Observe's read of it, the
// transaction Apply writes, its counters.
//
// google/nftables encodes the expressions (nat_ruleset.go); the messages
// are built here on mdlayher/netlink, because google/nftables v0.3.0 cannot
// encode `ct original zone set` (see setZoneOriginal) and its Conn cannot
// carry an expression of ours in the one batch that makes a change atomic.
// Every request names our table: dualhomed never lists, reads or changes
// another.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// readNAT reads our table and ip_forward for Observe: nil when there is
// neither a table nor a recorded ip_forward original. It asks for our
// table, our rules and each chain of ours by name. It costs 35 µs of CPU
// without a table and 0.85 ms with the table of four ENIs and two sources
// (BenchmarkReadNAT), against the 5 ms a no-op reconcile may take.
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
	msgs, err := k.nftGet(unix.NFT_MSG_GETTABLE, false, nlString(unix.NFTA_TABLE_NAME, NATTableName))
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
		msgs, err := k.nftGet(unix.NFT_MSG_GETCHAIN, false, nlString(unix.NFTA_CHAIN_TABLE, NATTableName),
			nlString(unix.NFTA_CHAIN_NAME, c.Name))
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
	msgs, err := k.nftGet(unix.NFT_MSG_GETRULE, true, nlString(unix.NFTA_RULE_TABLE, NATTableName))
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
	del := nftMsg(unix.NFT_MSG_DELTABLE, 0, nlString(unix.NFTA_TABLE_NAME, NATTableName))
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
	table := nftMsg(unix.NFT_MSG_NEWTABLE, netlink.Create, nlString(unix.NFTA_TABLE_NAME, NATTableName))
	msgs := []netlink.Message{table, del, table}
	for _, c := range op.NAT.chains {
		attrs := []netlink.Attribute{nlString(unix.NFTA_CHAIN_TABLE, NATTableName), nlString(unix.NFTA_CHAIN_NAME, c.Name)}
		if c.Type != "" {
			attrs = append(attrs,
				netlink.Attribute{Type: unix.NLA_F_NESTED | unix.NFTA_CHAIN_HOOK, Data: mustAttrs(
					netlink.Attribute{Type: unix.NFTA_HOOK_HOOKNUM, Data: be32(c.Hook)},
					netlink.Attribute{Type: unix.NFTA_HOOK_PRIORITY, Data: be32(uint32(c.Priority))})},
				netlink.Attribute{Type: unix.NFTA_CHAIN_POLICY, Data: be32(c.Policy)},
				nlString(unix.NFTA_CHAIN_TYPE, c.Type))
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
				nlString(unix.NFTA_RULE_TABLE, NATTableName),
				nlString(unix.NFTA_RULE_CHAIN, c.Name),
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
			packets, counted := rulePackets(r)
			comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			switch link, admit := strings.CutPrefix(ch.Name, natChainAdmitPrefix); {
			case !counted:
			case admit && comment == natCommentAllowed:
				c.Connections[link] += packets
			default:
				c.Dropped[comment] += packets
			}
		}
	}
	return c, err
}

// rulePackets is the packet count of the rule's counter, if it has one.
func rulePackets(r nftRule) (packets uint64, counted bool) {
	for _, e := range r.Exprs {
		if name, data, _ := splitExpr(e); name == "counter" {
			forEachAttr(data, func(typ uint16, v []byte) {
				if typ == unix.NFTA_COUNTER_PACKETS && len(v) == 8 {
					packets, counted = binary.BigEndian.Uint64(v), true
				}
			})
		}
	}
	return packets, counted
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

// nlString is a NUL-terminated string attribute.
func nlString(typ uint16, s string) netlink.Attribute {
	return netlink.Attribute{Type: typ, Data: append([]byte(s), 0)}
}

// nftAttrs calls fn with each attribute of an nftables message (after its
// nfgenmsg header).
func nftAttrs(m netlink.Message, fn func(typ uint16, v []byte)) {
	if len(m.Data) >= 4 {
		forEachAttr(m.Data[4:], fn)
	}
}

func beU32(v []byte) uint32 {
	if len(v) < 4 {
		return 0
	}
	return binary.BigEndian.Uint32(v)
}
