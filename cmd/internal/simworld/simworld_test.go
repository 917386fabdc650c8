package simworld

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/imds/emulator"
)

func TestEchoRequestChecksum(t *testing.T) {
	b := echoRequest(false, 0x1234, 7)
	// A correct IPv4 ICMP checksum makes the whole message sum to zero.
	if got := checksum(b); got != 0 {
		t.Errorf("checksum over the finished message = %#04x, want 0", got)
	}
	if b[0] != 8 || b[4] != 0x12 || b[5] != 0x34 || b[7] != 7 {
		t.Errorf("echo request header % x", b[:8])
	}
	if v6 := echoRequest(true, 1, 1); v6[0] != 128 || v6[2] != 0 || v6[3] != 0 {
		t.Errorf("ICMPv6 echo request header % x: type 128, checksum left to the kernel", v6[:8])
	}
}

func TestDumpDiffAndGrep(t *testing.T) {
	a := Dump{"-4 rule: 0: from all lookup local", "-4 rule: 20001: from 10.1.1.10 lookup 20001 proto 210"}
	b := Dump{"-4 rule: 0: from all lookup local", "-4 rule: 20002: from 10.0.2.10 lookup 20002 proto 210"}
	slices.Sort(a)
	slices.Sort(b)
	removed, added := a.Diff(b)
	if len(removed) != 1 || removed[0] != a[1] || len(added) != 1 || added[0] != b[1] {
		t.Errorf("Diff = %q, %q", removed, added)
	}
	if r, ad := a.Diff(a); len(r)+len(ad) != 0 {
		t.Errorf("Diff with itself = %q, %q", r, ad)
	}
	if got := a.Grep("rule", "10.1.1.10"); len(got) != 1 {
		t.Errorf("Grep = %q", got)
	}
}

func TestDefaultWorldAddressing(t *testing.T) {
	list, enis := defaultWorld()
	vpcs := map[string]*VPC{}
	for _, v := range list {
		vpcs[v.Name] = v
	}
	if vpcs["A"].CIDR4 != vpcs["C"].CIDR4 || vpcs["A"].Client4 != vpcs["C"].Client4 {
		t.Error("VPC C must overlap VPC A: same CIDR and same client address")
	}
	seen := map[string]bool{}
	for _, e := range enis {
		if !e.VPC.CIDR4.Contains(e.Primary4()) || !e.Subnet4.Contains(e.Gateway4) || e.Gateway4 != e.Subnet4.Masked().Addr().Next() {
			t.Errorf("%s: address %s / gateway %s outside VPC %s subnet %s", e.Link, e.Primary4(), e.Gateway4, e.VPC.CIDR4, e.Subnet4)
		}
		for _, a := range e.IPv6s() {
			if !e.Subnet6.Contains(a) || !e.VPC.CIDR6.Contains(a) {
				t.Errorf("%s: %s outside subnet %s or VPC %s", e.Link, a, e.Subnet6, e.VPC.CIDR6)
			}
		}
		if e.VPC.Client6.IsValid() && !e.VPC.CIDR6.Contains(e.VPC.Client6) {
			t.Errorf("VPC %s: client %s outside %s", e.VPC.Name, e.VPC.Client6, e.VPC.CIDR6)
		}
		for _, k := range []string{e.MAC, e.ID, e.SubnetID, e.Primary4().String()} {
			if seen[k] {
				t.Errorf("%s: %s used twice", e.Link, k)
			}
			seen[k] = true
		}
		if e.Attached() != (e.Link != "eth3") {
			t.Errorf("%s attached=%v", e.Link, e.Attached())
		}
	}
	if !prefixPattern.MatchString("dh123w4-inst") || prefixPattern.MatchString("dualhomed-bench-1") {
		t.Error("prefixPattern must match the world's names and only them")
	}
}

// A world built from an instance has one VPC per VPC ID, each with a client
// inside the VPC but outside every ENI subnet, and serves the instance as given.
func TestInstanceWorldAddressing(t *testing.T) {
	inst := emulator.ExampleInstance(15, 50, 50, 4, 2)
	vpcs, enis := instanceWorld(inst)
	if len(vpcs) != 15 || len(enis) != 15 {
		t.Fatalf("%d VPCs, %d ENIs; want 15 and 15", len(vpcs), len(enis))
	}
	for i, e := range enis {
		if e.Link != "eth"+e.VPC.Name || e.MAC != inst.ENIs[i].MAC || !e.Attached() {
			t.Errorf("ENI %d: link %s in VPC %s, MAC %s, attached %v", i, e.Link, e.VPC.Name, e.MAC, e.Attached())
		}
		if c := e.VPC.Client4; !e.VPC.CIDR4.Contains(c) || e.Subnet4.Contains(c) || c != netip.MustParseAddr(fmt.Sprintf("10.%d.255.50", i)) {
			t.Errorf("ENI %d: client %s not in VPC %s outside subnet %s", i, c, e.VPC.CIDR4, e.Subnet4)
		}
		if d := e.imdsENI(); !slices.Equal(d.LocalIPv4s, inst.ENIs[i].LocalIPv4s) || d.NetworkCard != inst.ENIs[i].NetworkCard {
			t.Errorf("ENI %d: IMDS description differs from the instance's", i)
		}
	}
}

