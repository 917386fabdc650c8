package netcfg

import (
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// natFloorRules is the same NAT written by hand, as an expert would for this
// one host: zones, a mark restored from the connection, an established
// fast path, sets for the ENIs and forbidden destinations, one masquerade.
// It is the floor BenchmarkNAT measures dualhomed's table against.
const natFloorRules = `table inet floor {
	chain raw {
		type filter hook prerouting priority raw; policy accept;
		iif "eth1" ct original zone set 1
		iif "eth2" ct original zone set 2
	}
	chain mangle {
		type filter hook prerouting priority mangle; policy accept;
		ct direction reply meta mark set ct mark
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		ct state established,related accept
		iif "eth1" oif "eth0" ip saddr 10.1.5.0/24 ip daddr != { 10.0.0.0/16, 10.1.0.0/16, 100.64.0.0/16, 169.254.0.0/16 } ct mark set 0x00100000 accept
		iif "eth2" oif "eth0" ip saddr { 10.1.0.0/16, 100.64.0.0/16 } ip daddr != { 10.0.0.0/16, 10.1.0.0/16, 100.64.0.0/16, 169.254.0.0/16 } ct mark set 0x00200000 accept
		iif { "eth0", "eth1", "eth2" } oif { "eth0", "eth1", "eth2" } drop
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oif "eth0" ct mark { 0x00100000, 0x00200000 } masquerade
	}
}`

// BenchmarkNAT measures connections per second and throughput from VPC B
// and VPC C through the NAT to the internet host, with dualhomed's table
// and with natFloorRules in the same world (same fwmark rules). Needs root
// and nft:
//
//	go test -run '^$' -bench BenchmarkNAT -benchtime 3s ./netcfg/
func BenchmarkNAT(b *testing.B) {
	for _, ruleset := range []string{"dualhomed", "hand-written"} {
		setup := func(b *testing.B) *natWorld {
			requireNFT(b)
			w := newNATWorld(b)
			w.apply(b, w.nat(), ruleset == "dualhomed")
			if ruleset != "dualhomed" {
				w.inst.Run(b, "nft", natFloorRules)
				w.inst.Sysctl(b, "net/ipv4/ip_forward", "1")
			}
			return w
		}
		b.Run("conns/"+ruleset, func(b *testing.B) {
			w := setup(b)
			echoServer(b, w.inet, natWorldInet, 8080)
			clients := []*nstest.NS{w.cB, w.cC}
			b.ResetTimer()
			for i := range b.N {
				c, err := dial(clients[i%2], "10.1.5.5", 0, natWorldInet, 8080, 5*time.Second)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := greeting(c, 5*time.Second); err != nil {
					b.Fatal(err)
				}
				// A reset, not a FIN: no TIME_WAIT to run out of ports.
				c.(*net.TCPConn).SetLinger(0)
				c.Close()
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conns/s")
		})
		b.Run("throughput/"+ruleset, func(b *testing.B) {
			w := setup(b)
			done := sinkServer(b, w.inet, natWorldInet, 8081)
			c, err := dial(w.cB, "10.1.5.5", 0, natWorldInet, 8081, 5*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			chunk := make([]byte, 1<<20)
			b.SetBytes(int64(len(chunk)))
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			// Timed until the last byte has arrived, not just left.
			c.(*net.TCPConn).CloseWrite()
			if got := <-done; got != int64(b.N)*int64(len(chunk)) {
				b.Fatalf("the sink received %d bytes, want %d", got, b.N*len(chunk))
			}
		})
	}
}

// sinkServer accepts one connection on addr:port inside ns, reads it to the
// end and sends how many bytes it read.
func sinkServer(b *testing.B, ns *nstest.NS, addr string, port int) <-chan int64 {
	b.Helper()
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf("%s:%d", addr, port))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	done := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- -1
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		done <- n
	}()
	return done
}

// BenchmarkReadNAT is what Observe's read of the NAT adds to every
// reconcile that reads the kernel: "none", without a NAT (one request for a
// table that is not there: what every instance without nat: true pays);
// "table", with the table of natKTWorld (the table, its rules, each chain).
func BenchmarkReadNAT(b *testing.B) {
	for _, table := range []bool{false, true} {
		b.Run(map[bool]string{false: "none", true: "table"}[table], func(b *testing.B) {
			w := newNATKTWorld(b)
			if table {
				w.apply(b, w.nat())
			}
			b.ReportAllocs()
			defer reportCPU(b)()
			for b.Loop() {
				if t, err := w.k.readNAT(); err != nil || (t != nil) != table {
					b.Fatalf("readNAT: %v, %v", t, err)
				}
			}
		})
	}
}
