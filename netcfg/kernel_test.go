package netcfg

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
	"golang.org/x/sys/unix"
)

// ours returns the lines of d that carry our protocol: the objects we own.
func (d ktDump) ours() []string {
	var out []string
	for _, sec := range d.sections() {
		for _, l := range d[sec] {
			if strings.Contains(l, "proto 210") {
				out = append(out, sec+": "+l)
			}
		}
	}
	return out
}

// The exact objects of the routing model, as iproute2 prints them (and, for
// IFA_PROTO, our own dump: "<ifindex> <prefix> flags <IFA_F_*> proto <n>";
// 0x80 permanent, 0x200 noprefixroute, 0x2 nodad).
var ktThreeENIObjects = []string{
	"addr proto: 3 10.1.0.11/24 flags 0x80 proto 210",
	"addr proto: 3 10.1.0.12/32 flags 0x280 proto 210",
	"addr proto: 3 2600:1f18:b::11/128 flags 0x282 proto 210",
	"addr proto: 4 10.1.1.20/24 flags 0x80 proto 210",
	"addr proto: 5 172.31.5.30/24 flags 0x80 proto 210",
	"addr proto: 5 172.31.5.31/32 flags 0x280 proto 210",
	"addr proto: 5 2600:1f18:c::30/128 flags 0x282 proto 210",
	"route -4: unicast default via 10.1.0.1 dev eth1 table 20001 proto 210 scope global src 10.1.0.11",
	"route -4: unicast 10.1.0.0/24 dev eth1 table 20001 proto 210 scope link src 10.1.0.11",
	"route -4: unicast default via 10.1.1.1 dev eth2 table 20002 proto 210 scope global src 10.1.1.20",
	"route -4: unicast 10.1.1.0/24 dev eth2 table 20002 proto 210 scope link src 10.1.1.20",
	"route -4: unicast default via 172.31.5.1 dev eth3 table 20101 proto 210 scope global src 172.31.5.30",
	"route -4: unicast 172.31.5.0/24 dev eth3 table 20101 proto 210 scope link src 172.31.5.30",
	"route -4: unicast 10.1.0.0/16 via 10.1.0.1 dev eth1 table main proto 210 scope global src 10.1.0.11",
	"route -4: unicast 172.31.0.0/16 via 172.31.5.1 dev eth3 table main proto 210 scope global src 172.31.5.30",
	"route -6: unicast 2600:1f18:b::/64 dev eth1 table 20001 proto 210 scope global metric 1024 pref medium",
	"route -6: unicast default via fe80:ec2::1 dev eth1 table 20001 proto 210 scope global metric 1024 pref medium",
	"route -6: unicast 2600:1f18:c::/64 dev eth3 table 20101 proto 210 scope global metric 1024 pref medium",
	"route -6: unicast default via fe80:ec2::1 dev eth3 table 20101 proto 210 scope global metric 1024 pref medium",
	"route -6: unicast 2600:1f18:b::/56 via fe80:ec2::1 dev eth1 table main proto 210 scope global src 2600:1f18:b::11 metric 1024 pref medium",
	"route -6: unicast 2600:1f18:c::/56 via fe80:ec2::1 dev eth3 table main proto 210 scope global src 2600:1f18:c::30 metric 1024 pref medium",
	"rule -4: 20001:\tfrom 10.1.0.11 lookup 20001 proto 210",
	"rule -4: 20001:\tfrom 10.1.0.12 lookup 20001 proto 210",
	"rule -4: 20001:\tfrom 10.1.0.64/28 lookup 20001 proto 210",
	"rule -4: 20002:\tfrom 10.1.1.20 lookup 20002 proto 210",
	"rule -4: 20101:\tfrom 172.31.5.30 lookup 20101 proto 210",
	"rule -4: 20101:\tfrom 172.31.5.31 lookup 20101 proto 210",
	"rule -6: 20001:\tfrom 2600:1f18:b::11 lookup 20001 proto 210",
	"rule -6: 20001:\tfrom 2600:1f18:b:0:1::/80 lookup 20001 proto 210",
	"rule -6: 20101:\tfrom 2600:1f18:c::30 lookup 20101 proto 210",
}

