package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// The daemon under test, built once per test binary by TestMain.
var (
	dualhomedBin string
	dualhomedErr error
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		return m.Run() // every scenario skips with a message
	}
	if removed, err := simworld.Sweep(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: sweeping leftovers of earlier runs: %v\n", err)
	} else if len(removed) > 0 {
		fmt.Fprintf(os.Stderr, "e2e: removed leftovers of crashed runs: %s\n", strings.Join(removed, " "))
	}
	dir, err := os.MkdirTemp("", "dualhomed-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	dualhomedBin, dualhomedErr = simworld.Build(dir, simworld.DualhomedPkg, raceEnabled)
	return m.Run()
}

// newWorld builds a world for t and removes it when t ends.
func newWorld(t *testing.T) *simworld.World { return simworld.ForTest(t, dualhomedBin) }

// needBinaries fails the test when the daemon could not be built.
func needBinaries(t *testing.T) {
	t.Helper()
	if dualhomedErr != nil {
		t.Fatalf("cmd/dualhomed does not build: %v", dualhomedErr)
	}
}

// probe is one connection attempt from a client to an address of the instance.
type probe struct {
	name string
	from *simworld.NS
	to   netip.Addr
}

func (p probe) String() string { return p.name }

// ping and tcp run the probe's ICMP echo and TCP echo round trip.
func (p probe) ping(timeout time.Duration) error {
	return simworld.Ping(p.from, p.to, timeout)
}

func (p probe) tcp(timeout time.Duration) error {
	return simworld.EchoOnce(p.from, netip.AddrPortFrom(p.to, simworld.EchoPort), timeout)
}

// both runs ICMP and TCP at once and returns their errors.
func (p probe) both(timeout time.Duration) (pingErr, tcpErr error) {
	done := make(chan error, 1)
	go func() { done <- p.ping(timeout) }()
	tcpErr = p.tcp(timeout)
	return <-done, tcpErr
}

// clientProbes returns, for each attached ENI, its VPC's clients probing its addresses.
func clientProbes(w *simworld.World, links ...string) []probe {
	var ps []probe
	for _, l := range links {
		e := w.ENI(l)
		for _, a := range e.IPv4s() {
			ps = append(ps, probe{fmt.Sprintf("VPC %s client %s -> %s %s", e.VPC.Name, e.VPC.Client4, l, a), e.VPC.Client, a})
		}
		for _, a := range e.IPv6s() {
			ps = append(ps, probe{fmt.Sprintf("VPC %s client %s -> %s %s", e.VPC.Name, e.VPC.Client6, l, a), e.VPC.Client, a})
		}
		if e.VPC.OnPrem != nil {
			for _, a := range e.IPv4s() {
				ps = append(ps, probe{fmt.Sprintf("VPC %s on-premises client %s -> %s %s", e.VPC.Name, e.VPC.OnPrem4, l, a), e.VPC.OnPrem, a})
			}
		}
	}
	return ps
}

// runAll runs every probe at once (ICMP and TCP) and returns one error per probe.
func runAll(ps []probe, timeout time.Duration) map[string][2]error {
	type res struct {
		name string
		errs [2]error
	}
	ch := make(chan res, len(ps))
	for _, p := range ps {
		go func() {
			pe, te := p.both(timeout)
			ch <- res{p.name, [2]error{pe, te}}
		}()
	}
	out := map[string][2]error{}
	for range ps {
		r := <-ch
		out[r.name] = r.errs
	}
	return out
}
