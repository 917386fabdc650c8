// Command dualhomed-demo shows, in about ten seconds and on any Linux machine,
// the problem dualhomed solves and the proof that it solves it (`sudo make demo`).
//
// It builds a simulated dual-homed EC2 instance out of network namespaces
// (cmd/internal/simworld), shows that clients in the secondary ENIs' VPCs get
// no reply, starts the real dualhomed daemon against an IMDS emulator running
// inside the instance, shows `dualhomed status` and the working connections,
// a route to an on-premises network through VPC B and the instance as the
// shared NAT of VPC B and VPC C, then removes everything it created, also
// on Ctrl-C or failure.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

var version = "dev"

func main() {
	os.Exit(run())
}

func run() int {
	flag.Usage = func() { fmt.Fprintf(flag.CommandLine.Output(), "usage: sudo %s\n", os.Args[0]) }
	flag.Parse()
	if flag.NArg() > 0 {
		flag.Usage()
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "dualhomed-demo needs root: it creates network namespaces. Run: sudo make demo")
		return 2
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "finding this program's directory: %v\n", err)
		return 1
	}
	d := &demo{dualhomed: filepath.Join(filepath.Dir(exe), "dualhomed")}
	if _, err := os.Stat(d.dualhomed); err != nil {
		fmt.Fprintf(os.Stderr, "%s is missing: run `make build` first (or `sudo make demo`)\n", d.dualhomed)
		return 1
	}

	// Ctrl-C or SIGTERM cancel the demo; the teardown below always runs.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err = d.run(ctx)
	if w := d.world; w != nil {
		say("")
		say("Cleaning up: stopping dualhomed and the IMDS emulator, removing %d namespaces and their veths...", len(w.Namespaces()))
		if cerr := w.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("tearing down: %w", cerr))
		}
		for _, name := range w.Namespaces() {
			if _, serr := os.Stat(filepath.Join("/run/netns", name)); serr == nil {
				err = errors.Join(err, fmt.Errorf("namespace %s left behind", name))
			}
		}
		if err == nil {
			say("Host left as it was: every namespace of the demo is gone, with its links and rules.")
		}
	}
	switch {
	case ctx.Err() != nil:
		say("Interrupted; everything the demo created is gone.")
		return 130
	case err != nil:
		fmt.Fprintf(os.Stderr, "\ndemo failed: %v\n", err)
		return 1
	}
	return 0
}

type demo struct {
	dualhomed string
	world     *simworld.World
}

func say(format string, args ...any) { fmt.Printf(format+"\n", args...) }

