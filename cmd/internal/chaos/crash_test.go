package chaos

import (
	"context"
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

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
	"github.com/dualhomed/dualhomed/imds"
)

// scale is the size of the instance the crash test applies.
type scale struct {
	extraENIs   int // ENIs added beside eth0..eth2 (eth4 onwards)
	addrs       int // IPv4 and IPv6 addresses per secondary ENI
	prefixes    int // delegated prefixes per family per secondary ENI
	kills       int // SIGKILLs
	checkpoints int // converge and compare every this many kills (0: only at the end)
}

// crashScale: the short form keeps `make test` quick; the long form is the
// full scale of the largest single-card instances (15 ENIs, 50+50
// addresses, 2+2 delegated prefixes = 4 per ENI) with 100 kills.
func crashScale() scale {
	return pick(scale{extraENIs: 3, addrs: 50, prefixes: 2, kills: 30, checkpoints: 0},
		scale{extraENIs: 12, addrs: 50, prefixes: 2, kills: 100, checkpoints: 25})
}

// grow makes the world's instance big: eth1 and eth2 get sc.addrs
// addresses and delegated prefixes in IMDS, and sc.extraENIs new ENIs (veths
// whose peers sit in VPC D's router) are attached, each in its own VPC.
func grow(t *testing.T, w *simworld.World, sc scale) {
	t.Helper()
	eth1, eth2 := w.ENI("eth1"), w.ENI("eth2")
	err := w.IMDS.UpdateENI(eth1.MAC, func(e *imds.ENI) {
		e.LocalIPv4s, e.IPv6s = hostsIn(eth1.Subnet4, eth1.Subnet6, sc.addrs)
		e.IPv4Prefixes, e.IPv6Prefixes = prefixesIn(eth1.Subnet4, eth1.Subnet6, sc.prefixes)
	})
	if err != nil {
		t.Fatal(err)
	}
	err = w.IMDS.UpdateENI(eth2.MAC, func(e *imds.ENI) {
		e.LocalIPv4s, _ = hostsIn(eth2.Subnet4, netip.Prefix{}, sc.addrs)
		e.IPv4Prefixes, _ = prefixesIn(eth2.Subnet4, netip.Prefix{}, sc.prefixes)
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range sc.extraENIs {
		addENI(t, w, 4+i, sc.addrs, sc.prefixes)
	}
}

// extraENI is the IMDS description of an ENI added by addENI (device dev >= 4).
func extraENI(dev, addrs, prefixes int) imds.ENI {
	i := dev - 4
	s4 := netip.MustParsePrefix(fmt.Sprintf("10.%d.1.0/24", 20+i))
	s6 := netip.MustParsePrefix(fmt.Sprintf("fd00:e:%x:1::/64", i))
	e := imds.ENI{
		MAC: fmt.Sprintf("02:00:00:00:0e:%02x", dev), Ready: true, DeviceNumber: dev,
		InterfaceID: fmt.Sprintf("eni-0ee%015d", dev), SubnetID: fmt.Sprintf("subnet-0ee%014d", dev),
		VPCID: fmt.Sprintf("vpc-0e%015d", dev), OwnerID: simworld.OwnerID,
		SubnetIPv4CIDR: s4, VPCIPv4CIDRs: []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/16", 20+i))},
		SubnetIPv6CIDRs: []netip.Prefix{s6}, VPCIPv6CIDRs: []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("fd00:e:%x::/56", i))},
	}
	e.LocalIPv4s, e.IPv6s = hostsIn(s4, s6, addrs)
	e.IPv4Prefixes, e.IPv6Prefixes = prefixesIn(s4, s6, prefixes)
	return e
}

// addENI attaches extraENI(dev, ...) in IMDS and adds its link to the instance.
func addENI(t *testing.T, w *simworld.World, dev, addrs, prefixes int) imds.ENI {
	t.Helper()
	e := extraENI(dev, addrs, prefixes)
	if err := w.IMDS.AttachENI(e); err != nil {
		t.Fatal(err)
	}
	addLink(t, w, e)
	return e
}

