package netcfg

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NATTable keeps the table `inet dualhomed` and net.ipv4.ip_forward of one
// network namespace as a NAT wants them.
//
// It speaks nftables netlink itself: google/nftables encodes the
// expressions, but its Conn cannot carry the one expression it cannot
// encode (`ct original zone set`, see setZoneOriginal) in the same batch as
// the rest, and one batch is what makes a change atomic. Apart from the
// ruleset's generation number, every request it sends names our table: it
// never lists, reads or changes another one.
//
// The fwmark rules that route replies through a source's table are policy
// rules, not nftables: they belong with dualhomed's other rules (docs/nat.md).
//
// Its methods may be called from several goroutines; they are serialised.
type NATTable struct {
	ns       netns.NsHandle // our duplicate; sysctls are written from a thread inside it
	stateDir string         // where ip_forward's original value is recorded

	mu   sync.Mutex
	conn *netlink.Conn // reads; each write batch has a socket of its own

	// verified is the nftables generation at which Apply last read the
	// table back and found it as verifiedNAT wants it (nil: none). Every
	// transaction in the namespace, anybody's, moves the generation on:
	// while it stays, Apply asks for it alone instead of reading the table
	// back. Why: a no-op Apply takes 1.0 to 1.4 ms with the read-back (9
	// requests and the comparison), 0.13 to 0.16 ms without it
	// (BenchmarkNATApplyNoOp, busy and quiet).
	verified    uint32
	verifiedNAT *NAT
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
	gen, err := t.generation()
	if err != nil {
		return writes, err
	}
	if t.verifiedNAT == nil || gen != t.verified || !reflect.DeepEqual(*t.verifiedNAT, n) {
		t.verifiedNAT = nil
		msgs, err := t.plan(n.ruleset())
		if err != nil {
			return writes, err
		}
		if len(msgs) > 0 {
			if err := t.send(msgs); err != nil {
				return writes, fmt.Errorf("applying nftables table inet %s: %w", NATTableName, err)
			}
			writes += len(msgs)
		} else {
			// gen was read before the table: a later change has moved
			// the generation on, and the next Apply reads again.
			t.verified, t.verifiedNAT = gen, n.clone()
		}
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
	if !n.Enabled() {
		rec, err := t.forwardingRecord()
		return rec == nil, err // recorded: the original is still to be restored
	}
	fwd, err := t.readForwarding()
	return fwd == 1, err
}

// plan reads the table and returns the messages that make it what we want:
// none when it already is. When only rules differ, each differing chain is
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
		return rebuildMsgs(got.exists, want), nil
	}
	for _, c := range want {
		if !got.chains[c.Name].sameKind(c) {
			return rebuildMsgs(true, want), nil
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
func rebuildMsgs(exists bool, want []nftChain) []netlink.Message {
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
	return msgs
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
	rules, err := t.readRules()
	if err != nil {
		return c, err
	}
	for chain, rs := range rules {
		for _, r := range rs {
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
	}
	return c, nil
}

// generation is the namespace's nftables ruleset generation
// (NFT_MSG_GETGEN), which every committed transaction increments.
func (t *NATTable) generation() (uint32, error) {
	msgs, err := t.get(unix.NFT_MSG_GETGEN, false, nil)
	if err != nil {
		return 0, fmt.Errorf("reading the nftables generation: %w", err)
	}
	for _, m := range msgs {
		var gen uint32
		found := false
		if err := decodeAttrs(m, func(ad *netlink.AttributeDecoder) {
			if ad.Type() == unix.NFTA_GEN_ID {
				gen, found = ad.Uint32(), true
			}
		}); err != nil {
			return 0, fmt.Errorf("parsing the nftables generation: %w", err)
		}
		if found {
			return gen, nil
		}
	}
	return 0, errors.New("reading the nftables generation: no generation in the answer")
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
	got := natReadback{chains: map[string]nftChain{}}
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
	got.rules, err = t.readRules()
	return got, err
}

// readRules dumps the rules of our table, by chain in the kernel's order;
// none when the table does not exist.
func (t *NATTable) readRules() (map[string][]nftRule, error) {
	rules := map[string][]nftRule{}
	msgs, err := t.get(unix.NFT_MSG_GETRULE, true, []netlink.Attribute{{Type: unix.NFTA_RULE_TABLE, Data: cstring(NATTableName)}})
	if errors.Is(err, unix.ENOENT) {
		return rules, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading rules of table inet %s: %w", NATTableName, err)
	}
	for _, m := range msgs {
		chain, r, err := parseNFTRule(m)
		if err != nil {
			return nil, fmt.Errorf("parsing a rule of table inet %s: %w", NATTableName, err)
		}
		rules[chain] = append(rules[chain], r)
	}
	return rules, nil
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