func (d *demo) run(ctx context.Context) error {
	if removed, err := simworld.Sweep(); err != nil {
		return fmt.Errorf("removing leftovers of an earlier crashed run: %w", err)
	} else if len(removed) > 0 {
		say("Removed leftovers of an earlier crashed run: %s", strings.Join(removed, " "))
	}
	say("dualhomed demo (%s): a simulated dual-homed EC2 instance, built from network namespaces.", version)
	say("")
	w, err := simworld.New(simworld.Options{DualhomedBin: d.dualhomed, NAT: true})
	if err != nil {
		return err
	}
	d.world = w
	d.describe()
	if err := w.ServeEcho(w.Instance, simworld.EchoPort); err != nil {
		return err
	}
	if err := w.StartIMDS(); err != nil {
		return err
	}

	say("")
	say("1. Without dualhomed: each client pings its ENI's address and opens a TCP connection to it.")
	d.probeAll(ctx, time.Second)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	say("   The IPv4 replies for VPC B and VPC C follow the main table's default route out of eth0 into")
	say("   VPC A, where they are lost (VPC C's even reaches VPC A's client, which has the same address);")
	say("   the IPv6 reply has no route at all.")

	say("")
	say("2. Starting `dualhomed daemon` in the instance. It reads IMDS (here the emulator on %s)", simworld.IMDSEndpoint)
	say("   at start and then only once an hour: everything after the start is driven by kernel events.")
	start := time.Now()
	say("   Its configuration routes VPC B's on-premises network through eth1 and makes eth1 and eth2")
	say("   the shared NAT's sources (steps 6 and 7):")
	for _, l := range strings.Split(strings.TrimSpace(demoConfig), "\n") {
		say("     %s", l)
	}
	daemon, err := w.StartDaemon(simworld.DaemonOptions{PollInterval: time.Hour, ExtraConfig: demoConfig})
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	err = w.WaitConfigured(wctx, daemon, w.ENI("eth1"), w.ENI("eth2"))
	cancel()
	if err != nil {
		return fmt.Errorf("waiting for dualhomed to configure eth1 and eth2: %w\n%s", err, daemon.Log())
	}
	say("   eth1 and eth2 configured %s after start.", time.Since(start).Round(time.Millisecond))
	say("")
	say("   $ dualhomed status")
	out, err := w.Dualhomed(ctx, "status")
	if err != nil {
		return err
	}
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		say("   %s", l)
	}
	say("")
	say("   What it put in the kernel, written as the ip commands that make it: source rules, one routing")
	say("   table per secondary ENI, its addresses, a main-table route to VPC B (VPC C's CIDR overlaps")
	say("   VPC A's, so it gets none: see the warning above), the on-premises route, and the NAT's")
	say("   fwmark rules:")
	st, err := simworld.ReadState(w.Instance)
	if err != nil {
		return err
	}
	for _, l := range st.Dump().Grep("proto 210") {
		say("   %s", strings.TrimPrefix(l, "ip "))
	}
	say("   And names a person can use for every ENI's link (`ip addr show %s`, `ping -I device-number-1`):", w.ENI("eth1").ID)
	for _, l := range []string{"eth0", "eth1", "eth2"} {
		var out string
		// The altnames come last in the Apply that configured the ENIs.
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := simworld.WaitFor(wctx, func() (err error) {
			if out, err = w.Instance.IP("-o", "link", "show", "dev", l); err == nil && strings.Count(out, " altname ") < 2 {
				err = errors.New("altnames not there yet")
			}
			return err
		})
		cancel()
		if err != nil {
			return fmt.Errorf("waiting for the altnames of %s: %w", l, err)
		}
		_, names, _ := strings.Cut(strings.ReplaceAll(out, "\\", ""), " altname ")
		say("   ip link show %s: altname %s", l, strings.Join(strings.Fields(names), " "))
	}

	say("")
	say("3. With dualhomed, the same probes:")
	if failed := d.probeAll(ctx, 2*time.Second); failed > 0 {
		return fmt.Errorf("%d probes still fail with dualhomed running", failed)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	say("")
	say("4. The two clients with the same address 10.0.100.50, at the same time (TCP streams + pings):")
	if err := d.sameAddress(ctx); err != nil {
		return err
	}
	say("")
	say("5. Hot attach: ENI eth3 from VPC D (10.3.0.0/16) is attached while dualhomed runs.")
	// dualhomed spaces the IMDS reads new links cause 1s apart; a real attach
	// comes long after the start, so do not measure that spacing.
	time.Sleep(time.Until(start.Add(1500 * time.Millisecond)))
	if err := d.hotAttach(ctx); err != nil {
		return err
	}
	say("")
	say("6. A route to an on-premises network (198.18.0.0/24, behind VPC B's VPN): an unbound connection")
	say("   from the instance itself.")
	if err := d.onPremises(ctx); err != nil {
		return err
	}
	say("")
	say("7. The shared NAT: VPC B's and VPC C's route tables send 0.0.0.0/0 to the instance.")
	if err := d.sharedNAT(ctx); err != nil {
		return err
	}
	say("")
	say("Every reply left through the ENI its request came in on. That is dualhomed's job.")
	return nil
}

// demoConfig is the daemon's configuration beyond the defaults.
const demoConfig = `enis:
  - match: {device_number: 1}
    routes: [198.18.0.0/24]
    nat: true
    nat_sources: [100.64.0.0/16]
  - match: {device_number: 2}
    nat: true
`

