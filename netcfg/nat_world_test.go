package netcfg

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// natWorld is the shared NAT of the issue, in namespaces:
//
//	inet 203.0.113.5 ── rA ── eth0 [instance] eth1 ── rB ── cB 10.1.5.5, 10.1.6.6
//	hostA 10.0.1.5 ──┘  (VPC A)       │   eth2 ── rC ─┬ cC 10.1.5.5
//	                                  │               └ cC2 100.64.0.7
//	                    ctr 172.17.0.2 ── docker0
//
// VPC A (10.0.0.0/16) holds the egress eth0 10.0.0.10; its router rA leads to
// the "internet" host inet and to a private host hostA, and answers for the
// link-local IMDS address 169.254.169.254. VPC B (10.1.0.0/16, eth1
// 10.1.0.11) and VPC C (10.1.0.0/16 too, plus 100.64.0.0/16; eth2 10.1.0.12)
// overlap: both have a client 10.1.5.5, and their routers send their
// default route to the instance's ENI in their VPC. ctr is a container
// behind a Docker-style bridge with Docker's own masquerade, in its own
// table. The instance's routing is what dualhomed keeps (tables 20001 and
// 20002, their from-rules), set here by hand; a Kernel adds the NAT.
type natWorld struct {
	inst, rA, inet, hostA, rB, cB, rC, cC, cC2, ctr *nstest.NS
	k                                               *Kernel
	stateDir                                        string
	links                                           map[string]Link
}

// natWorldInet is the internet host's address.
const natWorldInet = "203.0.113.5"

