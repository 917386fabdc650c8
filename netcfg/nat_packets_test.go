package netcfg

import (
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// natProbe is a datagram that must not cross the instance once the NAT is
// in place.
type natProbe struct {
	name     string
	from     func(w *natWorld) *nstest.NS
	src, dst string
	to       func(w *natWorld) *nstest.NS
}

var natForbiddenProbes = []natProbe{
	{"VPC B to VPC C's host", func(w *natWorld) *nstest.NS { return w.cB }, "", "100.64.0.7", func(w *natWorld) *nstest.NS { return w.cC2 }},
	{"VPC B to VPC A's private host", func(w *natWorld) *nstest.NS { return w.cB }, "", "10.0.1.5", func(w *natWorld) *nstest.NS { return w.hostA }},
	{"VPC B to the egress's IMDS", func(w *natWorld) *nstest.NS { return w.cB }, "", "169.254.169.254", func(w *natWorld) *nstest.NS { return w.rA }},
	{"VPC B to the container", func(w *natWorld) *nstest.NS { return w.cB }, "", "172.17.0.2", func(w *natWorld) *nstest.NS { return w.ctr }},
	{"VPC B, source not allowed, to the internet", func(w *natWorld) *nstest.NS { return w.cB }, "10.1.6.6", natWorldInet, func(w *natWorld) *nstest.NS { return w.inet }},
	{"VPC A (egress side) into VPC C", func(w *natWorld) *nstest.NS { return w.hostA }, "", "100.64.0.7", func(w *natWorld) *nstest.NS { return w.cC2 }},
}

// TestNATWithRealPackets proves the NAT with real packets: overlapping
// clients at once, nothing crossing that must not, Docker's own forwarding
// untouched, a foreign flush repaired, and cleanup.
func TestNATWithRealPackets(t *testing.T) {
	requireNFT(t)
	w := newNATWorld(t)
	echoServer(t, w.inet, natWorldInet, 8080)
	w.inst.Run(t, "nft", dockerRules)
	n := w.nat()

	t.Run("the world bridges everything without the NAT", func(t *testing.T) {
		// With forwarding on and no table, every probe crosses: each check
		// below can fail.
		w.inst.Sysctl(t, "net/ipv4/ip_forward", "1")
		defer w.inst.Sysctl(t, "net/ipv4/ip_forward", "0")
		for _, p := range natForbiddenProbes {
			if !udpArrives(t, p.from(w), p.src, p.to(w), p.dst) {
				t.Errorf("%s: does not arrive even without the NAT", p.name)
			}
		}
		if c, err := dial(w.cB, "10.1.5.5", 0, natWorldInet, 8080, 500*time.Millisecond); err == nil {
			c.Close()
			t.Error("VPC B reaches the internet without the NAT: the world has no need of it")
		}
	})

	w.apply(t, n, true)
	if writes := w.apply(t, n, true); writes != 0 {
		t.Fatalf("second Apply: %d writes; want 0", writes)
	}
	t.Logf("the table:\n%s", w.inst.Run(t, "nft", "list", "table", "inet", NATTableName))

	t.Run("overlapping clients at the same moment", func(t *testing.T) {
		overlappingClients(t, w, 40000, true)
	})

	t.Run("nothing crosses that must not", func(t *testing.T) {
		for _, p := range natForbiddenProbes {
			if udpArrives(t, p.from(w), p.src, p.to(w), p.dst) {
				t.Errorf("%s: arrives through the NAT", p.name)
			}
		}
		if !udpArrives(t, w.cB, "10.1.5.5", w.inet, natWorldInet) {
			t.Error("an allowed source's datagram does not reach the internet: the probes prove nothing")
		}
		// Each probe was dropped by the rule meant for it, and the
		// connections of both sources were counted.
		c, err := w.k.NATCounters()
		if err != nil {
			t.Fatal(err)
		}
		for _, reason := range []string{"forbidden destination", "source not allowed", "between two ENIs", "a source VPC routes through the instance"} {
			if c.Dropped[reason] == 0 {
				t.Errorf("no packet dropped as %q: %+v", reason, c)
			}
		}
		if c.Connections["eth1"] == 0 || c.Connections["eth2"] == 0 {
			t.Errorf("connections not counted for both sources: %+v", c)
		}
	})

	t.Run("the instance's own connections through the sources keep working", func(t *testing.T) {
		// Into the instance: its zones must not keep local replies from
		// their connection (replies are looked up in the default zone).
		echoServer(t, w.inst, "0.0.0.0", 7777)
		for _, c := range []struct {
			ns  *nstest.NS
			dst string
		}{{w.cB, "10.1.0.11"}, {w.cC, "10.1.0.12"}} {
			conn, err := dial(c.ns, "10.1.5.5", 41000, c.dst, 7777, 5*time.Second)
			if err == nil {
				_, err = greeting(conn, 5*time.Second)
				defer conn.Close()
			}
			if err != nil {
				t.Errorf("10.1.5.5 to the instance's %s: %v", c.dst, err)
			}
		}
		// Out of the instance: replies entering a source ENI get its zone
		// on their original direction, and must still find the connection.
		echoServer(t, w.cB, "10.1.5.5", 8080)
		conn, err := dial(w.inst, "10.1.0.11", 0, "10.1.5.5", 8080, 5*time.Second)
		if err == nil {
			defer conn.Close()
			_, err = greeting(conn, 5*time.Second)
		}
		if err != nil {
			t.Errorf("the instance to VPC B's client: %v", err)
		}
	})

	t.Run("Docker's forwarding and masquerade keep working", func(t *testing.T) {
		c, err := dial(w.ctr, "", 0, natWorldInet, 8080, 5*time.Second)
		if err != nil {
			t.Fatalf("container to the internet: %v", err)
		}
		defer c.Close()
		seen, err := greeting(c, 5*time.Second)
		if err != nil || !strings.HasPrefix(seen, "10.0.0.10:") {
			t.Fatalf("the internet host sees the container as %q (%v), want 10.0.0.10 (Docker's masquerade)", seen, err)
		}
		for _, l := range w.conntrack(t) {
			if strings.Contains(l, "src=172.17.0.2 ") && !strings.Contains(l, "mark=0 ") {
				t.Errorf("the container's connection carries a mark of ours: %s", l)
			}
		}
	})

	t.Run("a foreign flush is repaired", func(t *testing.T) {
		w.inst.Run(t, "nft", "flush", "chain", "inet", NATTableName, natChainZones)
		// Without zones the two clients are one connection: the second
		// waits for the first. This is what the zones are for.
		overlappingClients(t, w, 40001, false)
		w.inst.Run(t, "nft", "flush", "table", "inet", NATTableName)
		if c, err := dial(w.cB, "10.1.5.5", 0, natWorldInet, 8080, 500*time.Millisecond); err == nil {
			c.Close()
			t.Fatal("VPC B still reaches the internet with our table flushed")
		}
		if writes := w.apply(t, n, true); writes == 0 {
			t.Fatal("Apply after the flush wrote nothing")
		}
		overlappingClients(t, w, 40002, true)
	})

	t.Run("the NAT removed", func(t *testing.T) {
		w.apply(t, nil, true)
		if out := w.inst.Run(t, "nft", "list", "tables"); strings.Contains(out, "inet "+NATTableName) {
			t.Errorf("our table is left:\n%s", out)
		}
		if out := w.inst.Run(t, "ip", "rule", "show"); strings.Contains(out, "fwmark") {
			t.Errorf("fwmark rules left:\n%s", out)
		}
		if got := w.inst.ReadSysctl(t, "net/ipv4/ip_forward"); got != "0" {
			t.Errorf("ip_forward = %s after cleanup, want the original 0", got)
		}
		if c, err := dial(w.cB, "10.1.5.5", 0, natWorldInet, 8080, 500*time.Millisecond); err == nil {
			c.Close()
			t.Error("VPC B still reaches the internet after cleanup")
		}
	})
}

// overlappingClients connects cB and cC, both 10.1.5.5 with the same source
// port, to the internet host at the same moment, and holds both open. With
// zones (want true) both are answered, as two connections masqueraded to
// two ports of the egress address, each with its zone and mark, and both
// echo; without (want false) the second is not answered while the first
// holds the tuple.
func overlappingClients(t *testing.T, w *natWorld, port int, want bool) {
	t.Helper()
	type result struct {
		c    net.Conn
		seen string
		err  error
	}
	var wg sync.WaitGroup
	results := make([]result, 2)
	for i, ns := range []*nstest.NS{w.cB, w.cC} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &results[i]
			r.c, r.err = dial(ns, "10.1.5.5", port, natWorldInet, 8080, 2*time.Second)
			if r.err == nil {
				r.seen, r.err = greeting(r.c, 2*time.Second)
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, r := range results {
			if r.c != nil {
				r.c.Close()
			}
		}
	}()
	answered := 0
	for _, r := range results {
		if r.err == nil {
			answered++
		}
	}
	if !want {
		if answered == 2 {
			t.Fatalf("both clients answered without zones (%q, %q): the test cannot tell zones from none", results[0].seen, results[1].seen)
		}
		return
	}
	for i, r := range results {
		if r.err != nil {
			t.Fatalf("client %d (VPC %c): %v", i, "BC"[i], r.err)
		}
		if !strings.HasPrefix(r.seen, "10.0.0.10:") {
			t.Errorf("client %d seen as %q, want the egress address 10.0.0.10", i, r.seen)
		}
	}
	if results[0].seen == results[1].seen {
		t.Errorf("both clients seen as %s: one connection, not two", results[0].seen)
	}
	for i, r := range results {
		msg := fmt.Sprintf("from VPC %c", "BC"[i])
		r.c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := r.c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(r.c, buf); err != nil || string(buf) != msg {
			t.Errorf("client %d echo: %q, %v", i, buf, err)
		}
	}
	// Two entries for one original tuple, told apart by their zone and mark.
	tuple := fmt.Sprintf("src=10.1.5.5 dst=%s sport=%d dport=8080 ", natWorldInet, port)
	zones := map[string]bool{}
	for _, l := range w.conntrack(t) {
		if !strings.Contains(l, tuple) {
			continue
		}
		for _, zm := range []string{"zone-orig=1 ", "zone-orig=2 "} {
			mark := map[string]string{"zone-orig=1 ": "mark=1048576 ", "zone-orig=2 ": "mark=2097152 "}[zm]
			if strings.Contains(l, zm) && strings.Contains(l, mark) && strings.Contains(l, " dst=10.0.0.10 ") {
				zones[zm] = true
			}
		}
	}
	if len(zones) != 2 {
		t.Errorf("conntrack has %d of the 2 entries for %s (zone 1 mark 0x100000, zone 2 mark 0x200000):\n%s",
			len(zones), tuple, strings.Join(w.conntrack(t), "\n"))
	}
}