// onPremises connects from the instance, unbound, to VPC B's on-premises
// client and shows where the connection left.
func (d *demo) onPremises(ctx context.Context) error {
	w := d.world
	b := w.VPCs["B"]
	if err := w.ServeEcho(b.OnPrem, simworld.EchoPort); err != nil {
		return err
	}
	c, err := simworld.Dial(ctx, w.Instance, netip.AddrPortFrom(b.OnPrem4, simworld.EchoPort), 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	route, err := w.Instance.IP("route", "get", b.OnPrem4.String())
	if err != nil {
		return err
	}
	say("   $ ip route get %s", b.OnPrem4)
	say("   %s", strings.TrimSpace(strings.SplitN(route, "\n", 2)[0]))
	say("   instance -> on-premises %s: TCP connected from %s (eth1's address), out of eth1", b.OnPrem4,
		netip.MustParseAddrPort(c.LocalAddr().String()).Addr().Unmap())
	return nil
}

// sharedNAT connects VPC B's and VPC C's clients, both 100.64.1.5, to the
// internet host at the same moment from the same source port, and shows
// what the NAT keeps out.
func (d *demo) sharedNAT(ctx context.Context) error {
	w := d.world
	inet, err := simworld.ListenEcho(w.Internet, 8080)
	if err != nil {
		return err
	}
	defer inet.Close()
	internet := netip.AddrPortFrom(simworld.InternetAddr, 8080)
	src := netip.AddrPortFrom(simworld.NATClientAddr, 40000)
	var conns []io.Closer
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for _, v := range []string{"B", "C"} {
		c, err := simworld.DialFrom(ctx, w.VPCs[v].NATClient, src, internet, 2*time.Second)
		if err != nil {
			return fmt.Errorf("VPC %s's client to the internet: %w", v, err)
		}
		conns = append(conns, c)
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := simworld.WaitFor(wctx, func() error {
		if len(inet.Peers()) < 2 {
			return errors.New("the internet host has not accepted both connections")
		}
		return nil
	}); err != nil {
		return err
	}
	peers := inet.Peers()
	for i, v := range []string{"B", "C"} {
		say("   VPC %s client %s -> internet %s: connected; the internet host sees %s", v, src, internet, peers[i])
	}
	say("   Two connections with the same address and port, told apart by a conntrack zone per source ENI,")
	say("   both masqueraded to eth0's %s. What the NAT keeps out (a UDP datagram each):", w.ENI("eth0").Primary4())
	a, b, c := w.VPCs["A"], w.VPCs["B"], w.VPCs["C"]
	for _, p := range []struct {
		what     string
		from, to *simworld.NS
		src, dst netip.Addr
	}{
		{"VPC B -> VPC C's router", b.NATClient, c.Router, simworld.NATClientAddr, w.ENI("eth2").Gateway4},
		{"VPC B -> VPC A's client", b.NATClient, a.Client, simworld.NATClientAddr, a.Client4},
		{"VPC B's 10.1.100.50 (not in nat_sources) -> internet", b.Client, w.Internet, b.Client4, simworld.InternetAddr},
	} {
		ok, err := simworld.UDPArrives(p.from, p.src, p.to, p.dst)
		if err != nil {
			return err
		}
		say("   %-50s %s", p.what, map[bool]string{true: "arrives", false: "dropped"}[ok])
	}
	out, err := w.Dualhomed(ctx, "status")
	if err != nil {
		return err
	}
	say("   $ dualhomed status  (the NAT's counters)")
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "source (") || strings.HasPrefix(l, "NAT ") {
			say("   %s", l)
		}
	}
	return nil
}

func (d *demo) describe() {
	w := d.world
	say("The instance (namespace %s) and its ENIs, each a veth whose other end is its VPC's router:", w.Instance.Name)
	for _, l := range []string{"eth0", "eth1", "eth2"} {
		e := w.ENI(l)
		role := "secondary"
		if e.IsPrimary() {
			role = "primary  "
		}
		var as []string
		for _, a := range append(e.IPv4s(), e.IPv6s()...) {
			as = append(as, a.String())
		}
		note := ""
		if e.VPC.Name == "C" {
			note = "  <- same CIDR as VPC A"
		}
		say("  %s %s ENI  VPC %s %-14s %s%s", l, role, e.VPC.Name, e.VPC.CIDR4, strings.Join(as, ", "), note)
	}
	say("Clients, one per VPC, behind the VPC's router:")
	for _, v := range []string{"A", "B", "C"} {
		vpc := w.VPCs[v]
		addr := vpc.Client4.String()
		if vpc.Client6.IsValid() {
			addr += ", " + vpc.Client6.String()
		}
		note := ""
		if v == "C" {
			note = "  <- same address as VPC A's client"
		}
		say("  VPC %s client  %s%s", v, addr, note)
		if vpc.OnPrem != nil {
			say("  VPC %s on-premises client %s  <- outside every VPC, reached through VPC %s's router", v, vpc.OnPrem4, v)
		}
	}
	say("As after boot: each ENI has its DHCP address, the main default route goes via eth0, nothing else.")
}