func newNATWorld(t testing.TB) *natWorld {
	t.Helper()
	nstest.RequireRoot(t)
	w := &natWorld{stateDir: t.TempDir(), links: map[string]Link{}}
	for _, n := range []**nstest.NS{&w.inst, &w.rA, &w.inet, &w.hostA, &w.rB, &w.cB, &w.rC, &w.cC, &w.cC2, &w.ctr} {
		*n = nstest.New(t)
		// Quiet links: no router solicitations, no DAD.
		(*n).Sysctl(t, "net/ipv6/conf/all/disable_ipv6", "1")
		(*n).Sysctl(t, "net/ipv6/conf/default/disable_ipv6", "1")
	}
	mac := 0
	veth := func(a *nstest.NS, an string, b *nstest.NS, bn string) netlink.Link {
		mac++
		return a.Veth(t, an, fmt.Sprintf("0a:00:00:00:03:%02x", mac), b, bn)
	}
	for i, peer := range []struct {
		ns   *nstest.NS
		name string
	}{{w.rA, "vpc0"}, {w.rB, "vpc1"}, {w.rC, "vpc2"}} {
		name := fmt.Sprintf("eth%d", i)
		l := veth(w.inst, name, peer.ns, peer.name)
		w.links[name] = Link{Index: l.Attrs().Index, Name: name, MAC: l.Attrs().HardwareAddr.String()}
	}
	veth(w.inst, "docker0", w.ctr, "ceth0")
	veth(w.rA, "igw", w.inet, "w0")
	veth(w.rA, "priv", w.hostA, "h0")
	veth(w.rB, "cli", w.cB, "c0")
	veth(w.rC, "cli", w.cC, "c0")
	veth(w.rC, "cli2", w.cC2, "c0")
	for _, n := range []*nstest.NS{w.rA, w.rB, w.rC} {
		n.Sysctl(t, "net/ipv4/ip_forward", "1")
	}
	w.inst.Sysctl(t, "net/ipv4/conf/all/rp_filter", "0")
	for _, l := range []string{"eth1", "eth2"} {
		w.inst.Sysctl(t, "net/ipv4/conf/"+l+"/rp_filter", "2") // dualhomed's default: loose
	}
	for _, c := range []struct {
		ns   *nstest.NS
		args string
	}{
		{w.inst, "addr add 10.0.0.10/24 dev eth0"},
		{w.inst, "addr add 10.1.0.11/24 dev eth1"},
		{w.inst, "addr add 10.1.0.12/24 dev eth2 noprefixroute"},
		{w.inst, "route add default via 10.0.0.1 dev eth0"},
		{w.inst, "route add 169.254.169.254 dev eth0"},
		{w.inst, "route add 100.64.0.0/16 via 10.1.0.1 dev eth2 onlink proto 210"}, // VPC C's second CIDR (vpc_routes)
		{w.inst, "route add 10.1.0.0/24 dev eth1 src 10.1.0.11 table 20001 proto 210"},
		{w.inst, "route add default via 10.1.0.1 dev eth1 table 20001 proto 210"},
		{w.inst, "route add 10.1.0.0/24 dev eth2 src 10.1.0.12 table 20002 proto 210"},
		{w.inst, "route add default via 10.1.0.1 dev eth2 table 20002 proto 210"},
		{w.inst, "rule add from 10.1.0.11 lookup 20001 priority 20001 proto 210"},
		{w.inst, "rule add from 10.1.0.12 lookup 20002 priority 20002 proto 210"},
		{w.inst, "addr add 172.17.0.1/16 dev docker0"},
		{w.ctr, "addr add 172.17.0.2/16 dev ceth0"},
		{w.ctr, "route add default via 172.17.0.1"},
		{w.rA, "addr add 10.0.0.1/24 dev vpc0"},
		{w.rA, "addr add 169.254.169.254/32 dev vpc0"},
		{w.rA, "addr add 203.0.113.1/24 dev igw"},
		{w.rA, "addr add 10.0.1.1/24 dev priv"},
		{w.rA, "route add 100.64.0.0/16 via 10.0.0.10"}, // VPC A's route table, pointed at the instance
		{w.inet, "addr add 203.0.113.5/24 dev w0"},
		{w.inet, "route add default via 203.0.113.1"},
		{w.hostA, "addr add 10.0.1.5/24 dev h0"},
		{w.hostA, "route add default via 10.0.1.1"},
		{w.rB, "addr add 10.1.0.1/24 dev vpc1"},
		{w.rB, "addr add 10.1.4.1/22 dev cli"},
		{w.rB, "route add default via 10.1.0.11"},
		{w.rC, "addr add 10.1.0.1/24 dev vpc2"},
		{w.rC, "addr add 10.1.4.1/22 dev cli"},
		{w.rC, "addr add 100.64.0.1/24 dev cli2"},
		{w.rC, "route add default via 10.1.0.12"},
		{w.cB, "addr add 10.1.5.5/22 dev c0"},
		{w.cB, "addr add 10.1.6.6/22 dev c0"},
		{w.cB, "route add default via 10.1.4.1"},
		{w.cC, "addr add 10.1.5.5/22 dev c0"},
		{w.cC, "route add default via 10.1.4.1"},
		{w.cC2, "addr add 100.64.0.7/24 dev c0"},
		{w.cC2, "route add default via 100.64.0.1"},
	} {
		c.ns.Run(t, "ip", strings.Fields(c.args)...)
	}
	k, err := NewKernel(w.inst.Handle, w.stateDir, DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Close)
	w.k = k
	return w
}

// nat is the NAT of the world: eth1 and eth2 are sources, eth1 narrowed to
// 10.1.5.0/24 (so that 10.1.6.6 is not allowed).
func (w *natWorld) nat() *NAT {
	l := w.links
	return &NAT{
		Egress: l["eth0"], EgressAddr: desIP("10.0.0.10"),
		Sources: []NATSource{
			{Link: l["eth1"], Mark: 1 << natMarkShift, Zone: 1, Allowed: desPfxs("10.1.5.0/24")},
			{Link: l["eth2"], Mark: 2 << natMarkShift, Zone: 2, Allowed: desPfxs("10.1.0.0/16", "100.64.0.0/16")},
		},
		ENIs:      []Link{l["eth0"], l["eth1"], l["eth2"]},
		Forbidden: desPfxs("10.0.0.0/16", "10.1.0.0/16", "100.64.0.0/16", "169.254.0.0/16"),
	}
}