func TestApplyInstallsExactlyTheModel(t *testing.T) {
	w := newKTWorld(t)
	desired := w.state(ktEth1, ktEth2, ktEth3)
	plan := Diff(State{}, desired)
	writes, err := w.k.Apply(plan)
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	// One write per object: 7 addresses, 14 routes, 9 rules, 3 rp_filters.
	if writes != len(plan.Ops) || writes != 33 {
		t.Errorf("cold apply made %d writes for %d ops, want 33", writes, len(plan.Ops))
	}
	d := w.dump(t)
	got := d.ours()
	if !slices.Equal(got, ktThreeENIObjects) {
		t.Errorf("objects with our protocol:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(ktThreeENIObjects, "\n  "))
	}
	for _, l := range []string{"eth1=2", "eth2=2", "eth3=2", "eth0=0"} {
		if !slices.Contains(d["rp_filter"], l) {
			t.Errorf("rp_filter %s missing: %v", l, d["rp_filter"])
		}
	}
	if owned := w.owned(t); !owned.Equal(desired) {
		t.Errorf("Observe().Owned differs from what was applied:\n%s", Diff(owned, desired))
	}
}

func TestSecondReconcileMakesNoWrites(t *testing.T) {
	w := newKTWorld(t)
	desired := w.state(ktEth1, ktEth2, ktEth3)
	if n := w.reconcile(t, desired); n == 0 {
		t.Fatal("first reconcile made no writes")
	}
	if plan := Diff(w.owned(t), desired); !plan.Empty() {
		t.Fatalf("Diff(Observe().Owned, desired) after Apply is not empty:\n%s", plan)
	}
	before := w.dump(t)
	if n := w.reconcile(t, desired); n != 0 {
		t.Errorf("second reconcile made %d writes, want 0", n)
	}
	if n, err := w.k.Apply(Plan{}); n != 0 || err != nil {
		t.Errorf("empty plan: %d writes, %v", n, err)
	}
	ktRequireEqual(t, w.dump(t), before)
}

// placeForeign configures the namespace the way DHCP, an operator and other
// tools would, before dualhomed starts: addresses on every ENI, main-table
// routes, routes and rules inside our bands without our protocol, our
// protocol outside our bands, rp_filter values.
func (w *ktWorld) placeForeign(t *testing.T) {
	t.Helper()
	for _, args := range [][]string{
		// DHCP: the primary's address and default route, the secondaries' first addresses.
		{"addr", "add", "10.0.0.10/24", "dev", "eth0"},
		{"addr", "add", "10.1.0.11/24", "dev", "eth1"},
		{"addr", "add", "172.31.5.30/24", "dev", "eth3"},
		{"-6", "addr", "add", "2600:1f18:c::30/128", "dev", "eth3", "nodad"},
		{"addr", "add", "192.168.77.1/32", "dev", "eth2"}, // an operator's address
		{"route", "add", "default", "via", "10.0.0.1", "dev", "eth0", "proto", "dhcp", "src", "10.0.0.10", "metric", "100"},
		// Main table, another tool's routes, one to the same VPC CIDR as ours.
		{"route", "add", "198.51.100.0/24", "via", "10.0.0.1", "dev", "eth0", "proto", "static"},
		{"route", "add", "172.31.0.0/16", "via", "10.0.0.1", "dev", "eth0", "proto", "static", "metric", "500"},
		{"-6", "route", "add", "2001:db8:ff::/48", "via", "fe80::1", "dev", "eth0", "proto", "static"},
		// Inside our table band, without our protocol: in a table we use and in one we do not.
		{"route", "add", "192.0.2.0/24", "via", "10.1.0.1", "dev", "eth1", "table", "20001", "proto", "static"},
		{"-6", "route", "add", "2001:db8:1::/64", "dev", "eth1", "table", "20001", "proto", "static"},
		{"route", "add", "default", "dev", "eth2", "table", "20077", "proto", "boot"},
		// Our protocol outside our bands.
		{"route", "add", "10.77.0.0/16", "dev", "eth1", "table", "100", "proto", "210"},
		{"rule", "add", "priority", "100", "from", "10.1.0.77", "lookup", "100", "proto", "210"},
		// Rules inside our priority band without our protocol, one the twin of ours.
		{"rule", "add", "priority", "20001", "from", "10.1.0.99", "lookup", "20001", "proto", "static"},
		{"rule", "add", "priority", "20001", "from", "10.1.0.11", "lookup", "20001"},
		{"rule", "add", "priority", "20150", "lookup", "20150", "proto", "static"},
		{"-6", "rule", "add", "priority", "20001", "from", "2600:1f18:b::99", "lookup", "20001", "proto", "static"},
		// ec2-net-utils' rule for the same source, before ours.
		{"rule", "add", "priority", "10001", "from", "10.1.0.11", "lookup", "10001"},
	} {
		w.ip(t, args...)
	}
	w.ns.Sysctl(t, "net/ipv4/conf/eth0/rp_filter", "1")
	w.ns.Sysctl(t, "net/ipv4/conf/eth1/rp_filter", "1")
}

func TestForeignObjectsSurviveApplyAndCleanup(t *testing.T) {
	w := newKTWorld(t)
	w.placeForeign(t)
	before := w.dump(t)

	res, writes := w.pipeline(t, ktSnapshot())
	t.Logf("cold reconcile over foreign state: %d writes, warnings %v", writes, res.Warnings)
	during := w.dump(t)
	rpBefore := before["rp_filter"]
	delete(before, "rp_filter") // ours to change
	ktRequireContains(t, during, before)
	before["rp_filter"] = rpBefore
	if want := []string{"all=0", "default=0", "lo=0", "eth0=1", "eth1=2", "eth2=2", "eth3=2"}; !slices.Equal(during["rp_filter"], want) {
		t.Errorf("rp_filter during: %v, want %v", during["rp_filter"], want)
	}

	// Exactly the desired objects are ours: no foreign object was claimed.
	owned := w.owned(t)
	if !owned.Equal(res.State) {
		t.Errorf("Observe().Owned is not the desired state:\n%s", Diff(owned, res.State))
	}
	for _, a := range owned.Addrs {
		switch a.Prefix.String() {
		case "10.0.0.10/24", "10.1.0.11/24", "172.31.5.30/24", "2600:1f18:c::30/128", "192.168.77.1/32":
			t.Errorf("foreign address %v claimed as ours", a)
		}
	}
	// Desired wanted the missing addresses only.
	for _, p := range []string{"10.0.0.20/32", "10.1.0.12/32", "2600:1f18:b::11/128", "10.1.1.20/24", "172.31.5.31/32"} {
		if !slices.ContainsFunc(owned.Addrs, func(a Addr) bool { return a.Prefix.String() == p }) {
			t.Errorf("address %s not added", p)
		}
	}

	if _, n := w.pipeline(t, ktSnapshot()); n != 0 {
		t.Errorf("second reconcile made %d writes, want 0", n)
	}

	if _, err := w.k.Cleanup(); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	ktRequireEqual(t, w.dump(t), before)
}

func TestRemovingAnENIRemovesExactlyItsObjects(t *testing.T) {
	w := newKTWorld(t)
	w.placeForeign(t)
	all := w.state(ktEth1, ktEth2, ktEth3)
	// Foreign addresses are not ours to add.
	all.Addrs = slices.DeleteFunc(all.Addrs, func(a Addr) bool {
		s := a.Prefix.String()
		return s == "10.1.0.11/24" || s == "172.31.5.30/24" || s == "2600:1f18:c::30/128"
	})
	w.reconcile(t, all)
	with := w.dump(t)

	without := w.state(ktEth1, ktEth3)
	without.Addrs = slices.DeleteFunc(without.Addrs, func(a Addr) bool {
		s := a.Prefix.String()
		return s == "10.1.0.11/24" || s == "172.31.5.30/24" || s == "2600:1f18:c::30/128"
	})
	w.reconcile(t, without)
	after := w.dump(t)

	if owned := w.owned(t); !owned.Equal(without) {
		t.Errorf("Observe().Owned after removing eth2:\n%s", Diff(owned, without))
	}
	// Nothing appeared, and what went away is eth2's objects and what the
	// kernel derived from its address, nothing else.
	gone, appeared := ktChanges(with, after)
	if len(appeared) != 0 {
		t.Errorf("lines appeared when removing eth2:\n  %s", strings.Join(appeared, "\n  "))
	}
	wantGone := []string{
		"addr proto: 4 10.1.1.20/24 flags 0x80 proto 210",
		"addr: 4: eth2    inet 10.1.1.20/24 brd 10.1.1.255 scope global eth2\\       valid_lft forever preferred_lft forever",
		"route -4: broadcast 10.1.1.255 dev eth2 table local proto kernel scope link src 10.1.1.20",
		"route -4: local 10.1.1.20 dev eth2 table local proto kernel scope host src 10.1.1.20",
		"route -4: unicast 10.1.1.0/24 dev eth2 table 20002 proto 210 scope link src 10.1.1.20",
		"route -4: unicast 10.1.1.0/24 dev eth2 table main proto kernel scope link src 10.1.1.20",
		"route -4: unicast default via 10.1.1.1 dev eth2 table 20002 proto 210 scope global src 10.1.1.20",
		"rp_filter: eth2=2",
		"rule -4: 20002:\tfrom 10.1.1.20 lookup 20002 proto 210",
	}
	if !slices.Equal(gone, wantGone) {
		t.Errorf("lines gone when removing eth2:\n  %s\nwant:\n  %s", strings.Join(gone, "\n  "), strings.Join(wantGone, "\n  "))
	}
	if got := w.ns.ReadSysctl(t, "net/ipv4/conf/eth2/rp_filter"); got != "0" {
		t.Errorf("eth2 rp_filter = %s, want its original 0", got)
	}
	if got := w.ns.ReadSysctl(t, "net/ipv4/conf/eth1/rp_filter"); got != "2" {
		t.Errorf("eth1 rp_filter = %s, want 2", got)
	}
}

// ktChanges returns the lines (prefixed with their section) only in before
// and only in after, sorted, counting duplicates. rp_filter lines appear as
// changes of value.
func ktChanges(before, after ktDump) (gone, appeared []string) {
	secs := append(before.sections(), after.sections()...)
	slices.Sort(secs)
	for _, sec := range slices.Compact(secs) {
		left := slices.Clone(after[sec])
		for _, l := range before[sec] {
			if i := slices.Index(left, l); i >= 0 {
				left = slices.Delete(left, i, i+1)
			} else {
				gone = append(gone, sec+": "+l)
			}
		}
		for _, l := range left {
			if sec != "rp_filter" {
				appeared = append(appeared, sec+": "+l)
			}
		}
	}
	slices.Sort(gone)
	slices.Sort(appeared)
	return gone, appeared
}

func TestCleanupRestoresTheNamespace(t *testing.T) {
	w := newKTWorld(t)
	w.ns.Sysctl(t, "net/ipv4/conf/eth3/rp_filter", "1")
	before := w.dump(t)
	w.reconcile(t, w.state(ktEth1, ktEth2, ktEth3))
	writes, err := w.k.Cleanup()
	if err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	if writes != 33 {
		t.Errorf("cleanup made %d writes, want 33 (one per object)", writes)
	}
	ktRequireEqual(t, w.dump(t), before)
	if owned := w.owned(t); !owned.Empty() {
		t.Errorf("Observe().Owned after cleanup: %+v", owned)
	}
	orig, err := w.k.originals(rpFilterStateFile)
	if err != nil || len(orig) != 0 {
		t.Errorf("rp_filter records after cleanup: %v, %v", orig, err)
	}
	if n, err := w.k.Cleanup(); n != 0 || err != nil {
		t.Errorf("second cleanup: %d writes, %v", n, err)
	}
}

func TestApplyIsIdempotent(t *testing.T) {
	w := newKTWorld(t)
	desired := w.state(ktEth1, ktEth3)
	adds := Diff(State{}, desired)
	for i := range 2 {
		if _, err := w.k.Apply(adds); err != nil {
			t.Fatalf("adding everything, round %d: %v", i, err)
		}
	}
	dels := Diff(desired, State{})
	for i := range 2 {
		if _, err := w.k.Apply(dels); err != nil {
			t.Fatalf("deleting everything, round %d: %v", i, err)
		}
	}
	if owned := w.owned(t); !owned.Empty() {
		t.Errorf("Observe().Owned after deleting everything: %+v", owned)
	}
}

func TestFailedAddBlocksEveryDelete(t *testing.T) {
	w := newKTWorld(t)
	old := w.state(ktEth2)
	w.reconcile(t, old)
	before := w.dump(t)

	good := Rule{Priority: 20001, Src: netip.MustParsePrefix("10.1.0.11/32"), Table: 20001}
	bad := Route{Table: 20001, Dst: netip.MustParsePrefix("10.9.0.0/16"), LinkIndex: 9999}
	plan := Diff(old, State{Rules: []Rule{good}, Routes: []Route{bad}})
	_, err := w.k.Apply(plan)
	if err == nil {
		t.Fatal("Apply with a route on a missing link succeeded")
	}
	for _, want := range []string{"adding route 10.9.0.0/16 dev #9999 table 20001", "skipping"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	// The other addition went through; nothing of the old state was deleted.
	after := w.dump(t)
	ktRequireContains(t, after, before)
	if !slices.Contains(after["rule -4"], "20001:\tfrom 10.1.0.11 lookup 20001 proto 210") {
		t.Errorf("the good rule was not added despite the bad route:\n%s", strings.Join(after["rule -4"], "\n"))
	}
}

func TestAddrOwnershipInStateFileWithoutIFAProto(t *testing.T) {
	w := newKTWorld(t)
	w.k.addrProto = false                                 // as on a kernel before 5.18
	w.ip(t, "addr", "add", "10.1.0.12/32", "dev", "eth1") // foreign, same as one we want
	before := w.dump(t)

	desired := w.state(ktEth1)
	if _, err := w.k.Apply(Diff(State{}, desired)); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	owned := w.owned(t)
	want := slices.DeleteFunc(slices.Clone(desired.Addrs), func(a Addr) bool { return a.Prefix.String() == "10.1.0.12/32" })
	if !slices.Equal(owned.Addrs, want) {
		t.Errorf("owned addresses from the state file:\n  %v\nwant\n  %v", owned.Addrs, want)
	}
	for _, l := range w.dump(t)["addr proto"] {
		if strings.Contains(l, "proto 210") {
			t.Errorf("address marked with IFA_PROTO in fallback mode: %s", l)
		}
	}
	b, err := os.ReadFile(filepath.Join(w.stateDir, addrRecords.name))
	if err != nil || !strings.Contains(string(b), "10.1.0.11/24") || strings.Contains(string(b), "10.1.0.12") {
		t.Errorf("state file: %q, %v", b, err)
	}

	// Somebody else deletes one of our addresses and adds it back: the
	// record is pruned at the next Apply, and the address is not ours.
	w.ip(t, "addr", "del", "10.1.0.11/24", "dev", "eth1")
	if _, err := w.k.Apply(Plan{}); err != nil {
		t.Fatalf("empty Apply: %v", err)
	}
	w.ip(t, "addr", "add", "10.1.0.11/24", "dev", "eth1")
	if slices.ContainsFunc(w.owned(t).Addrs, func(a Addr) bool { return a.Prefix.String() == "10.1.0.11/24" }) {
		t.Error("an address re-added by somebody else is claimed from a stale record")
	}
	w.ip(t, "addr", "del", "10.1.0.11/24", "dev", "eth1")

	if _, err := w.k.Cleanup(); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	// Deleting 10.1.0.11/24 flushed the routes using it as source; what is left must go.
	ktRequireEqual(t, w.dump(t), before)
}

func TestKernelMarksAddressesWithIFAProto(t *testing.T) {
	w := newKTWorld(t)
	if !w.k.addrProto {
		t.Skip("kernel before 5.18: no IFA_PROTO")
	}
	if _, err := w.k.Apply(Diff(State{}, w.state(ktEth2))); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(w.stateDir, addrRecords.name)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("address state file written although the kernel records IFA_PROTO: %v", err)
	}
	addrs, err := w.k.dump.addrs(unix.AF_UNSPEC)
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(addrs, func(a kernelAddr) bool { return a.Prefix.String() == "10.1.1.20/24" })
	if i < 0 || addrs[i].Proto != DefaultProtocol {
		t.Fatalf("10.1.1.20/24 not dumped with IFA_PROTO %d: %+v", DefaultProtocol, addrs)
	}
}

func TestLinkRemovedUnderUs(t *testing.T) {
	w := newKTWorld(t)
	w.reconcile(t, w.state(ktEth1, ktEth2))
	link, err := w.ns.NL.LinkByName("eth2")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.ns.NL.LinkDel(link); err != nil {
		t.Fatal(err)
	}
	owned := w.owned(t)
	for _, r := range owned.Routes {
		if r.Table == 20002 {
			t.Errorf("route of the deleted link still owned: %v", r)
		}
	}
	if !slices.ContainsFunc(owned.Rules, func(r Rule) bool { return r.Table == 20002 }) {
		t.Fatal("the kernel dropped the rules of the deleted link: the test lost its point")
	}
	// What Desired wants once the link is gone: eth2's rules removed.
	if _, err := w.k.Apply(Diff(owned, w.state(ktEth1))); err != nil {
		t.Fatalf("Apply after the link vanished: %v", err)
	}
	if owned := w.owned(t); !owned.Equal(w.state(ktEth1)) {
		t.Errorf("owned after the link vanished:\n%s", Diff(owned, w.state(ktEth1)))
	}
	if _, err := w.k.Cleanup(); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
}

func TestReplaceKeepsTheObjectsInPlace(t *testing.T) {
	w := newKTWorld(t)
	// No main-table VPC routes: with noprefixroute their gateway would be
	// unreachable from main (Desired never asks for both at once).
	eth1 := ktEth1
	eth1.vpc4, eth1.vpc6 = nil, nil
	desired := w.state(eth1)
	w.reconcile(t, desired)

	// The subnet starts overlapping another ENI's: the first IPv4 becomes
	// noprefixroute. IPv4 needs delete + add; the routes using it as source
	// must come back in the same Apply.
	changed := desired
	changed.Addrs = slices.Clone(desired.Addrs)
	for i := range changed.Addrs {
		if changed.Addrs[i].Prefix.String() == "10.1.0.11/24" {
			changed.Addrs[i].NoPrefixRoute = true
		}
	}
	// And the table's default route moves to another gateway.
	changed.Routes = slices.Clone(desired.Routes)
	for i, r := range changed.Routes {
		if r.Table == 20001 && r.Dst.Bits() == 0 && r.Dst.Addr().Is4() {
			changed.Routes[i].Gateway = netip.MustParseAddr("10.1.0.5")
		}
	}
	plan := Diff(w.owned(t), changed)
	for _, op := range plan.Ops {
		if !op.Replace {
			t.Fatalf("expected only replacements, got %s", op)
		}
	}
	if _, err := w.k.Apply(plan); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if owned := w.owned(t); !owned.Equal(changed) {
		t.Errorf("owned after replace:\n%s", Diff(owned, changed))
	}
	main := w.dump(t)["route -4"]
	if slices.Contains(main, "unicast 10.1.0.0/24 dev eth1 table main proto kernel scope link src 10.1.0.11") {
		t.Errorf("prefix route still in main after noprefixroute:\n%s", strings.Join(main, "\n"))
	}
	if n := w.reconcile(t, changed); n != 0 {
		t.Errorf("reconcile after replace made %d writes", n)
	}

	// With another address on the same subnet, deleting ours could delete
	// it too: the flag change is refused and the other address stays.
	w.ip(t, "addr", "add", "10.1.0.50/24", "dev", "eth1")
	if _, err := w.k.Apply(Diff(w.owned(t), desired)); err == nil || !strings.Contains(err.Error(), "10.1.0.50/24") {
		t.Errorf("flag change next to a foreign secondary: %v", err)
	}
	if !slices.ContainsFunc(w.dump(t)["addr"], func(l string) bool { return strings.Contains(l, "10.1.0.50/24") }) {
		t.Error("the foreign secondary address is gone")
	}
}

func TestPipelineFromSnapshot(t *testing.T) {
	w := newKTWorld(t)
	res, writes := w.pipeline(t, ktSnapshot())
	if len(res.Warnings) != 0 {
		t.Errorf("warnings: %v", res.Warnings)
	}
	t.Logf("cold reconcile of the 4-ENI snapshot: %d writes", writes)
	// Desired and the hand-built model agree on the secondaries; the primary
	// gets its addresses only.
	want := w.state(ktEth1, ktEth2, ktEth3)
	eth0 := w.idx["eth0"]
	want.Addrs = append(want.Addrs,
		Addr{LinkIndex: eth0, Prefix: netip.MustParsePrefix("10.0.0.10/24")},
		Addr{LinkIndex: eth0, Prefix: netip.MustParsePrefix("10.0.0.20/32"), NoPrefixRoute: true})
	for i, dev := range []string{"device-number-0", "device-number-1", "device-number-2", "device-number-1.1"} {
		link := w.idx[fmt.Sprintf("eth%d", i)]
		want.AltNames = append(want.AltNames, AltName{LinkIndex: link, Name: fmt.Sprintf("eni-%d", i)}, AltName{LinkIndex: link, Name: dev})
	}
	want.Sort()
	if owned := w.owned(t); !owned.Equal(want) {
		t.Errorf("owned after the pipeline vs the hand-built model:\n%s", Diff(owned, want))
	}
	if _, n := w.pipeline(t, ktSnapshot()); n != 0 {
		t.Errorf("second reconcile made %d writes", n)
	}
	// eth2 detached: IMDS no longer lists it.
	snap := ktSnapshot()
	snap.ENIs = slices.DeleteFunc(snap.ENIs, func(e imds.ENI) bool { return e.MAC == ktMAC(2) })
	w.pipeline(t, snap)
	for _, r := range w.owned(t).Rules {
		if r.Table == 20002 {
			t.Errorf("rule of the detached ENI left: %v", r)
		}
	}
	if names := w.altNames(t, "eth2"); len(names) != 0 {
		t.Errorf("altnames of the detached ENI's link left: %v", names)
	}
}

func TestParseRelease(t *testing.T) {
	for _, tc := range []struct {
		in           string
		major, minor int
		ok           bool
	}{
		{"6.18.44-fc-v657", 6, 18, true},
		{"5.18.0", 5, 18, true},
		{"5.4.0-1103-aws", 5, 4, true},
		{"4.14.355-276.639.amzn2.x86_64", 4, 14, true},
		{"6.1+custom", 6, 1, true},
		{"garbage", 0, 0, false},
	} {
		major, minor, ok := parseRelease(tc.in)
		if major != tc.major || minor != tc.minor || ok != tc.ok {
			t.Errorf("parseRelease(%q) = %d, %d, %v", tc.in, major, minor, ok)
		}
	}
}

func TestNewKernelRefusesUnsafeConfig(t *testing.T) {
	w := newKTWorld(t)
	for name, mod := range map[string]func(*Config){
		"kernel protocol": func(c *Config) { c.Protocol = 4 }, // static: we would claim the operator's routes
		"band over main":  func(c *Config) { c.TableBase = 200 },
		"no stride":       func(c *Config) { c.CardStride = 0 },
	} {
		cfg := DefaultConfig()
		mod(&cfg)
		if k, err := NewKernel(w.ns.Handle, t.TempDir(), cfg); err == nil {
			k.Close()
			t.Errorf("%s: NewKernel accepted %+v", name, cfg)
		}
	}
	if _, err := NewKernel(w.ns.Handle, "", DefaultConfig()); err == nil {
		t.Error("NewKernel accepted an empty state directory")
	}
}

func TestOwnedIgnoresOurProtocolOutsideOurBands(t *testing.T) {
	w := newKTWorld(t)
	w.ip(t, "addr", "add", "10.1.0.11/24", "dev", "eth1")
	for _, args := range [][]string{
		{"route", "add", "10.77.0.0/16", "dev", "eth1", "table", "100", "proto", "210"},
		{"route", "add", "10.78.0.0/16", "dev", "eth1", "table", "19999", "proto", "210"},
		{"route", "add", "10.79.0.0/16", "dev", "eth1", "table", "23200", "proto", "210"}, // 20000 + 100*32
		{"rule", "add", "priority", "100", "from", "10.1.0.77", "lookup", "100", "proto", "210"},
		{"rule", "add", "priority", "23200", "from", "10.1.0.78", "lookup", "20001", "proto", "210"},
		{"rule", "add", "priority", "20001", "from", "10.1.0.79", "lookup", "20001", "proto", "static"},
		{"route", "add", "10.80.0.0/16", "dev", "eth1", "table", "20001", "proto", "static"},
	} {
		w.ip(t, args...)
	}
	if owned := w.owned(t); !owned.Empty() {
		t.Errorf("Observe().Owned claims foreign objects: %+v", owned)
	}
	// At the edges of the bands, with our protocol: ours.
	w.ip(t, "route", "add", "10.81.0.0/16", "dev", "eth1", "table", "23199", "proto", "210")
	w.ip(t, "rule", "add", "priority", "20000", "from", "10.1.0.80", "lookup", "20000", "proto", "210")
	owned := w.owned(t)
	if len(owned.Routes) != 1 || owned.Routes[0].Table != 23199 || len(owned.Rules) != 1 || owned.Rules[0].Priority != 20000 {
		t.Errorf("Observe().Owned at the band edges: %+v", owned)
	}
}

func TestLinkDownDoesNotBlockOtherLinksDeletions(t *testing.T) {
	w := newKTWorld(t)
	w.reconcile(t, w.state(ktEth2))
	eth1, err := w.ns.NL.LinkByName("eth1")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.ns.NL.LinkSetDown(eth1); err != nil {
		t.Fatal(err)
	}
	// eth2 is detached while eth1, newly attached, is still down.
	want := w.state(ktEth1)
	_, err = w.k.Apply(Diff(w.owned(t), want))
	if err == nil || !strings.Contains(err.Error(), "is down") || strings.Contains(err.Error(), "skipping") {
		t.Fatalf("Apply with eth1 down: %v", err)
	}
	if slices.ContainsFunc(w.owned(t).Rules, func(r Rule) bool { return r.Table == 20002 }) {
		t.Error("eth2's rules kept because eth1 is down")
	}
	if err := w.ns.NL.LinkSetUp(eth1); err != nil {
		t.Fatal(err)
	}
	w.reconcile(t, want)
	if owned := w.owned(t); !owned.Equal(want) {
		t.Errorf("after eth1 came up:\n%s", Diff(owned, want))
	}
}

func TestReadsRunAlongsideApply(t *testing.T) {
	w := newKTWorld(t)
	desired := w.state(ktEth1, ktEth2, ktEth3)
	done := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		defer close(errc)
		for {
			select {
			case <-done:
				return
			default:
			}
			obs, err := w.k.Observe()
			if err != nil {
				errc <- err
				return
			}
			Conflicts(obs, desired, DefaultConfig())
		}
	}()
	for range 3 {
		w.reconcile(t, desired)
		if _, err := w.k.Cleanup(); err != nil {
			t.Fatalf("Cleanup: %v", err)
		}
	}
	close(done)
	if err := <-errc; err != nil {
		t.Fatalf("Observe during Apply: %v", err)
	}
	w.reconcile(t, desired)
	if owned := w.owned(t); !owned.Equal(desired) {
		t.Errorf("owned after concurrent use:\n%s", Diff(owned, desired))
	}
}

