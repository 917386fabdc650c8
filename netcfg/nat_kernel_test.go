package netcfg

import (
	"fmt"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	mdnetlink "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// natKTWorld is an instance namespace with four fake ENIs eth0..eth3 (veth
// pairs to a router namespace) and a Kernel acting in it: eth0 is the
// egress, eth1 (VPC B) and eth2 (VPC C, overlapping B) are NAT sources, eth3
// (VPC D) is managed without NAT.
type natKTWorld struct {
	ns       *nstest.NS
	router   *nstest.NS
	k        *Kernel
	stateDir string
	links    []Link
}

func newNATKTWorld(t testing.TB) *natKTWorld {
	t.Helper()
	router, ns := nstest.New(t), nstest.New(t)
	w := &natKTWorld{ns: ns, router: router, stateDir: t.TempDir()}
	for i := range 4 {
		name := fmt.Sprintf("eth%d", i)
		l := ns.Veth(t, name, ktMAC(i), router, fmt.Sprintf("vpc%d", i))
		w.links = append(w.links, Link{Index: l.Attrs().Index, Name: name, MAC: ktMAC(i)})
	}
	k, err := NewKernel(ns.Handle, w.stateDir, DefaultConfig())
	if err != nil {
		t.Fatalf("NewKernel: %v", err)
	}
	t.Cleanup(k.Close)
	w.k = k
	return w
}

// nat is the world's NAT (Desired's computation is tested in nat_test.go);
// natSources narrows eth1's sources.
func (w *natKTWorld) nat(natSources ...string) *NAT {
	allowed := desPfxs("10.1.0.0/16")
	if len(natSources) > 0 {
		allowed = desPfxs(natSources...)
	}
	return &NAT{
		Egress: w.links[0], EgressAddr: desIP("10.0.0.10"),
		Sources: []NATSource{
			{Link: w.links[1], Mark: 1 << natMarkShift, Zone: 1, Allowed: allowed},
			{Link: w.links[2], Mark: 2 << natMarkShift, Zone: 2, Allowed: desPfxs("10.1.0.0/16", "100.64.0.0/16")},
		},
		ENIs:      w.links,
		Forbidden: desPfxs("10.0.0.0/16", "10.1.0.0/16", "100.64.0.0/16", "169.254.0.0/16", "172.31.0.0/16"),
	}
}

// withNAT is st with n's table and mark rules in place of any NAT (n nil: none).
func withNAT(st State, n *NAT) State {
	st.Rules = slices.DeleteFunc(slices.Clone(st.Rules), func(r Rule) bool { return r.Mark != 0 })
	st.NAT = nil
	if n != nil {
		st.NAT = n.table()
		st.Rules = append(st.Rules, n.markRules(DefaultConfig())...)
	}
	st.Sort()
	return st
}

// plan is what makes the kernel hold n (nil: no NAT), the rest as it is.
func (w *natKTWorld) plan(t testing.TB, n *NAT) Plan {
	t.Helper()
	obs, err := w.k.Observe()
	if err != nil {
		t.Fatalf("Observe: %v", err)
	}
	return Diff(obs.Owned, withNAT(obs.Owned, n))
}

func (w *natKTWorld) apply(t testing.TB, n *NAT) int {
	t.Helper()
	writes, err := w.k.Apply(w.plan(t, n))
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return writes
}

// requireNFT skips the test unless the nft binary is installed (CI installs
// it: .ci/run).
func requireNFT(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("skipping: needs the nft binary to cross-check the table (apt-get install nftables)")
	}
}

var nftCounterValues = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// nftList is `nft list table inet dualhomed`, counters without values; ""
// when the table does not exist. nft is used by tests only, to see the
// kernel's table through another program's eyes.
func (w *natKTWorld) nftList(t *testing.T) string {
	t.Helper()
	requireNFT(t)
	out, err := w.ns.Output("nft", "list", "table", "inet", NATTableName)
	if err != nil {
		if strings.Contains(err.Error(), "No such file or directory") {
			return ""
		}
		t.Fatalf("nft list: %v", err)
	}
	return nftCounterValues.ReplaceAllString(out, "counter")
}