// addLink adds e's link (a veth whose peer sits in VPC D's router) to the
// instance, up, with its primary address from "DHCP".
func addLink(t *testing.T, w *simworld.World, e imds.ENI) netlink.Link {
	t.Helper()
	inst, router := w.Instance, w.VPCs["D"].Router
	hw, _ := net.ParseMAC(e.MAC)
	la := netlink.NewLinkAttrs()
	la.Name, la.HardwareAddr = fmt.Sprintf("eth%d", e.DeviceNumber), hw
	veth := &netlink.Veth{LinkAttrs: la, PeerName: fmt.Sprintf("x%d", e.DeviceNumber), PeerNamespace: netlink.NsFd(int(router.Handle))}
	if err := inst.NL.LinkAdd(veth); err != nil {
		t.Fatalf("adding %s: %v", la.Name, err)
	}
	l, err := inst.NL.LinkByName(la.Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := inst.NL.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: e.LocalIPv4s[0].AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
		t.Fatal(err)
	}
	if err := inst.NL.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	if p, err := router.NL.LinkByName(veth.PeerName); err != nil || router.NL.LinkSetUp(p) != nil {
		t.Fatalf("setting %s up in %s: %v", veth.PeerName, router.Name, err)
	}
	return l
}

// hostsIn returns n addresses of each subnet, from .10 (IPv4) and ::10 (IPv6) on.
func hostsIn(s4, s6 netip.Prefix, n int) (v4, v6 []netip.Addr) {
	for j := range n {
		if s4.IsValid() {
			a := s4.Masked().Addr().As4()
			a[3] = byte(10 + j)
			v4 = append(v4, netip.AddrFrom4(a))
		}
		if s6.IsValid() {
			a := s6.Masked().Addr().As16()
			a[15] = byte(0x10 + j)
			v6 = append(v6, netip.AddrFrom16(a))
		}
	}
	return v4, v6
}

// prefixesIn returns n delegated /28s (from .128) and /80s of each subnet.
func prefixesIn(s4, s6 netip.Prefix, n int) (p4, p6 []netip.Prefix) {
	for j := range n {
		if s4.IsValid() {
			a := s4.Masked().Addr().As4()
			a[3] = byte(128 + 16*j)
			p4 = append(p4, netip.PrefixFrom(netip.AddrFrom4(a), 28))
		}
		if s6.IsValid() {
			a := s6.Masked().Addr().As16()
			a[9] = byte(1 + j)
			p6 = append(p6, netip.PrefixFrom(netip.AddrFrom16(a), 80))
		}
	}
	return p4, p6
}

// foreignObjects are placed by "other programs" before dualhomed ever runs;
// each must survive everything, byte for byte. One route sits in what will
// be eth1's table (20001): the table is ours, the route is not.
var foreignObjects = [][]string{
	{"-4", "rule", "add", "from", "192.0.2.0/24", "lookup", "100", "priority", "100"},
	{"-6", "rule", "add", "from", "2001:db8:f::/64", "lookup", "100", "priority", "100"},
	{"-4", "rule", "add", "from", "192.0.2.128/25", "lookup", "20001", "priority", "20500"},
	{"-4", "route", "add", "198.51.100.0/24", "via", "10.1.1.1", "dev", "eth1", "table", "100"},
	{"-4", "route", "add", "203.0.113.0/24", "dev", "eth2", "proto", "static"},
	{"-4", "route", "add", "192.0.2.0/24", "via", "10.1.1.1", "dev", "eth1", "table", "20001", "proto", "static"},
	{"-4", "addr", "add", "10.1.1.200/32", "dev", "eth1"},
	{"-6", "addr", "add", "fd00:b:0:1::200/128", "dev", "eth1", "nodad"},
}

func placeForeign(t *testing.T, w *simworld.World) {
	t.Helper()
	for _, args := range foreignObjects {
		if out, err := w.Instance.IP(args...); err != nil {
			t.Fatalf("ip %s: %v %s", strings.Join(args, " "), err, out)
		}
	}
}

// dualhomedCmd is `dualhomed <args>` inside the instance with the world's flags.
func dualhomedCmd(w *simworld.World, args ...string) *exec.Cmd {
	args = append(args, "--config", w.ConfigPath(), "--imds-endpoint", simworld.IMDSEndpoint,
		"--state-dir", w.StateDir(), "--log-format", "json", "--log-level", "warn")
	return w.Instance.Command(context.Background(), dualhomedBin, args...)
}