// Conflicts reports what a fresh Observe read: a foreign rule or route
// added after an earlier Observe is reported.
func TestConflictsAfterObserveSeesLaterChanges(t *testing.T) {
	w := newKTWorld(t)
	desired := w.state(ktEth1, ktEth2, ktEth3)
	w.reconcile(t, desired)
	if warns := Conflicts(w.observe(t), desired, DefaultConfig()); len(warns) != 0 {
		t.Fatalf("warnings on an instance with only our state: %v", warns)
	}
	w.ip(t, "rule", "add", "priority", "50", "from", "10.1.0.12", "lookup", "101")
	warns := Conflicts(w.observe(t), desired, DefaultConfig())
	if len(warns) != 1 || !strings.Contains(warns[0].Message, "foreign rule `50: from 10.1.0.12/32 lookup 101`") {
		t.Errorf("after a foreign rule was added: %v, want its warning", warns)
	}

	// A route, in our band, added after Observe.
	w.ip(t, "route", "add", "default", "dev", "eth2", "table", "20077", "proto", "boot")
	warns = Conflicts(w.observe(t), desired, DefaultConfig())
	found := false
	for _, wn := range warns {
		found = found || strings.Contains(wn.Message, "table 20077, in dualhomed's band, holds foreign routes: 0.0.0.0/0 (protocol 3)")
	}
	if !found {
		t.Errorf("after a foreign route was added: %v, want its warning", warns)
	}
}