// converge applies n to a table that differs from it: Apply must write,
// and a second Apply must write nothing. For the world's NAT (no
// nat_sources), the table must then be natKTRuleset as nft lists it, which
// checks our encoding against nft's decoder.
func (w *natKTWorld) converge(t *testing.T, n *NAT) {
	t.Helper()
	if writes := w.apply(t, n); writes == 0 {
		t.Fatal("Apply wrote nothing")
	}
	if got := w.nftList(t); n.table().Equal(w.nat().table()) && got != natKTRuleset {
		t.Fatalf("after Apply nft lists:\n%s\nwant:\n%s", got, natKTRuleset)
	}
	if writes := w.apply(t, n); writes != 0 {
		t.Fatalf("second Apply made %d writes, want 0", writes)
	}
}

// natKTRuleset is the world's NAT as nft lists it (counters without values).
// No base chain drops, and the forward chain jumps only after an iif that is
// one of our ENIs: forwarding that is not ours passes.
const natKTRuleset = `table inet dualhomed {
	chain zones {
		type filter hook prerouting priority raw; policy accept;
		meta nfproto ipv4 iif "eth1" ct original zone set 1 comment "eth1: conntrack zone of its clients"
		meta nfproto ipv4 iif "eth2" ct original zone set 2 comment "eth2: conntrack zone of its clients"
	}

	chain restore_mark {
		type filter hook prerouting priority mangle; policy accept;
		iif "eth0" ct direction reply ct mark 0x00100000/12 meta mark set meta mark & 0x001fffff | 0x00100000 comment "eth1: replies route through its table"
		iif "eth0" ct direction reply ct mark 0x00200000/12 meta mark set meta mark & 0x002fffff | 0x00200000 comment "eth2: replies route through its table"
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		iif "eth1" oif "eth0" ct direction original ct mark 0x00100000/12 accept comment "eth1: NAT traffic out"
		iif "eth0" oif "eth1" ct direction reply ct mark 0x00100000/12 accept comment "eth1: NAT replies in"
		iif "eth2" oif "eth0" ct direction original ct mark 0x00200000/12 accept comment "eth2: NAT traffic out"
		iif "eth0" oif "eth2" ct direction reply ct mark 0x00200000/12 accept comment "eth2: NAT replies in"
		iif "eth1" oif "eth0" ct state new jump admit_eth1 comment "eth1: new NAT connections"
		iif "eth2" oif "eth0" ct state new jump admit_eth2 comment "eth2: new NAT connections"
		iif "eth0" jump to_enis comment "from an ENI"
		iif "eth1" jump from_source comment "from a NAT source"
		iif "eth2" jump from_source comment "from a NAT source"
		iif "eth3" jump to_enis comment "from an ENI"
	}

	chain admit_eth1 {
		ip daddr 10.0.0.0/16 counter drop comment "forbidden destination"
		ip daddr 10.1.0.0/16 counter drop comment "forbidden destination"
		ip daddr 100.64.0.0/16 counter drop comment "forbidden destination"
		ip daddr 169.254.0.0/16 counter drop comment "forbidden destination"
		ip daddr 172.31.0.0/16 counter drop comment "forbidden destination"
		ip saddr 10.1.0.0/16 counter ct mark set ct mark & 0x001fffff | 0x00100000 accept comment "allowed source"
		counter drop comment "source not allowed"
	}

	chain admit_eth2 {
		ip daddr 10.0.0.0/16 counter drop comment "forbidden destination"
		ip daddr 10.1.0.0/16 counter drop comment "forbidden destination"
		ip daddr 100.64.0.0/16 counter drop comment "forbidden destination"
		ip daddr 169.254.0.0/16 counter drop comment "forbidden destination"
		ip daddr 172.31.0.0/16 counter drop comment "forbidden destination"
		ip saddr 10.1.0.0/16 counter ct mark set ct mark & 0x002fffff | 0x00200000 accept comment "allowed source"
		ip saddr 100.64.0.0/16 counter ct mark set ct mark & 0x002fffff | 0x00200000 accept comment "allowed source"
		counter drop comment "source not allowed"
	}

	chain to_enis {
		oif "eth0" counter drop comment "between two ENIs"
		oif "eth1" counter drop comment "between two ENIs"
		oif "eth2" counter drop comment "between two ENIs"
		oif "eth3" counter drop comment "between two ENIs"
	}

	chain from_source {
		jump to_enis
		ct direction reply accept comment "replies of connections into the VPC"
		ct status dnat accept comment "published by another program's DNAT"
		counter drop comment "a source VPC routes through the instance"
	}

	chain egress_nat {
		type nat hook postrouting priority srcnat; policy accept;
		oif "eth0" ct mark 0x00100000/12 snat ip to 10.0.0.10 comment "eth1: masquerade to the egress"
		oif "eth0" ct mark 0x00200000/12 snat ip to 10.0.0.10 comment "eth2: masquerade to the egress"
	}
}
`

