package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// natConfig makes eth1 (VPC B, its second CIDR only) and eth2 (VPC C) NAT
// sources, and serves the metrics on the instance's loopback.
const natConfig = `enis:
  - match: {device_number: 1}
    nat: true
    nat_sources: [100.64.0.0/16]
  - match: {device_number: 2}
    nat: true
metrics:
  listen: 127.0.0.1:9464
`

// dockerRules are what Docker (through iptables-nft) installs for its
// bridge, in a table of its own: its masquerade and its forward accepts.
const dockerRules = `table ip docker {
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		oifname != "docker0" ip saddr 172.17.0.0/16 masquerade
	}
	chain FORWARD {
		type filter hook forward priority filter; policy accept;
		oifname "docker0" ct state related,established accept
		iifname "docker0" oifname != "docker0" accept
	}
}`

// natProbe is a datagram that must not cross the instance once the NAT runs.
type natProbe struct {
	name     string
	from, to *simworld.NS
	src, dst netip.Addr
}

// Part 2 of issue 14: one instance is the NAT of VPC B and VPC C, whose
// routers send their default route to it, with real packets: clients with
// the same address in both VPCs reach the internet host at the same moment
// from the same source port, masqueraded to the primary ENI's address;
// nothing crosses between the VPCs, into VPC A, or from a source outside
// nat_sources; a Docker-style bridge keeps its own forwarding; cleanup
// removes the table and the mark rules and restores ip_forward.
func TestSharedNAT(t *testing.T) {
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("skipping: needs nft to play Docker's rules (apt-get install nftables)")
	}
	needBinaries(t)
	w := simworld.ForTestWith(t, simworld.Options{DualhomedBin: dualhomedBin, NAT: true})
	a, b, c := w.VPCs["A"], w.VPCs["B"], w.VPCs["C"]
	eth0 := w.ENI("eth0")
	inet, err := simworld.ListenEcho(w.Internet, 8080)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inet.Close() })
	internet := netip.AddrPortFrom(simworld.InternetAddr, 8080)
	probes := []natProbe{
		{"VPC B to VPC C's router", b.NATClient, c.Router, simworld.NATClientAddr, w.ENI("eth2").Gateway4},
		{"VPC B to VPC A's client", b.NATClient, a.Client, simworld.NATClientAddr, a.Client4},
		{"VPC B, from outside nat_sources, to the internet", b.Client, w.Internet, b.Client4, simworld.InternetAddr},
	}
	arrives := func(p natProbe) bool {
		t.Helper()
		ok, err := simworld.UDPArrives(p.from, p.src, p.to, p.dst)
		if err != nil {
			t.Fatalf("%s: %v", p.name, err)
		}
		return ok
	}

	// Forwarding on and no table: every probe crosses, so each check below
	// can fail; without masquerade the internet host cannot answer.
	if err := w.Instance.SetSysctl("net/ipv4/ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	for _, p := range probes {
		if !arrives(p) {
			t.Fatalf("%s: does not arrive even without the NAT", p.name)
		}
	}
	if c, err := simworld.Dial(context.Background(), b.NATClient, internet, 500*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("VPC B reaches the internet without the NAT: the world has no need of one")
	}
	if err := w.Instance.SetSysctl("net/ipv4/ip_forward", "0"); err != nil {
		t.Fatal(err)
	}

	if err := w.StartIMDS(); err != nil {
		t.Fatal(err)
	}
	d, err := w.StartDaemon(simworld.DaemonOptions{PollInterval: time.Second, ExtraConfig: natConfig})
	if err != nil {
		t.Fatal(err)
	}
	waitConfigured(t, w, d, "eth1", "eth2")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := simworld.WaitFor(ctx, func() error {
		_, err := w.Dualhomed(ctx, "plan")
		return err
	}); err != nil {
		t.Fatalf("the NAT is not in place: %v", err)
	}

	t.Run("same address, same source port, same moment", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make([]error, 2)
		src := netip.AddrPortFrom(simworld.NATClientAddr, 40000)
		for i, ns := range []*simworld.NS{b.NATClient, c.NATClient} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				conn, err := simworld.DialFrom(context.Background(), ns, src, internet, 5*time.Second)
				if err != nil {
					errs[i] = err
					return
				}
				defer conn.Close()
				time.Sleep(200 * time.Millisecond) // both connections open at once
				if err := conn.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
					errs[i] = err
					return
				}
				msg := fmt.Sprintf("hello from %s\n", ns.Name)
				if _, err := conn.Write([]byte(msg)); err != nil {
					errs[i] = err
					return
				}
				if line, err := bufio.NewReader(conn).ReadString('\n'); err != nil || line != msg {
					errs[i] = fmt.Errorf("echo %q, %v", line, err)
				}
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("client %s:40000 in VPC %s: %v", simworld.NATClientAddr, []string{"B", "C"}[i], err)
			}
		}
		peers := inet.Peers()
		if len(peers) != 2 || peers[0].Addr() != eth0.Primary4() || peers[1].Addr() != eth0.Primary4() || peers[0].Port() == peers[1].Port() {
			t.Errorf("the internet host saw %v, want two connections from %s (eth0's address) on two ports", peers, eth0.Primary4())
		}
	})

	t.Run("the metrics count the connections", func(t *testing.T) {
		client := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: w.Instance.DialContext}}
		resp, err := client.Get("http://127.0.0.1:9464/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		// One connection each (a retransmitted SYN would count twice).
		for _, link := range []string{"eth1", "eth2"} {
			var n float64
			prefix := fmt.Sprintf("dualhomed_nat_connections_total{link=%q} ", link)
			for _, l := range strings.Split(string(body), "\n") {
				if v, ok := strings.CutPrefix(l, prefix); ok {
					n, _ = strconv.ParseFloat(v, 64)
				}
			}
			if n < 1 {
				t.Errorf("the metrics count no connection through %s:\n%s", link, grepLines(string(body), "dualhomed_nat_"))
			}
		}
	})

	t.Run("nothing crosses that must not", func(t *testing.T) {
		for _, p := range probes {
			if arrives(p) {
				t.Errorf("%s: arrives through the NAT", p.name)
			}
		}
		if !arrives(natProbe{"VPC C to the internet", c.NATClient, w.Internet, simworld.NATClientAddr, simworld.InternetAddr}) {
			t.Error("an allowed source's datagram does not reach the internet: the probes prove nothing")
		}
	})

	t.Run("Docker's forwarding keeps working", func(t *testing.T) {
		if out, err := w.Instance.Command(context.Background(), "nft", dockerRules).CombinedOutput(); err != nil {
			t.Fatalf("nft: %v\n%s", err, out)
		}
		if err := simworld.EchoOnce(w.Container, internet, 5*time.Second); err != nil {
			t.Fatalf("container to the internet: %v", err)
		}
		if peers := inet.Peers(); peers[len(peers)-1].Addr() != eth0.Primary4() {
			t.Errorf("the internet host saw the container as %v, want %s (Docker's masquerade)", peers[len(peers)-1], eth0.Primary4())
		}
	})

	t.Run("status and plan show the NAT per ENI", func(t *testing.T) {
		out, err := w.Dualhomed(context.Background(), "status")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("dualhomed status:\n%s", out)
		for _, want := range []string{"egress", "source (", "NAT (table inet dualhomed) dropped packets:"} {
			if !strings.Contains(out, want) {
				t.Errorf("status lacks %q:\n%s", want, out)
			}
		}
		if out, err = w.Dualhomed(context.Background(), "plan"); err != nil || !strings.Contains(out, "NAT (table inet dualhomed): eth0 egress, eth1 source (connections: ") {
			t.Errorf("plan: %v, lacks the NAT's roles:\n%s", err, out)
		}
	})

	t.Run("cleanup", func(t *testing.T) {
		if err := d.Stop(5 * time.Second); err != nil {
			t.Logf("daemon: %v", err)
		}
		if out, err := w.Dualhomed(context.Background(), "cleanup"); err != nil {
			t.Fatalf("cleanup: %v\n%s", err, out)
		}
		tables, err := w.Instance.Command(context.Background(), "nft", "list", "tables").Output()
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Fields(string(tables)); slices.Contains(got, "dualhomed") || !slices.Contains(got, "docker") {
			t.Errorf("tables after cleanup: %s; want Docker's and not ours", tables)
		}
		if out, _ := w.Instance.IP("rule", "show"); strings.Contains(out, "fwmark") {
			t.Errorf("fwmark rules left:\n%s", out)
		}
		var v []byte
		if err := w.Instance.Do(func() (err error) { v, err = os.ReadFile("/proc/sys/net/ipv4/ip_forward"); return err }); err != nil || string(v) != "0\n" {
			t.Errorf("ip_forward after cleanup: %q, %v; want the original 0", v, err)
		}
	})
}

// grepLines is the lines of s that contain substr.
func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