// runDualhomed runs `dualhomed <args>` to the end and fails t if it fails.
func runDualhomed(t *testing.T, w *simworld.World, args ...string) time.Duration {
	t.Helper()
	start := time.Now()
	if out, err := dualhomedCmd(w, args...).CombinedOutput(); err != nil {
		t.Fatalf("dualhomed %s: %v\n%s", strings.Join(args, " "), err, simworld.Tail(string(out), 20))
	}
	return time.Since(start)
}

// withNAT adds to d the NAT's table, a line per chain and per rule (none
// without it), and ip_forward.
func withNAT(t *testing.T, w *simworld.World, d simworld.Dump) simworld.Dump {
	t.Helper()
	out, _ := w.Instance.Command(context.Background(), "nft", "list", "table", "inet", "dualhomed").Output()
	chain := ""
	for _, l := range strings.Split(string(out), "\n") {
		l = strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(l, "chain "):
			chain = strings.TrimSuffix(l, " {")
			d = append(d, "nft "+chain)
		case l != "" && l != "}" && !strings.HasPrefix(l, "table "):
			d = append(d, "nft "+chain+": "+l)
		}
	}
	var fwd []byte
	if err := w.Instance.Do(func() (err error) { fwd, err = os.ReadFile("/proc/sys/net/ipv4/ip_forward"); return err }); err != nil {
		t.Fatal(err)
	}
	d = append(d, "sysctl net.ipv4.ip_forward="+strings.TrimSpace(string(fwd)))
	slices.Sort(d)
	return d
}

// ruleDuplicates returns the policy rules, and the NAT's chains and rules,
// that appear more than once.
func ruleDuplicates(d simworld.Dump) []string {
	var dup []string
	rules := append(append(d.Grep("ip -4 rule"), d.Grep("ip -6 rule")...), d.Grep("nft ")...)
	for i := 1; i < len(rules); i++ {
		if rules[i] == rules[i-1] {
			dup = append(dup, rules[i])
		}
	}
	return dup
}