func TestNATApplyInstallsTheRuleset(t *testing.T) {
	w := newNATKTWorld(t)
	w.converge(t, w.nat())
	if got := w.ns.ReadSysctl(t, "net/ipv4/ip_forward"); got != "1" {
		t.Errorf("ip_forward = %s with the NAT, want 1", got)
	}
}

// foreignTables creates, through google/nftables as another program would,
// tables in the hooks ours uses: `inet filter` (forward and prerouting raw
// chains), `ip nat` (a masquerade in postrouting) and `ip dualhomed`, our
// name in another family.
func (w *natKTWorld) foreignTables(t *testing.T) {
	t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(w.ns.Handle)))
	if err != nil {
		t.Fatal(err)
	}
	accept, drop := nftables.ChainPolicyAccept, nftables.ChainPolicyDrop
	// No counters: packets the kernel sends on its own (IPv6 router
	// solicitations) would change them.
	ifname := func(key expr.MetaKey, name string) []expr.Any {
		return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(name + "\x00")}}
	}
	dockerAccept := append(ifname(expr.MetaKeyIIFNAME, "docker0"), &expr.Verdict{Kind: expr.VerdictAccept})
	filter := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "filter"})
	fwd := c.AddChain(&nftables.Chain{Name: "forward", Table: filter, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	raw := c.AddChain(&nftables.Chain{Name: "raw", Table: filter, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRaw, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: filter, Chain: fwd, Exprs: dockerAccept})
	c.AddRule(&nftables.Rule{Table: filter, Chain: raw, Exprs: []expr.Any{
		&expr.Immediate{Register: 1, Data: []byte{0x42, 0, 0, 0}},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true}}})
	nat := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: "nat"})
	post := c.AddChain(&nftables.Chain{Name: "POSTROUTING", Table: nat, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: nat, Chain: post, Exprs: append(ifname(expr.MetaKeyOIFNAME, "eth0"), &expr.Masq{})})
	twin := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: NATTableName})
	twinFwd := c.AddChain(&nftables.Chain{Name: "forward", Table: twin, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &drop})
	c.AddRule(&nftables.Rule{Table: twin, Chain: twinFwd, Exprs: dockerAccept})
	if err := c.Flush(); err != nil {
		t.Fatalf("creating foreign tables: %v", err)
	}
}

