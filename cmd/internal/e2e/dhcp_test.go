package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// Issue 13's address rule, with the daemon: a hot-attached ENI's primary
// IPv4 is its DHCP client's. When a client adds it (with a lease), dualhomed
// configures the ENI around that address, adds no copy of its own and
// leaves it to the client, cleanup included; when no client does,
// dualhomed adds it itself once the grace period (3 s) is over.
func TestPrimaryAddressIsLeftToDHCP(t *testing.T) {
	w := simworld.ForTestWith(t, simworld.Options{DualhomedBin: dualhomedBin, MinimalBoot: true})
	d := startDualhomed(t, w, time.Hour) // eth1 and eth2: no DHCP, dualhomed adds their addresses
	eth3 := w.ENI("eth3")
	primary := netip.PrefixFrom(eth3.Primary4(), eth3.Subnet4.Bits())

	// A DHCP client answers at once: its address, with lifetimes.
	if _, err := w.HotAttach(eth3); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Instance.IP("addr", "add", primary.String(), "dev", "eth3", "valid_lft", "600", "preferred_lft", "600"); err != nil {
		t.Fatal(err)
	}
	waitConfigured(t, w, d, "eth3")
	if got := eth3Primary(t, w, primary); len(got) != 1 || got[0].Flags&unix.IFA_F_PERMANENT != 0 || got[0].Proto == simworld.Protocol {
		t.Errorf("with a DHCP client, %s on eth3: %+v; want the client's one address only (with lifetimes, not ours)", primary, got)
	}
	expectAllWork(t, clientProbes(w, "eth3"))
	if err := d.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if out, err := w.Dualhomed(context.Background(), "cleanup"); err != nil {
		t.Fatalf("cleanup: %v\n%s", err, out)
	}
	if got := eth3Primary(t, w, primary); len(got) != 1 {
		t.Errorf("cleanup removed the DHCP client's %s from eth3", primary)
	}

	// Attached again with no DHCP client: not before the grace period,
	// then dualhomed's own.
	if err := w.Detach(eth3); err != nil {
		t.Fatal(err)
	}
	d = startDualhomed(t, w, time.Hour)
	plugged, err := w.HotAttach(eth3)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if got := eth3Primary(t, w, primary); len(got) != 0 {
		t.Errorf("1s after the attach, dualhomed already added %s (grace period 3s): %+v", primary, got)
	}
	waitConfigured(t, w, d, "eth3")
	took := time.Since(plugged)
	if got := eth3Primary(t, w, primary); len(got) != 1 || got[0].Flags&unix.IFA_F_PERMANENT == 0 || got[0].Proto != simworld.Protocol {
		t.Errorf("without a DHCP client, %s on eth3: %+v; want dualhomed's (permanent, proto %d)", primary, got, simworld.Protocol)
	}
	t.Logf("without DHCP, eth3 configured %s after its link arrived (grace 3s)", took.Round(time.Millisecond))
	expectAllWork(t, clientProbes(w, "eth3"))
}

// Issue 13's dropped lease (coexistence change 9): a link on which a DHCP
// client held the ENI's primary IPv4 stays the client's. When the client
// drops the lease (a reconfigure, ifdown) and the grace period since the
// link's arrival is over, dualhomed adds no copy of its own; the client's
// next lease goes in as the client made it (noprefixroute kept), and the
// ENI is configured around it again.
func TestDroppedLeaseIsNotTakenOver(t *testing.T) {
	w := simworld.ForTestWith(t, simworld.Options{DualhomedBin: dualhomedBin, MinimalBoot: true})
	d := startDualhomed(t, w, time.Hour)
	eth3 := w.ENI("eth3")
	primary := netip.PrefixFrom(eth3.Primary4(), eth3.Subnet4.Bits())
	lease := func(verb string) {
		t.Helper()
		args := []string{"addr", verb, primary.String(), "dev", "eth3"}
		if verb != "del" {
			args = append(args, "valid_lft", "600", "preferred_lft", "600", "noprefixroute")
		}
		if _, err := w.Instance.IP(args...); err != nil {
			t.Fatal(err)
		}
	}
	plugged, err := w.HotAttach(eth3)
	if err != nil {
		t.Fatal(err)
	}
	lease("add")
	waitConfigured(t, w, d, "eth3")

	lease("del")
	// The grace period (3 s) ends with a reconcile of its own: a second
	// after it, the primary would be dualhomed's if the dropped lease had
	// not made the link the client's.
	time.Sleep(time.Until(plugged.Add(4 * time.Second)))
	if got := eth3Primary(t, w, primary); len(got) != 0 {
		t.Fatalf("dualhomed added %s on eth3 after its DHCP client dropped the lease: %+v", primary, got)
	}

	lease("add")
	waitConfigured(t, w, d, "eth3")
	got := eth3Primary(t, w, primary)
	if len(got) != 1 || got[0].Flags&unix.IFA_F_PERMANENT != 0 || got[0].Flags&unix.IFA_F_NOPREFIXROUTE == 0 || got[0].Proto == simworld.Protocol {
		t.Errorf("the client's lease taken again, %s on eth3: %+v; want the client's one address (lifetimes, noprefixroute, not ours)", primary, got)
	}
	expectAllWork(t, clientProbes(w, "eth3"))
}

// eth3Primary returns the addresses on eth3 with p's address.
func eth3Primary(t *testing.T, w *simworld.World, p netip.Prefix) []simworld.Addr {
	t.Helper()
	s, err := simworld.ReadState(w.Instance)
	if err != nil {
		t.Fatal(err)
	}
	l, err := w.Instance.NL.LinkByName("eth3")
	if err != nil {
		t.Fatal(fmt.Errorf("finding eth3: %w", err))
	}
	var out []simworld.Addr
	for _, a := range s.Addrs {
		if a.LinkIndex == l.Attrs().Index && a.Prefix.Addr() == p.Addr() {
			out = append(out, a)
		}
	}
	return out
}
