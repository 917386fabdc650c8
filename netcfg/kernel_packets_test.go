package netcfg

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// TestRepliesLeaveThroughTheENITheyCameIn proves with real TCP handshakes
// that the objects Apply installs do their job, and that Cleanup takes the
// effect away again. The world: the instance (eth0 in VPC A, eth1 in VPC B),
// a router per VPC, and an on-premises client behind VPC B's router, outside
// every VPC CIDR, so that only our source rules can bring its replies home.
// VPC B's router answers on fe80:ec2::1 like the real one.
func TestRepliesLeaveThroughTheENITheyCameIn(t *testing.T) {
	instance, routerA, routerB, client := nstest.New(t), nstest.New(t), nstest.New(t), nstest.New(t)
	for _, n := range []*nstest.NS{instance, routerA, routerB, client} {
		n.Sysctl(t, "net/ipv6/conf/all/accept_dad", "0")
		n.Sysctl(t, "net/ipv6/conf/default/accept_dad", "0")
	}
	eth0 := instance.Veth(t, "eth0", ktMAC(0), routerA, "vpc0").Attrs().Index
	eth1 := instance.Veth(t, "eth1", ktMAC(1), routerB, "vpc1").Attrs().Index
	client.Veth(t, "c0", "0a:00:00:00:02:00", routerB, "onprem")
	routerB.Sysctl(t, "net/ipv4/ip_forward", "1")
	routerB.Sysctl(t, "net/ipv6/conf/all/forwarding", "1")
	for _, c := range []struct {
		ns   *nstest.NS
		args []string
	}{
		// The instance as DHCP left it: every reply follows the main table out of eth0.
		{instance, []string{"addr", "add", "10.0.0.10/24", "dev", "eth0"}},
		{instance, []string{"addr", "add", "10.1.0.11/24", "dev", "eth1"}},
		{instance, []string{"route", "add", "default", "via", "10.0.0.1", "dev", "eth0"}},
		{instance, []string{"-6", "route", "add", "default", "via", "fe80::a", "dev", "eth0"}},
		{routerA, []string{"addr", "add", "10.0.0.1/24", "dev", "vpc0"}}, // does not forward
		{routerB, []string{"addr", "add", "10.1.0.1/24", "dev", "vpc1"}},
		{routerB, []string{"-6", "addr", "add", "fe80:ec2::1/64", "dev", "vpc1"}},
		{routerB, []string{"-6", "addr", "add", "2600:1f18:b::1/64", "dev", "vpc1"}},
		{routerB, []string{"addr", "add", "198.18.5.1/24", "dev", "onprem"}},
		{routerB, []string{"-6", "addr", "add", "2001:db8:5::1/64", "dev", "onprem"}},
		{client, []string{"addr", "add", "198.18.5.5/24", "dev", "c0"}},
		{client, []string{"-6", "addr", "add", "2001:db8:5::5/64", "dev", "c0"}},
		{client, []string{"route", "add", "default", "via", "198.18.5.1"}},
		{client, []string{"-6", "route", "add", "default", "via", "2001:db8:5::1"}},
	} {
		c.ns.Run(t, "ip", c.args...)
	}

	k, err := NewKernel(instance.Handle, t.TempDir(), DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	// eth1's table and rules; the 10.1.0.11/24 DHCP put there is not ours.
	w := &ktWorld{idx: map[string]int{"eth0": eth0, "eth1": eth1}}
	eth1ENI := ktEth1
	eth1ENI.vpc4, eth1ENI.vpc6 = nil, nil
	desired := w.state(eth1ENI)
	desired.Addrs = slices.DeleteFunc(desired.Addrs, func(a Addr) bool { return a.Prefix.String() == "10.1.0.11/24" })

	// A listener in the instance, on every address.
	var ln net.Listener
	if err := instance.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", ":7777")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()

	// connects reports whether the client completes a TCP handshake with
	// addr: the SYN-ACK must find its way back to the client.
	connects := func(addr string, timeout time.Duration) bool {
		var ok bool
		err := client.Do(func() error {
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(netip.MustParseAddr(addr), 7777).String(), timeout)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return nil
			}
			if err != nil {
				return err
			}
			ok = true
			return c.Close()
		})
		if err != nil {
			t.Fatalf("dialing %s: %v", addr, err)
		}
		return ok
	}
	targets := []string{"10.1.0.11", "10.1.0.12", "2600:1f18:b::11"}

	// Before: 10.1.0.11 answers out of eth0 into VPC A, where the reply dies;
	// the other addresses are not configured at all.
	for _, a := range targets {
		if connects(a, 500*time.Millisecond) {
			t.Fatalf("%s reachable before Apply: the world does not test anything", a)
		}
	}
	if _, err := k.Apply(Diff(State{}, desired)); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	for _, a := range targets {
		if !connects(a, 5*time.Second) {
			t.Errorf("%s: no handshake after Apply: replies do not leave through eth1", a)
		}
	}
	if _, err := k.Cleanup(); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	if connects("10.1.0.11", 500*time.Millisecond) {
		t.Error("10.1.0.11 still answers through eth1 after Cleanup")
	}
}