// foreignDump is every netlink message the kernel sends about the foreign
// tables (the tables, their chains, their rules with handles, sets and
// objects), byte for byte: everything in the namespace but `inet
// dualhomed`. The nfgenmsg header is left out: it carries the ruleset's
// generation, which every transaction (ours included) moves on.
func (w *natKTWorld) foreignDump(t *testing.T) []string {
	t.Helper()
	conn, err := mdnetlink.Dial(unix.NETLINK_NETFILTER, &mdnetlink.Config{NetNS: int(w.ns.Handle)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var out []string
	for _, typ := range []uint16{unix.NFT_MSG_GETTABLE, unix.NFT_MSG_GETCHAIN, unix.NFT_MSG_GETRULE, unix.NFT_MSG_GETSET, unix.NFT_MSG_GETOBJ} {
		msgs, err := conn.Execute(mdnetlink.Message{
			Header: mdnetlink.Header{Type: mdnetlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | typ), Flags: mdnetlink.Request | mdnetlink.Dump},
			Data:   []byte{unix.NFPROTO_UNSPEC, unix.NFNETLINK_V0, 0, 0},
		})
		if err != nil {
			t.Fatalf("dumping nftables (%d): %v", typ, err)
		}
		for _, m := range msgs {
			ours := false
			nftAttrs(m.Data, func(typ uint16, v []byte) {
				// The first attribute of tables, chains, rules, sets and
				// objects is the table's name.
				ours = ours || typ == 1 && m.Data[0] == unix.NFPROTO_INET && unix.ByteSliceToString(v) == NATTableName
			})
			if !ours {
				out = append(out, fmt.Sprintf("%d %x", typ, m.Data[4:]))
			}
		}
	}
	if len(out) == 0 {
		t.Fatal("no foreign nftables objects: the test checks nothing")
	}
	return out
}

func TestNATNeverTouchesOtherTables(t *testing.T) {
	requireNFT(t)
	w := newNATKTWorld(t)
	w.foreignTables(t)
	before := w.foreignDump(t)
	check := func(step string) {
		t.Helper()
		if after := w.foreignDump(t); !slices.Equal(before, after) {
			t.Fatalf("%s changed a foreign table:\nbefore %v\nafter  %v", step, before, after)
		}
	}
	full, narrow := w.nat(), w.nat("10.1.5.0/24")
	w.apply(t, full)
	check("Apply")
	w.apply(t, narrow) // rules change: chains flushed and refilled
	check("Apply of a narrower NAT")
	w.ns.Run(t, "nft", "flush", "table", "inet", NATTableName)
	w.apply(t, narrow) // repair
	check("repairing a flushed table")
	w.ns.Run(t, "nft", "add", "chain", "inet", NATTableName, "stray")
	w.converge(t, full) // a chain too many: the table is replaced
	check("replacing the table")
	if _, err := w.k.Cleanup(); err != nil {
		t.Fatal(err)
	}
	check("Cleanup")
	if got := w.nftList(t); got != "" {
		t.Fatalf("table left after Cleanup:\n%s", got)
	}
}

// TestNATRepairsDrift changes our table as other programs could, and checks
// that Observe sees it and one Apply brings back exactly the table we want.
func TestNATRepairsDrift(t *testing.T) {
	requireNFT(t)
	w := newNATKTWorld(t)
	n := w.nat()
	for _, drift := range []struct {
		name string
		nft  string // an nft script run in the namespace
	}{
		{"flushed table", "flush table inet dualhomed"},
		{"flushed chain", "flush chain inet dualhomed forward"},
		{"deleted table", "delete table inet dualhomed"},
		{"rule appended", "add rule inet dualhomed forward accept"},
		{"rule inserted", "insert rule inet dualhomed egress_nat oif eth0 masquerade"},
		{"rule with our comment changed", "flush chain inet dualhomed zones\nadd rule inet dualhomed zones meta nfproto ipv4 iif eth1 ct zone set 1 comment \"eth1: conntrack zone of its clients\"\nadd rule inet dualhomed zones meta nfproto ipv4 iif eth2 ct original zone set 2 comment \"eth2: conntrack zone of its clients\""},
		{"comment changed", "flush chain inet dualhomed egress_nat\nadd rule inet dualhomed egress_nat oif eth0 ct mark 0x00100000/12 snat ip to 10.0.0.10 comment \"eth1: masquerade to the egress\"\nadd rule inet dualhomed egress_nat oif eth0 ct mark 0x00200000/12 snat ip to 10.0.0.10"},
		{"chain added", "add chain inet dualhomed extra"},
		{"set added", "add set inet dualhomed s { type ipv4_addr; }"},
		{"policy drop", "add chain inet dualhomed forward { type filter hook forward priority filter; policy drop; }"},
		{"table dormant", "add table inet dualhomed { flags dormant; }"},
	} {
		t.Run(drift.name, func(t *testing.T) {
			w.apply(t, n)
			if got := w.nftList(t); got != natKTRuleset {
				t.Fatalf("before the drift:\n%s", got)
			}
			w.ns.Run(t, "nft", drift.nft)
			if w.nftList(t) == natKTRuleset {
				t.Fatal("the drift changed nothing nft shows: the case tests nothing")
			}
			if p := w.plan(t, n); len(p.Ops) != 1 || p.Ops[0].NAT == nil {
				t.Fatalf("plan after the drift: %v; want the table written", p)
			}
			w.converge(t, n)
		})
	}
}

// TestNATCompletesAPartialTable starts from a table left half built (as no
// batch of ours can leave it, but a foreign program or an older version
// could): some chains missing, a rule twice, a stray chain. One Apply must
// leave each chain once and each rule once.
func TestNATCompletesAPartialTable(t *testing.T) {
	requireNFT(t)
	w := newNATKTWorld(t)
	n := w.nat()
	w.ns.Run(t, "nft", `table inet dualhomed {
	chain zones {
		type filter hook prerouting priority raw; policy accept;
		meta nfproto ipv4 iif "eth1" ct original zone set 1 comment "eth1: conntrack zone of its clients"
		meta nfproto ipv4 iif "eth1" ct original zone set 1 comment "eth1: conntrack zone of its clients"
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
	}
	chain admit_eth1 {
		counter drop comment "source not allowed"
	}
	chain old {
	}
}`)
	w.converge(t, n)
}

// TestNATForwardingFollowsTheNAT checks that ip_forward is 1 exactly while
// the NAT is configured, and comes back to what it was, whatever that was.
func TestNATForwardingFollowsTheNAT(t *testing.T) {
	for _, original := range []string{"0", "1"} {
		t.Run("ip_forward="+original, func(t *testing.T) {
			w := newNATKTWorld(t)
			w.ns.Sysctl(t, "net/ipv4/ip_forward", original)
			n := w.nat()
			w.apply(t, n)
			if got := w.ns.ReadSysctl(t, "net/ipv4/ip_forward"); got != "1" {
				t.Fatalf("ip_forward with the NAT = %s, want 1", got)
			}
			if p := w.plan(t, n); !p.Empty() {
				t.Fatalf("plan after Apply: %v", p)
			}
			// Another program turns forwarding off: the next Apply turns
			// it back on.
			w.ns.Sysctl(t, "net/ipv4/ip_forward", "0")
			if writes := w.apply(t, n); writes == 0 || w.ns.ReadSysctl(t, "net/ipv4/ip_forward") != "1" {
				t.Fatalf("Apply after ip_forward=0 made %d writes and left ip_forward %s", writes, w.ns.ReadSysctl(t, "net/ipv4/ip_forward"))
			}
			// A restart: a new Kernel finds the record, changes nothing.
			again, err := NewKernel(w.ns.Handle, w.stateDir, DefaultConfig())
			if err != nil {
				t.Fatal(err)
			}
			defer again.Close()
			w.k = again
			if writes := w.apply(t, n); writes != 0 {
				t.Fatalf("Apply after a restart: %d writes, want 0", writes)
			}
			writes, err := again.Cleanup()
			if err != nil {
				t.Fatal(err)
			}
			wantWrites := 1 + 2 // the table, the mark rules
			if original == "0" {
				wantWrites++ // and ip_forward
			}
			if writes != wantWrites {
				t.Errorf("Cleanup made %d writes, want %d", writes, wantWrites)
			}
			if got := w.ns.ReadSysctl(t, "net/ipv4/ip_forward"); got != original {
				t.Errorf("ip_forward after Cleanup = %s, want %s", got, original)
			}
			if got := w.nftList(t); got != "" {
				t.Errorf("table after Cleanup:\n%s", got)
			}
			if writes, err := again.Cleanup(); err != nil || writes != 0 {
				t.Errorf("second Cleanup: %d writes, %v; want 0", writes, err)
			}
			if p := w.plan(t, nil); !p.Empty() {
				t.Errorf("plan without NAT after Cleanup: %v", p)
			}
		})
	}
}