func TestCPUTimeIsTheProcessCPUClock(t *testing.T) {
	// Read for our own process, it must lie between two readings of
	// CLOCK_PROCESS_CPUTIME_ID.
	self, err := os.FindProcess(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	p := &Proc{Name: "self", cmd: &exec.Cmd{Process: self}}
	var before, after unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_PROCESS_CPUTIME_ID, &before); err != nil {
		t.Fatal(err)
	}
	got, err := p.CPUTime()
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.ClockGettime(unix.CLOCK_PROCESS_CPUTIME_ID, &after); err != nil {
		t.Fatal(err)
	}
	if got < time.Duration(before.Nano()) || got > time.Duration(after.Nano()) {
		t.Errorf("CPUTime of our own process = %v, not between %v and %v", got, time.Duration(before.Nano()), time.Duration(after.Nano()))
	}
	if ticks, err := p.CPUTicks(); err != nil || ticks > got+10*time.Millisecond {
		t.Errorf("CPUTicks = %v, %v; want at most the CPU time %v", ticks, err, got)
	}
}

// Each object's key is the ip command that makes it, written as ip prints it.
func TestCommands(t *testing.T) {
	s := State{LinkNames: map[int]string{3: "eth1"}}
	rule := *netlink.NewRule()
	rule.Family = netlink.FAMILY_V6
	rule.Priority = 20001
	rule.Table = 20001
	rule.Protocol = 210
	rule.Src = &net.IPNet{IP: net.ParseIP("2001:db8::10"), Mask: net.CIDRMask(128, 128)}
	if got, want := s.RuleCommand(rule).String(), "ip -6 rule add from 2001:db8::10 lookup 20001 pref 20001 proto 210"; got != want {
		t.Errorf("rule command = %q, want %q", got, want)
	}

	route := netlink.Route{
		Family: netlink.FAMILY_V4, Table: 20001, Type: unix.RTN_UNICAST, Protocol: 210,
		Gw: net.ParseIP("10.1.0.1").To4(), LinkIndex: 3, Src: net.ParseIP("10.1.0.10").To4(),
		Scope: netlink.SCOPE_UNIVERSE,
	}
	if got, want := s.RouteCommand(route).String(), "ip -4 route add default via 10.1.0.1 dev eth1 src 10.1.0.10 table 20001 proto 210 scope 0"; got != want {
		t.Errorf("route command = %q, want %q", got, want)
	}

	a := Addr{LinkIndex: 3, Prefix: netip.MustParsePrefix("2001:db8::10/128"), Flags: unix.IFA_F_NOPREFIXROUTE | unix.IFA_F_NODAD, Proto: 210}
	if got, want := s.AddrCommand(a, true).String(), "ip -6 addr add 2001:db8::10/128 dev eth1 noprefixroute nodad proto 210"; got != want {
		t.Errorf("addr command = %q, want %q", got, want)
	}
	if got := s.AddrCommand(a, false).String(); strings.Contains(got, "proto") {
		t.Errorf("addr command without protocol support = %q", got)
	}
}

func TestWithoutAddrProto(t *testing.T) {
	links := map[int]string{3: "eth1"}
	a := Addr{LinkIndex: 3, Prefix: netip.MustParsePrefix("10.1.0.11/32"), Flags: unix.IFA_F_NOPREFIXROUTE, Proto: 210}
	b := a
	b.Proto = 0
	sa := State{LinkNames: links, Addrs: map[string]Addr{}}
	sb := State{LinkNames: links, Addrs: map[string]Addr{}}
	sa.Addrs[sa.addrKey(a)] = a
	sb.Addrs[sb.addrKey(b)] = b
	if slices.Equal(sa.Dump(), sb.Dump()) {
		t.Error("addresses differing by protocol compare equal")
	}
	if !slices.Equal(sa.WithoutAddrProto().Dump(), sb.WithoutAddrProto().Dump()) {
		t.Error("addresses differing only by protocol differ once the protocol is ignored")
	}
}

// A rule the kernel holds twice is in the dump twice.
func TestDumpKeepsDuplicateRules(t *testing.T) {
	s := State{dups: []string{"ip -4 rule add from 192.0.2.1 lookup 100 pref 100 proto 0"}}
	s.Rules = map[string]netlink.Rule{s.dups[0]: *netlink.NewRule()}
	if d := s.Dump(); len(d) != 2 || d[0] != d[1] {
		t.Errorf("dump %q, want the rule twice", d)
	}
}
