package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// dialFromInstance opens an unbound TCP connection from the instance (the
// kernel picks the source address and the route) and exchanges one line.
func dialFromInstance(t *testing.T, w *simworld.World, dst netip.Addr) net.Conn {
	t.Helper()
	c, err := simworld.Dial(context.Background(), w.Instance, netip.AddrPortFrom(dst, simworld.EchoPort), 2*time.Second)
	if err != nil {
		t.Fatalf("unbound connection from the instance: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func routerRx(t *testing.T, e *simworld.ENI) uint64 {
	t.Helper()
	l, err := e.VPC.Router.NL.LinkByName(e.RouterLink)
	if err != nil {
		t.Fatalf("finding %s in %s: %v", e.RouterLink, e.VPC.Router.Name, err)
	}
	return l.Attrs().Statistics.RxPackets
}

// Scenario 3: unbound connections from the instance into VPC B leave through
// eth1 (main-table routes to VPC B's CIDRs); VPC C's CIDR overlaps VPC A's,
// gets no main-table route, and `dualhomed status` says so.
func TestVPCRoutesAndOverlapWarning(t *testing.T) {
	w := newWorld(t)
	startDualhomed(t, w, time.Second)
	b, eth1 := w.VPCs["B"], w.ENI("eth1")
	for _, v := range []string{"A", "B", "C"} {
		if err := w.ServeEcho(w.VPCs[v].Client, simworld.EchoPort); err != nil {
			t.Fatal(err)
		}
	}

	for _, tc := range []struct{ dst, wantSrc netip.Addr }{
		{b.Client4, eth1.Primary4()},
		{b.Client6, eth1.IPv6s()[0]},
	} {
		before := routerRx(t, eth1)
		c := dialFromInstance(t, w, tc.dst)
		local := netip.MustParseAddrPort(c.LocalAddr().String())
		if local.Addr().Unmap() != tc.wantSrc {
			t.Errorf("connection to %s left from %s, want eth1's %s", tc.dst, local.Addr(), tc.wantSrc)
		}
		if after := routerRx(t, eth1); after <= before {
			t.Errorf("connection to %s: VPC B's router received nothing from eth1 (rx %d -> %d)", tc.dst, before, after)
		}
		t.Logf("unbound connection to %s: source %s, VPC B router rx %d -> %d", tc.dst, local.Addr(), before, routerRx(t, eth1))
	}

	// Main table: our route to VPC B's CIDRs via eth1, none to VPC C's
	// 10.0.0.0/16 through eth2 (it would steal VPC A's traffic).
	routes, err := w.Instance.NL.RouteListFiltered(netlink.FAMILY_ALL,
		&netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	var ours []string
	for _, r := range routes {
		if r.Protocol == simworld.Protocol {
			ours = append(ours, r.String())
		}
	}
	has := func(dst string, link string) bool {
		l, _ := w.Instance.NL.LinkByName(link)
		for _, r := range routes {
			if r.Protocol == simworld.Protocol && r.Dst != nil && r.Dst.String() == dst && l != nil && r.LinkIndex == l.Attrs().Index {
				return true
			}
		}
		return false
	}
	if !has("10.1.0.0/16", "eth1") || !has("fd00:b::/56", "eth1") {
		t.Errorf("main table lacks our routes to VPC B's CIDRs via eth1; our main routes: %v", ours)
	}
	for _, r := range routes {
		if r.Dst != nil && r.Dst.String() == "10.0.0.0/16" {
			t.Errorf("main table has a route to the overlapping 10.0.0.0/16: %v", r)
		}
	}

	// An unbound connection to 10.0.100.50 (in both VPC A and VPC C) goes to VPC A.
	aRx, cRx := routerRx(t, w.ENI("eth0")), routerRx(t, w.ENI("eth2"))
	dialFromInstance(t, w, netip.MustParseAddr("10.0.100.50"))
	if routerRx(t, w.ENI("eth2")) != cRx || routerRx(t, w.ENI("eth0")) == aRx {
		t.Errorf("unbound connection to 10.0.100.50 did not go to VPC A through eth0")
	}

	out, err := w.Dualhomed(context.Background(), "status")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dualhomed status:\n%s", out)
	if !strings.Contains(out, "10.0.0.0/16") || !strings.Contains(strings.ToLower(out), "overlap") {
		t.Errorf("dualhomed status does not warn that VPC C's 10.0.0.0/16 overlaps VPC A:\n%s", out)
	}
}

// Part 1 of issue 14: `routes:` sends the instance's own unbound connections
// to an on-premises network (reached through VPC B only) out of eth1, with
// eth1's address as source; the route goes when its entry does.
func TestRoutesReachOnPremises(t *testing.T) {
	w := newWorld(t)
	b, eth1 := w.VPCs["B"], w.ENI("eth1")
	if err := w.ServeEcho(b.OnPrem, simworld.EchoPort); err != nil {
		t.Fatal(err)
	}
	dst := netip.AddrPortFrom(b.OnPrem4, simworld.EchoPort)
	// Without the route the connection follows the default route to VPC A.
	if c, err := simworld.Dial(context.Background(), w.Instance, dst, 500*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("the instance reaches the on-premises host without a route: the test proves nothing")
	}
	needBinaries(t)
	if err := w.StartIMDS(); err != nil {
		t.Fatal(err)
	}
	entry := "enis:\n  - match: {device_number: 1}\n    routes: [198.18.0.0/24]\n"
	d, err := w.StartDaemon(simworld.DaemonOptions{PollInterval: time.Second, ExtraConfig: entry})
	if err != nil {
		t.Fatal(err)
	}
	waitConfigured(t, w, d, "eth1", "eth2")
	before := routerRx(t, eth1)
	c := dialFromInstance(t, w, b.OnPrem4)
	if local := netip.MustParseAddrPort(c.LocalAddr().String()); local.Addr().Unmap() != eth1.Primary4() {
		t.Errorf("the connection to %s left from %s, want eth1's %s", b.OnPrem4, local.Addr(), eth1.Primary4())
	}
	if after := routerRx(t, eth1); after <= before {
		t.Errorf("VPC B's router received nothing from eth1 (rx %d -> %d)", before, after)
	}
	if err := c.SetDeadline(time.Now().Add(2 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello\n" {
		t.Fatalf("no echo from the on-premises host: %q, %v", buf, err)
	}
	expectInSync(t, w)

	// The entry goes (a reload): so does the route.
	if err := w.WriteConfig(simworld.DaemonOptions{PollInterval: time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := d.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := simworld.WaitFor(ctx, func() error {
		if out, _ := w.Instance.IP("route", "show", "198.18.0.0/24"); strings.TrimSpace(out) != "" {
			return fmt.Errorf("route left: %s", out)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