// Issue 13 (coexistence change 8): amazon-ec2-net-utils moves a secondary
// ENI's subnet route out of main, and the kernel refuses our VPC route in
// main through that subnet's gateway (ENETUNREACH). The refusal is a
// Refused with its reason; the deletions of other tables (a detached ENI's
// rules, routes and address) run, and only main's wait for the refused add
// (make before break).
func TestRefusedAddHoldsBackOnlyItsTablesDeletions(t *testing.T) {
	w := newKTWorld(t)
	w.reconcile(t, w.state(ktEth1, ktEth2))
	w.ip(t, "route", "del", "10.1.0.0/16", "table", "main")
	w.ip(t, "route", "del", "10.1.0.0/24", "dev", "eth1", "table", "main")
	w.ip(t, "route", "add", "10.5.0.0/16", "dev", "eth1", "table", "main", "proto", "210") // ours, not wanted

	want := w.state(ktEth1) // eth2 detached from the ENI
	_, err := w.k.Apply(Diff(w.owned(t), want))
	refused, rest := Refusals(err)
	if len(refused) != 1 || refused[0].Op.Route.Dst.String() != "10.1.0.0/16" {
		t.Fatalf("refused additions %v (error %v); want the VPC route 10.1.0.0/16 in main", refused, err)
	}
	if r := refused[0].Reason(); r != "network is unreachable: no route in table 254 reaches 10.1.0.1" {
		t.Errorf("reason %q", r)
	}
	if rest == nil || !strings.Contains(rest.Error(), "skipping 1 deletions") {
		t.Errorf("other errors %v; want only main's deletion skipped", rest)
	}
	owned := w.owned(t)
	for _, r := range owned.Rules {
		if r.Table == 20002 {
			t.Errorf("eth2's rule %v kept because main's VPC route was refused", r)
		}
	}
	var main []string
	for _, r := range owned.Routes {
		if r.Table == 20002 {
			t.Errorf("eth2's route %v kept because main's VPC route was refused", r)
		}
		if r.Table == MainTable {
			main = append(main, r.Dst.String())
		}
	}
	if slices.Contains(main, "10.1.0.0/16") || !slices.Contains(main, "10.5.0.0/16") {
		t.Errorf("routes of ours in main %v; want 10.5.0.0/16 kept (same table as the refused add), 10.1.0.0/16 absent", main)
	}
	if slices.ContainsFunc(owned.Addrs, func(a Addr) bool { return a.Prefix.Addr().String() == "10.1.1.20" }) {
		t.Error("eth2's address kept because main's VPC route was refused")
	}
}