// probeAll probes every ENI address from its VPC's client, prints one line
// each, and returns how many failed.
func (d *demo) probeAll(ctx context.Context, timeout time.Duration) (failed int) {
	w := d.world
	type probe struct {
		client   *simworld.NS
		what     string // client or on-prem
		from, to netip.Addr
		eni      *simworld.ENI
	}
	var probes []probe
	for _, l := range []string{"eth0", "eth1", "eth2"} {
		e := w.ENI(l)
		for _, a := range append(e.IPv4s(), e.IPv6s()...) {
			from := e.VPC.Client4
			if a.Is6() {
				from = e.VPC.Client6
			}
			probes = append(probes, probe{e.VPC.Client, "client", from, a, e})
		}
		if e.VPC.OnPrem != nil {
			probes = append(probes, probe{e.VPC.OnPrem, "on-prem", e.VPC.OnPrem4, e.Primary4(), e})
		}
	}
	for _, p := range probes {
		if ctx.Err() != nil {
			return failed
		}
		pinged := make(chan error, 1)
		go func() { pinged <- simworld.Ping(p.client, p.to, timeout) }()
		tcpErr := simworld.EchoOnce(p.client, netip.AddrPortFrom(p.to, simworld.EchoPort), timeout)
		pingErr := <-pinged
		if pingErr != nil || tcpErr != nil {
			failed++
		}
		say("   VPC %s %-7s %-15s -> %s %-14s  ping %-4s  tcp %-4s  reply route: %s",
			p.eni.VPC.Name, p.what, p.from, p.eni.Link, p.to, okFail(pingErr), okFail(tcpErr), replyRoute(w, p.to, p.from))
	}
	return failed
}

// replyRoute is where the instance's kernel sends a reply from src to dst:
// `ip route get <dst> from <src>`, shortened to "via <gw> dev <link> [table N]".
func replyRoute(w *simworld.World, src, dst netip.Addr) string {
	out, err := w.Instance.IP("route", "get", dst.String(), "from", src.String())
	if err != nil {
		return "none (unreachable)"
	}
	f := strings.Fields(strings.SplitN(out, "\n", 2)[0])
	var keep []string
	for i := 0; i+1 < len(f); i++ {
		switch f[i] {
		case "via", "dev", "table":
			keep = append(keep, f[i], f[i+1])
			i++
		}
	}
	return strings.Join(keep, " ")
}

func okFail(err error) string {
	if err != nil {
		return "FAIL"
	}
	return "ok"
}

func (d *demo) sameAddress(ctx context.Context) error {
	w := d.world
	a, c := w.VPCs["A"], w.VPCs["C"]
	eth0, eth2 := w.ENI("eth0"), w.ENI("eth2")
	sa, err := simworld.StartStream(a.Client, netip.AddrPortFrom(eth0.Primary4(), simworld.EchoPort), 10*time.Millisecond)
	if err != nil {
		return err
	}
	sc, err := simworld.StartStream(c.Client, netip.AddrPortFrom(eth2.Primary4(), simworld.EchoPort), 10*time.Millisecond)
	if err != nil {
		sa.Stop()
		return err
	}
	type res struct {
		r   simworld.PingResult
		err error
	}
	pa := make(chan res, 1)
	go func() {
		r, err := simworld.PingRun(ctx, a.Client, eth0.Primary4(), 20, 50*time.Millisecond, time.Second)
		pa <- res{r, err}
	}()
	rc, errC := simworld.PingRun(ctx, c.Client, eth2.Primary4(), 20, 50*time.Millisecond, time.Second)
	ra := <-pa
	na, errA := sa.Stop()
	nc, errSC := sc.Stop()
	if err := errors.Join(ra.err, errC, errA, errSC); err != nil {
		return err
	}
	say("   VPC A client 10.0.100.50 -> eth0 %s: %d/%d pings, %d TCP round trips", eth0.Primary4(), ra.r.Received, ra.r.Sent, na)
	say("   VPC C client 10.0.100.50 -> eth2 %s: %d/%d pings, %d TCP round trips", eth2.Primary4(), rc.Received, rc.Sent, nc)
	if ra.r.Received != ra.r.Sent || rc.Received != rc.Sent {
		return errors.New("pings were lost between the same-address clients")
	}
	return nil
}

// hotAttach attaches eth3 and measures the time from its link's arrival in the
// instance to the first TCP reply its VPC's client gets.
func (d *demo) hotAttach(ctx context.Context) error {
	w := d.world
	eth3 := w.ENI("eth3")
	arrived, err := w.HotAttach(eth3)
	if err != nil {
		return err
	}
	dst := netip.AddrPortFrom(eth3.Primary4(), simworld.EchoPort)
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	err = simworld.WaitFor(wctx, func() error { return simworld.EchoOnce(eth3.VPC.Client, dst, 25*time.Millisecond) })
	took := time.Since(arrived)
	if err != nil {
		return fmt.Errorf("VPC D's client got no reply from eth3 %s after the link arrived: %w", took.Round(time.Millisecond), err)
	}
	say("   VPC D client %s -> eth3 %s: first TCP reply %s after the link appeared in the instance",
		eth3.VPC.Client4, eth3.Primary4(), took.Round(time.Millisecond))
	say("   (no poll timer involved: dualhomed reacted to the link's netlink event).")
	return nil
}
