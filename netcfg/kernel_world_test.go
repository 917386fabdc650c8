package netcfg

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/netcfg/nstest"
	"golang.org/x/sys/unix"
)

// ktWorld is an instance namespace with four fake ENIs eth0..eth3 (veth pairs
// whose peers vpc0..vpc3 live in a router namespace) and a Kernel acting in it.
// eth0 is the primary ENI.
type ktWorld struct {
	ns       *nstest.NS
	router   *nstest.NS
	k        *Kernel
	stateDir string
	idx      map[string]int // link name -> index
}

func ktMAC(n int) string { return fmt.Sprintf("0a:00:00:00:01:%02x", n) }

func newKTWorld(t *testing.T) *ktWorld {
	t.Helper()
	router := nstest.New(t)
	ns := nstest.New(t)
	// No duplicate address detection: a tentative IPv6 address changes its
	// flags a second later, which would make the byte-for-byte dumps racy.
	for _, n := range []*nstest.NS{router, ns} {
		n.Sysctl(t, "net/ipv6/conf/all/accept_dad", "0")
		n.Sysctl(t, "net/ipv6/conf/default/accept_dad", "0")
	}
	w := &ktWorld{ns: ns, router: router, stateDir: t.TempDir(), idx: map[string]int{}}
	for i := range 4 {
		name := fmt.Sprintf("eth%d", i)
		l := ns.Veth(t, name, ktMAC(i), router, fmt.Sprintf("vpc%d", i))
		w.idx[name] = l.Attrs().Index
	}
	w.waitLinkLocal(t)
	k, err := NewKernel(ns.Handle, w.stateDir, DefaultConfig())
	if err != nil {
		t.Fatalf("NewKernel: %v", err)
	}
	t.Cleanup(k.Close)
	w.k = k
	return w
}