// TestCrashes kills `dualhomed apply`, `daemon` and `cleanup` with SIGKILL at
// seeded random points of a large apply. After every kill the rules have no
// duplicates and every foreign object is there; at the checkpoints and at
// the end an uninterrupted apply brings the kernel to exactly the state of
// the reference apply (a full dump, compared line by line, the NAT's table
// and ip_forward included), and plan says in sync.
func TestCrashes(t *testing.T) {
	// With nft to list it, eth1 and eth2 are sources of the shared NAT, and
	// the dumps hold its table and ip_forward.
	_, err := exec.LookPath("nft")
	nat := err == nil
	w := newWorld(t, simworld.Options{NAT: nat})
	r := rng(t)
	sc := crashScale()
	startPrimaryGuard(t, w)
	config := daemonConfig
	if nat {
		config += natConfig
	}
	if err := w.WriteConfig(simworld.DaemonOptions{PollInterval: 2 * time.Second, ExtraConfig: config}); err != nil {
		t.Fatal(err)
	}
	state := func(t *testing.T, w *simworld.World) simworld.Dump {
		t.Helper()
		d := dump(t, w)
		if nat {
			d = withNAT(t, w, d)
		}
		return d
	}
	grow(t, w, sc)
	placeForeign(t, w)
	pristine := state(t, w)
	foreign := dump(t, w) // ip_forward aside, which the NAT turns on

	// The reference: one uninterrupted apply.
	applyTime := runDualhomed(t, w, "apply")
	// plan reads what apply reads and writes nothing: apply's writes
	// happen roughly between planTime and applyTime.
	planTime := runDualhomed(t, w, "plan")
	ref := state(t, w)
	removedSince(t, "the reference apply", foreign, ref)
	ours := len(ref.Grep("proto 210"))
	if natLines := len(ref.Grep("nft ")); nat && natLines == 0 {
		t.Fatal("the reference apply made no NAT table")
	}
	t.Logf("%d+3 ENIs x %d IPv4 + %d IPv6 + %d+%d prefixes: reference apply in %s (plan %s), %d objects of ours, %d lines of the NAT's table",
		sc.extraENIs, sc.addrs, sc.addrs, sc.prefixes, sc.prefixes, applyTime.Round(time.Millisecond), planTime.Round(time.Millisecond), ours, len(ref.Grep("nft ")))
	cleanTime := runDualhomed(t, w, "cleanup")
	if removed, added := state(t, w).Diff(pristine); len(removed)+len(added) > 0 {
		t.Fatalf("cleanup did not restore the pristine state:\n-%s\n+%s", strings.Join(head(removed, 10), "\n-"), strings.Join(head(added, 10), "\n+"))
	}

	converge := func(when string) {
		t.Helper()
		runDualhomed(t, w, "apply")
		if out, err := dualhomedCmd(w, "plan").CombinedOutput(); err != nil {
			t.Fatalf("%s: plan after a clean apply: %v\n%s", when, err, simworld.Tail(string(out), 20))
		}
		removed, added := ref.Diff(state(t, w))
		if len(removed)+len(added) > 0 {
			t.Fatalf("%s: the kernel differs from the reference apply:\n-%s\n+%s", when,
				strings.Join(head(removed, 20), "\n-"), strings.Join(head(added, 20), "\n+"))
		}
	}

	counts, partials := map[string]int{}, map[string]int{}
	midway, partial := 0, 0
	before := state(t, w)
	// The kill window of each operation adapts: a kill that changed nothing
	// came too early (raise its start), one that came after the process
	// finished came too late (lower its end). Kill times are timing, so a
	// replay with the same seed makes the same choices, not the same cuts.
	type window struct{ from, to time.Duration }
	windows := map[string]*window{
		"apply":   {planTime / 2, applyTime + 20*time.Millisecond},
		"daemon":  {planTime / 2, applyTime + 50*time.Millisecond},
		"cleanup": {0, cleanTime + 20*time.Millisecond},
	}
	for i := range sc.kills {
		// Kill what has work to do: cleanup once everything is applied,
		// apply or a daemon otherwise (now and then a cleanup of a partial state).
		var op string
		inSync := slices.Equal(before, ref)
		switch x := r.IntN(100); {
		case inSync || x < 15:
			op = "cleanup"
		case x < 60:
			op = "apply"
		default:
			op = "daemon"
		}
		win := windows[op]
		delay := win.from + time.Duration(r.Int64N(int64(win.to-win.from)+1))
		cmd := dualhomedCmd(w, op)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		killed := false
		select {
		case err := <-done:
			// It finished before the kill: no crash this time, but it must have succeeded.
			if err != nil {
				t.Fatalf("kill %d: dualhomed %s failed on its own: %v", i, op, err)
			}
			if op != "daemon" {
				win.to = max(delay, win.from+time.Millisecond)
			}
		case <-time.After(delay):
			_ = cmd.Process.Kill()
			<-done
			midway++
			killed = true
		}
		counts[op]++
		d := state(t, w)
		switch {
		case !slices.Equal(d, before) && !slices.Equal(d, ref) && !slices.Equal(d, pristine):
			partial++ // killed half way through its changes
			partials[op]++
		case killed && slices.Equal(d, before) && delay < win.to-time.Millisecond:
			win.from = delay // too early: nothing written yet
		}
		before = d
		if dup := ruleDuplicates(d); len(dup) > 0 {
			t.Fatalf("kill %d (%s after %s): duplicate rules:\n  %s", i, op, delay, strings.Join(dup, "\n  "))
		}
		if removedSince(t, fmt.Sprintf("kill %d (%s after %s): foreign objects", i, op, delay), foreign, d) {
			return
		}
		if sc.checkpoints > 0 && (i+1)%sc.checkpoints == 0 {
			converge(fmt.Sprintf("checkpoint after kill %d", i))
			before = state(t, w)
		}
	}
	converge("after the last kill")
	t.Logf("%d SIGKILLs %v: %d while running, %d of them half way through the changes %v; every restart converged to the reference state (%d objects of ours), foreign objects intact",
		sc.kills, counts, midway, partial, partials, ours)
	if partial == 0 {
		t.Errorf("none of %d kills landed half way through the changes: the kill points do not exercise crashes", sc.kills)
	}
}