// apply makes the instance hold n (nil: no NAT), the hand-made routing as it
// is, and returns the writes it made. With table false it adds n's mark
// rules alone (the floor of BenchmarkNAT brings its own table).
func (w *natWorld) apply(t testing.TB, n *NAT, table bool) int {
	t.Helper()
	obs, err := w.k.Observe()
	if err != nil {
		t.Fatal(err)
	}
	want := withNAT(obs.Owned, n)
	if !table {
		want.NAT = nil
	}
	writes, err := w.k.Apply(Diff(obs.Owned, want))
	if err != nil {
		t.Fatal(err)
	}
	return writes
}

// dockerRules are what Docker (through iptables-nft) installs for its
// bridge, in a table of its own: its masquerade and its forward accepts.
const dockerRules = `table ip docker {
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		oifname != "docker0" ip saddr 172.17.0.0/16 counter masquerade
	}
	chain FORWARD {
		type filter hook forward priority filter; policy accept;
		oifname "docker0" ct state related,established counter accept
		iifname "docker0" oifname != "docker0" counter accept
	}
}`

// echoServer listens on addr:port inside ns. For each connection it writes
// the peer's address as it sees it ("ip:port\n"), then echoes what it
// reads. It stops with the test.
func echoServer(t testing.TB, ns *nstest.NS, addr string, port int) {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(netip.MustParseAddr(addr), uint16(port)).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := fmt.Fprintf(c, "%s\n", c.RemoteAddr()); err != nil {
					return
				}
				io.Copy(c, c)
			}()
		}
	}()
}

// dial connects from ns, from src (and srcPort when not 0), to dst:port.
func dial(ns *nstest.NS, src string, srcPort int, dst string, port int, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src), Port: srcPort}
	}
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = d.Dial("tcp", netip.AddrPortFrom(netip.MustParseAddr(dst), uint16(port)).String())
		return err
	})
	return c, err
}

// greeting reads the echo server's first line: how it sees the client.
func greeting(c net.Conn, timeout time.Duration) (string, error) {
	c.SetReadDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// udpArrives reports whether a datagram sent from ns `from` (from src when
// not "") to dst reaches a listener in ns `to`. Delivery, not a reply, is
// what it measures: the tests of what must not cross use it, so they do not
// depend on how a reply would be routed.
func udpArrives(t testing.TB, from *nstest.NS, src string, to *nstest.NS, dst string) bool {
	t.Helper()
	var ln *net.UDPConn
	if err := to.Do(func() (err error) {
		ln, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	payload := fmt.Sprintf("probe %s->%s %d", src, dst, time.Now().UnixNano())
	if err := from.Do(func() error {
		var laddr *net.UDPAddr
		if src != "" {
			laddr = &net.UDPAddr{IP: net.ParseIP(src)}
		}
		c, err := net.DialUDP("udp4", laddr, &net.UDPAddr{IP: net.ParseIP(dst), Port: 9999})
		if err != nil {
			return err
		}
		defer c.Close()
		for range 3 { // a first datagram can wait for ARP
			if _, err := c.Write([]byte(payload)); err != nil {
				return err
			}
			time.Sleep(20 * time.Millisecond)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 256)
	ln.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	for {
		n, err := ln.Read(buf)
		if err != nil {
			return false
		}
		if string(buf[:n]) == payload {
			return true
		}
	}
}

// conntrack is the instance's connection table as /proc shows it
// (nf_conntrack prints the original-direction zone as zone-orig=N).
func (w *natWorld) conntrack(t testing.TB) []string {
	t.Helper()
	var lines []string
	if err := w.inst.Do(func() error {
		b, err := os.ReadFile("/proc/thread-self/net/nf_conntrack")
		lines = strings.Split(strings.TrimSpace(string(b)), "\n")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return lines
}
