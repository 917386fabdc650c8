package netcfg

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// An ENI's primary IPv4 is a DHCP client's: while its link waits for DHCP
// (AwaitDHCP) dualhomed adds only the secondary IPs, and an address with
// finite lifetimes is never dualhomed's, whatever its protocol byte, even
// one dualhomed added that a DHCP client then renewed: no duplicate, no
// delete, not even by Cleanup.
func TestAddressWithLifetimesIsTheDHCPClients(t *testing.T) {
	w := newKTWorld(t)
	eth1 := w.idx["eth1"]
	primary, secondary := netip.MustParsePrefix("10.1.0.11/24"), netip.MustParsePrefix("10.1.0.12/32")
	has := func(p netip.Prefix) (present, permanent bool, proto uint8) {
		t.Helper()
		addrs, err := w.k.dump.addrs(unix.AF_INET)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range addrs {
			if a.LinkIndex == eth1 && a.Prefix == p {
				return true, a.Flags&unix.IFA_F_PERMANENT != 0, a.Proto
			}
		}
		return false, false, 0
	}

	// The link waits for DHCP: the secondary IP only, and no IPv4 routing
	// for want of the primary as the routes' source.
	obs := w.observe(t)
	obs.AwaitDHCP = map[int]bool{eth1: true}
	res := Desired(ktSnapshot(), obs, DefaultConfig())
	if _, err := w.k.Apply(Diff(obs.Owned, res.State)); err != nil {
		t.Fatal(err)
	}
	if p, _, _ := has(primary); p {
		t.Errorf("%s added while eth1 waits for DHCP", primary)
	}
	if p, _, _ := has(secondary); !p {
		t.Errorf("%s not added while eth1 waits for DHCP", secondary)
	}
	if !slices.ContainsFunc(res.Warnings, func(wn Warning) bool { return strings.Contains(wn.Message, "waiting for a DHCP client") }) {
		t.Errorf("no warning says eth1 waits for DHCP: %v", res.Warnings)
	}

	// The wait is over and no DHCP client came: dualhomed adds it, ours.
	w.pipeline(t, ktSnapshot())
	if p, perm, proto := has(primary); !p || !perm || (w.k.addrProto && proto != DefaultProtocol) {
		t.Fatalf("%s after the wait: present %v, permanent %v, proto %d; want ours", primary, p, perm, proto)
	}

	// A DHCP client renews a lease on the same address: it has lifetimes
	// now, and is no longer dualhomed's, even with our protocol byte (ip(8)
	// and networkd send none, and the kernel then resets it to 0; a client
	// could send any).
	lease := addrRequest(Addr{LinkIndex: eth1, Prefix: primary}, DefaultProtocol, true)
	// struct ifa_cacheinfo: preferred and valid lifetimes, then two stamps.
	lifetimes := binary.NativeEndian.AppendUint32(binary.NativeEndian.AppendUint32(nil, 600), 600)
	cacheInfo, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: unix.IFA_CACHEINFO, Data: append(lifetimes, make([]byte, 8)...)}})
	if err != nil {
		t.Fatal(err)
	}
	lease = append(lease, cacheInfo...)
	if err := w.k.dump.request(nlRequest{Type: unix.RTM_NEWADDR, Flags: unix.NLM_F_CREATE | unix.NLM_F_REPLACE, Body: lease}, nil); err != nil {
		t.Fatalf("renewing %s with lifetimes: %v", primary, err)
	}
	_, perm, proto := has(primary)
	t.Logf("%s after the renewal: permanent %v, proto %d", primary, perm, proto)
	if perm || (w.k.addrProto && proto != DefaultProtocol) {
		t.Fatalf("the renewal left %s permanent %v, proto %d: want lifetimes and our protocol", primary, perm, proto)
	}
	obs = w.observe(t)
	if slices.ContainsFunc(obs.Owned.Addrs, func(a Addr) bool { return a.Prefix == primary }) {
		t.Errorf("an address with lifetimes is counted as ours: %v", obs.Owned.Addrs)
	}
	if !slices.Contains(obs.ForeignAddrs, KernelAddr{LinkIndex: eth1, Prefix: primary, Proto: proto, Dynamic: true}) {
		t.Errorf("%s not among the foreign addresses as dynamic: %v", primary, obs.ForeignAddrs)
	}
	before := w.dump(t)
	if _, n := w.pipeline(t, ktSnapshot()); n != 0 {
		t.Errorf("a reconcile after the renewal made %d writes, want none (no delete, no duplicate)", n)
	}
	ktRequireEqual(t, w.dump(t), before)

	// Cleanup takes the secondary IP and leaves the DHCP client's address.
	if _, err := w.k.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if p, perm, _ := has(primary); !p || perm {
		t.Errorf("cleanup took or changed the DHCP client's %s (present %v, permanent %v)", primary, p, perm)
	}
	if p, _, _ := has(secondary); p {
		t.Errorf("cleanup left our %s", secondary)
	}
}
