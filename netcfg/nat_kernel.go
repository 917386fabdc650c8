package netcfg

// The shared NAT's table in the kernel: Observe's read of it, the
// transaction Apply writes, its counters.
//
// google/nftables encodes the expressions (nat_ruleset.go); the messages
// are built here and go through a dumpSocket like rtnetlink's, because
// google/nftables v0.3.0 cannot encode `ct original zone set` (see
// setZoneOriginal) and its Conn cannot carry an expression of ours in the
// one batch that makes a change atomic. Every request names our table:
// dualhomed never lists, reads or changes another.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// readNAT reads our table and ip_forward for Observe: nil when there is
// neither a table nor a recorded ip_forward original. It asks for our
// table, our rules and each chain of ours by name. It costs 10 µs of CPU
// without a table and 0.45 ms with the table of four ENIs and two sources
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
	var flags, use uint32
	err = k.nft.request(nftMsg(unix.NFT_MSG_GETTABLE, 0, nlString(unix.NFTA_TABLE_NAME, NATTableName)), func(_ uint16, m []byte) error {
		nftAttrs(m, func(typ uint16, v []byte) {
			switch typ {
			case unix.NFTA_TABLE_FLAGS:
				flags = beU32(v)
			case unix.NFTA_TABLE_USE:
				use = beU32(v)
			}
		})
		return nil
	})
	if errors.Is(err, unix.ENOENT) {
		if len(orig) == 0 {
			return nil, nil
		}
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading nftables table inet %s: %w", NATTableName, err)
	}
	chains, err := k.nftRules()
	if err != nil {
		return nil, err
	}
	for i := range chains {
		c := &chains[i]
		err := k.nft.request(nftMsg(unix.NFT_MSG_GETCHAIN, 0, nlString(unix.NFTA_CHAIN_TABLE, NATTableName),
			nlString(unix.NFTA_CHAIN_NAME, c.Name)), func(_ uint16, m []byte) error {
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
			return nil
		})
		if err != nil && !errors.Is(err, unix.ENOENT) { // gone since: the table differs
			return nil, fmt.Errorf("reading chain %s of table inet %s: %w", c.Name, NATTableName, err)
		}
	}
	t.canon = canonical(flags, use, chains)
	return t, nil
}

// nftRules dumps the rules of our table by chain, in the kernel's order
// (the chains' creation order); none without the table.
func (k *Kernel) nftRules() ([]nftChain, error) {
	var chains []nftChain
	get := nftMsg(unix.NFT_MSG_GETRULE, 0, nlString(unix.NFTA_RULE_TABLE, NATTableName))
	err := k.nft.dump("the rules of table inet "+NATTableName, get.Type, get.Body, func() { chains = nil }, func(_ uint16, m []byte) error {
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
		return nil
	})
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	return chains, err
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
		if err := k.nft.batch([]nlRequest{del}); err != nil && !errors.Is(err, unix.ENOENT) {
			return writes + 1, fmt.Errorf("deleting nftables table inet %s: %w", NATTableName, err)
		}
		return writes + 1, nil
	}
	// `add table; delete table; add table ...`: whatever table was there
	// goes, in the same transaction.
	table := nftMsg(unix.NFT_MSG_NEWTABLE, unix.NLM_F_CREATE, nlString(unix.NFTA_TABLE_NAME, NATTableName))
	msgs := []nlRequest{table, del, table}
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
		msgs = append(msgs, nftMsg(unix.NFT_MSG_NEWCHAIN, unix.NLM_F_CREATE, attrs...))
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
			msgs = append(msgs, nftMsg(unix.NFT_MSG_NEWRULE, unix.NLM_F_CREATE|unix.NLM_F_APPEND, attrs...))
		}
	}
	if err := k.nft.batch(msgs); err != nil {
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

// nftMsg is an nftables request of typ for family inet.
func nftMsg(typ, flags uint16, attrs ...netlink.Attribute) nlRequest {
	return nlRequest{Type: unix.NFNL_SUBSYS_NFTABLES<<8 | typ, Flags: flags,
		Body: append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, mustAttrs(attrs...)...)}
}

// nlString is a NUL-terminated string attribute.
func nlString(typ uint16, s string) netlink.Attribute {
	return netlink.Attribute{Type: typ, Data: append([]byte(s), 0)}
}

// nftAttrs calls fn with each attribute of an nftables message's body
// (after its nfgenmsg header).
func nftAttrs(m []byte, fn func(typ uint16, v []byte)) {
	if len(m) >= 4 {
		forEachAttr(m[4:], fn)
	}
}

func beU32(v []byte) uint32 {
	if len(v) < 4 {
		return 0
	}
	return binary.BigEndian.Uint32(v)
}