// waitLinkLocal waits until every ENI has its IPv6 link-local address. The
// kernel adds it when it learns, asynchronously (linkwatch), that the carrier
// is up; a dump taken before would differ from every later one.
func (w *ktWorld) waitLinkLocal(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		out := w.ns.Run(t, "ip", "-6", "-o", "addr", "show", "scope", "link")
		missing := ""
		for name := range w.idx {
			if !strings.Contains(out, ": "+name+"    inet6 fe80:") {
				missing = name
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s has no IPv6 link-local address after 10s:\n%s", missing, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ip runs `ip args...` inside the instance namespace: the foreign actor.
func (w *ktWorld) ip(t *testing.T, args ...string) {
	t.Helper()
	w.ns.Run(t, "ip", args...)
}

// ktENI describes one ENI for hand-built desired states.
type ktENI struct {
	link      string
	table     int // table and rule priority
	subnet4   string
	ips4      []string
	prefixes4 []string
	subnet6   string
	ips6      []string
	prefixes6 []string
	vpc4      []string // main-table VPC routes via the ENI
	vpc6      []string
}

// state builds the routing model of the issue for enis, by hand (independent
// of Desired).
func (w *ktWorld) state(enis ...ktENI) State {
	var st State
	for _, e := range enis {
		link := w.idx[e.link]
		if e.subnet4 != "" {
			subnet := netip.MustParsePrefix(e.subnet4)
			first := netip.MustParseAddr(e.ips4[0])
			gw := subnet.Addr().Next()
			st.Addrs = append(st.Addrs, Addr{LinkIndex: link, Prefix: netip.PrefixFrom(first, subnet.Bits())})
			for _, ip := range e.ips4[1:] {
				st.Addrs = append(st.Addrs, Addr{LinkIndex: link, Prefix: netip.MustParsePrefix(ip + "/32"), NoPrefixRoute: true})
			}
			st.Routes = append(st.Routes,
				Route{Table: e.table, Dst: subnet, LinkIndex: link, Src: first, ScopeLink: true},
				Route{Table: e.table, Dst: netip.MustParsePrefix("0.0.0.0/0"), Gateway: gw, LinkIndex: link, Src: first})
			for _, v := range e.vpc4 {
				st.Routes = append(st.Routes, Route{Table: MainTable, Dst: netip.MustParsePrefix(v), Gateway: gw, LinkIndex: link, Src: first})
			}
			for _, ip := range e.ips4 {
				st.Rules = append(st.Rules, Rule{Priority: e.table, Src: netip.MustParsePrefix(ip + "/32"), Table: e.table})
			}
			for _, p := range e.prefixes4 {
				st.Rules = append(st.Rules, Rule{Priority: e.table, Src: netip.MustParsePrefix(p), Table: e.table})
			}
		}
		if e.subnet6 != "" {
			for _, ip := range e.ips6 {
				st.Addrs = append(st.Addrs, Addr{LinkIndex: link, Prefix: netip.MustParsePrefix(ip + "/128"), NoPrefixRoute: true})
				st.Rules = append(st.Rules, Rule{Priority: e.table, Src: netip.MustParsePrefix(ip + "/128"), Table: e.table})
			}
			for _, p := range e.prefixes6 {
				st.Rules = append(st.Rules, Rule{Priority: e.table, Src: netip.MustParsePrefix(p), Table: e.table})
			}
			st.Routes = append(st.Routes,
				Route{Table: e.table, Dst: netip.MustParsePrefix(e.subnet6), LinkIndex: link},
				Route{Table: e.table, Dst: netip.MustParsePrefix("::/0"), Gateway: IPv6Gateway, LinkIndex: link})
			for _, v := range e.vpc6 {
				st.Routes = append(st.Routes, Route{Table: MainTable, Dst: netip.MustParsePrefix(v), Gateway: IPv6Gateway,
					LinkIndex: link, Src: netip.MustParseAddr(e.ips6[0])})
			}
		}
		st.RPFilters = append(st.RPFilters, RPFilter{LinkName: e.link, Value: 2})
	}
	st.Sort()
	return st
}

// The three secondary ENIs of the hand-built tests: eth1 and eth2 in VPC B
// (10.1.0.0/16, IPv6 on eth1 with delegated prefixes), eth3 on network card 1
// in VPC C (172.31.0.0/16), whose CIDRs are routed from the main table.
var (
	ktEth1 = ktENI{
		link: "eth1", table: 20001,
		subnet4: "10.1.0.0/24", ips4: []string{"10.1.0.11", "10.1.0.12"}, prefixes4: []string{"10.1.0.64/28"},
		subnet6: "2600:1f18:b::/64", ips6: []string{"2600:1f18:b::11"}, prefixes6: []string{"2600:1f18:b:0:1::/80"},
		vpc4: []string{"10.1.0.0/16"}, vpc6: []string{"2600:1f18:b::/56"},
	}
	ktEth2 = ktENI{
		link: "eth2", table: 20002,
		subnet4: "10.1.1.0/24", ips4: []string{"10.1.1.20"},
	}
	ktEth3 = ktENI{
		link: "eth3", table: 20101,
		subnet4: "172.31.5.0/24", ips4: []string{"172.31.5.30", "172.31.5.31"},
		subnet6: "2600:1f18:c::/64", ips6: []string{"2600:1f18:c::30"},
		vpc4: []string{"172.31.0.0/16"}, vpc6: []string{"2600:1f18:c::/56"},
	}
)

// reconcile applies Diff(Observe().Owned, desired) and returns the writes made.
func (w *ktWorld) reconcile(t *testing.T, desired State) int {
	t.Helper()
	n, err := w.k.Apply(Diff(w.owned(t), desired))
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return n
}

// owned returns Observe().Owned or fails the test.
func (w *ktWorld) owned(t *testing.T) State {
	t.Helper()
	return w.observe(t).Owned
}

// observe returns Observe() or fails the test.
func (w *ktWorld) observe(t *testing.T) Observed {
	t.Helper()
	obs, err := w.k.Observe()
	if err != nil {
		t.Fatalf("Observe: %v", err)
	}
	return obs
}

// ktDump is everything an operator sees of the namespace's routing state,
// printed by iproute2 (independent of our netlink code), plus what iproute2
// 6.1 cannot show: each address's IFA_PROTO, and every rp_filter value.
type ktDump map[string][]string

func (w *ktWorld) dump(t *testing.T) ktDump {
	t.Helper()
	d := ktDump{}
	for name, args := range map[string][]string{
		"rule -4":  {"-d", "-4", "rule", "show"},
		"rule -6":  {"-d", "-6", "rule", "show"},
		"route -4": {"-d", "-4", "route", "show", "table", "all"},
		"route -6": {"-d", "-6", "route", "show", "table", "all"},
		"addr":     {"-d", "-o", "addr", "show"},
	} {
		d[name] = ktLines(w.ns.Run(t, "ip", args...))
	}
	addrs, err := w.k.dump.addrs(unix.AF_UNSPEC)
	if err != nil {
		t.Fatalf("dumping addresses: %v", err)
	}
	sort.Slice(addrs, func(i, j int) bool {
		if addrs[i].LinkIndex != addrs[j].LinkIndex {
			return addrs[i].LinkIndex < addrs[j].LinkIndex
		}
		return addrs[i].Prefix.String() < addrs[j].Prefix.String()
	})
	for _, a := range addrs {
		d["addr proto"] = append(d["addr proto"], fmt.Sprintf("%d %s flags %#x proto %d", a.LinkIndex, a.Prefix, a.Flags, a.Proto))
	}
	for _, l := range []string{"all", "default", "lo", "eth0", "eth1", "eth2", "eth3"} {
		d["rp_filter"] = append(d["rp_filter"], l+"="+w.ns.ReadSysctl(t, "net/ipv4/conf/"+l+"/rp_filter"))
	}
	return d
}

func ktLines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimRight(l, " "); l != "" {
			out = append(out, l)
		}
	}
	return out
}

// sections returns the dump's section names, sorted.
func (d ktDump) sections() []string {
	var names []string
	for n := range d {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// requireContains fails unless every line of want is in got, byte for byte
// (with multiplicity): the objects of want are untouched in got.
func ktRequireContains(t *testing.T, got, want ktDump) {
	t.Helper()
	for _, sec := range want.sections() {
		left := slices.Clone(got[sec])
		for _, l := range want[sec] {
			i := slices.Index(left, l)
			if i < 0 {
				t.Errorf("%s: line changed or gone:\n  %s\nnow:\n  %s", sec, l, strings.Join(got[sec], "\n  "))
				continue
			}
			left = slices.Delete(left, i, i+1)
		}
	}
}

// requireEqual fails unless got and want are identical, section by section.
func ktRequireEqual(t *testing.T, got, want ktDump) {
	t.Helper()
	for _, sec := range append(want.sections(), got.sections()...) {
		if !slices.Equal(got[sec], want[sec]) {
			t.Errorf("%s differs:\n got:\n  %s\n want:\n  %s", sec, strings.Join(got[sec], "\n  "), strings.Join(want[sec], "\n  "))
		}
	}
}

// ktSnapshot is an IMDS snapshot of the world: eth0 primary in VPC A, the
// three secondaries of the hand-built tests.
func ktSnapshot() imds.Snapshot {
	p := netip.MustParsePrefix
	a := netip.MustParseAddr
	return imds.Snapshot{
		PrimaryMAC: ktMAC(0),
		ENIs: []imds.ENI{
			{
				MAC: ktMAC(0), Ready: true, DeviceNumber: 0, InterfaceID: "eni-0", VPCID: "vpc-a", SubnetID: "subnet-a",
				SubnetIPv4CIDR: p("10.0.0.0/24"), VPCIPv4CIDRs: []netip.Prefix{p("10.0.0.0/16")},
				LocalIPv4s: []netip.Addr{a("10.0.0.10"), a("10.0.0.20")},
			},
			{
				MAC: ktMAC(1), Ready: true, DeviceNumber: 1, InterfaceID: "eni-1", VPCID: "vpc-b", SubnetID: "subnet-b1",
				SubnetIPv4CIDR: p("10.1.0.0/24"), VPCIPv4CIDRs: []netip.Prefix{p("10.1.0.0/16")},
				SubnetIPv6CIDRs: []netip.Prefix{p("2600:1f18:b::/64")}, VPCIPv6CIDRs: []netip.Prefix{p("2600:1f18:b::/56")},
				LocalIPv4s:   []netip.Addr{a("10.1.0.11"), a("10.1.0.12")},
				IPv4Prefixes: []netip.Prefix{p("10.1.0.64/28")},
				IPv6s:        []netip.Addr{a("2600:1f18:b::11")},
				IPv6Prefixes: []netip.Prefix{p("2600:1f18:b:0:1::/80")},
			},
			{
				MAC: ktMAC(2), Ready: true, DeviceNumber: 2, InterfaceID: "eni-2", VPCID: "vpc-b", SubnetID: "subnet-b2",
				SubnetIPv4CIDR: p("10.1.1.0/24"), VPCIPv4CIDRs: []netip.Prefix{p("10.1.0.0/16")},
				LocalIPv4s: []netip.Addr{a("10.1.1.20")},
			},
			{
				MAC: ktMAC(3), Ready: true, NetworkCard: 1, DeviceNumber: 1, InterfaceID: "eni-3", VPCID: "vpc-c", SubnetID: "subnet-c",
				SubnetIPv4CIDR: p("172.31.5.0/24"), VPCIPv4CIDRs: []netip.Prefix{p("172.31.0.0/16")},
				SubnetIPv6CIDRs: []netip.Prefix{p("2600:1f18:c::/64")}, VPCIPv6CIDRs: []netip.Prefix{p("2600:1f18:c::/56")},
				LocalIPv4s: []netip.Addr{a("172.31.5.30"), a("172.31.5.31")},
				IPv6s:      []netip.Addr{a("2600:1f18:c::30")},
			},
		},
	}
}

// pipeline runs one reconcile the way the agent does: Observe, Desired,
// Diff against the owned state read by Observe, Apply.
func (w *ktWorld) pipeline(t *testing.T, snap imds.Snapshot) (Result, int) {
	t.Helper()
	obs, err := w.k.Observe()
	if err != nil {
		t.Fatalf("Observe: %v", err)
	}
	res := Desired(snap, obs, DefaultConfig())
	n, err := w.k.Apply(Diff(obs.Owned, res.State))
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return res, n
}
