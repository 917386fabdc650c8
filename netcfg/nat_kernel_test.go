package netcfg

import (
	"fmt"
	"net/netip"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// natKTWorld is an instance namespace with four fake ENIs eth0..eth3 (veth
// pairs to a router namespace) and a NATTable acting in it: eth0 is the
// egress, eth1 (VPC B) and eth2 (VPC C, overlapping B) are NAT sources, eth3
// (VPC D) is managed without NAT.
type natKTWorld struct {
	ns       *nstest.NS
	router   *nstest.NS
	nt       *NATTable
	stateDir string
	links    map[string]Link
}

func newNATKTWorld(t *testing.T) *natKTWorld {
	t.Helper()
	router, ns := nstest.New(t), nstest.New(t)
	w := &natKTWorld{ns: ns, router: router, stateDir: t.TempDir(), links: map[string]Link{}}
	for i := range 4 {
		name := fmt.Sprintf("eth%d", i)
		l := ns.Veth(t, name, ktMAC(i), router, fmt.Sprintf("vpc%d", i))
		w.links[name] = Link{Index: l.Attrs().Index, Name: name, MAC: ktMAC(i)}
	}
	nt, err := NewNATTable(ns.Handle, w.stateDir)
	if err != nil {
		t.Fatalf("NewNATTable: %v", err)
	}
	t.Cleanup(nt.Close)
	w.nt = nt
	return w
}

func prefixes(ss ...string) []netip.Prefix {
	var ps []netip.Prefix
	for _, s := range ss {
		ps = append(ps, netip.MustParsePrefix(s))
	}
	return ps
}

// enis is the four ENIs of the world; natSources narrows eth1's sources.
func (w *natKTWorld) enis(natSources ...string) []NATENI {
	return []NATENI{
		{Link: w.links["eth0"], Primary: true, FirstIPv4: netip.MustParseAddr("10.0.0.10"), VPCCIDRs: prefixes("10.0.0.0/16")},
		{Link: w.links["eth1"], Device: 1, FirstIPv4: netip.MustParseAddr("10.1.0.11"), VPCCIDRs: prefixes("10.1.0.0/16"),
			NAT: true, NATSources: prefixes(natSources...)},
		{Link: w.links["eth2"], Device: 2, FirstIPv4: netip.MustParseAddr("10.1.0.12"), VPCCIDRs: prefixes("10.1.0.0/16", "100.64.0.0/16"), NAT: true},
		{Link: w.links["eth3"], Card: 1, Device: 1, FirstIPv4: netip.MustParseAddr("172.31.5.30"), VPCCIDRs: prefixes("172.31.0.0/16")},
	}
}

func (w *natKTWorld) nat(t *testing.T, natSources ...string) NAT {
	t.Helper()
	n, err := DesiredNAT(DefaultConfig(), w.enis(natSources...))
	if err != nil {
		t.Fatalf("DesiredNAT: %v", err)
	}
	return n
}

func (w *natKTWorld) apply(t *testing.T, n NAT) int {
	t.Helper()
	writes, err := w.nt.Apply(n)
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return writes
}

// requireNFT skips the test unless the nft binary is installed (CI installs
// it: .ci/run).
func requireNFT(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("skipping: needs the nft binary to cross-check the table (apt-get install nftables)")
	}
}

var nftCounterValues = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// nftList is `nft list table inet dualhomed`, counters without values; ""
// when the table does not exist. nft is used by tests only, to see the
// kernel's table through another program's eyes.
func (w *natKTWorld) nftList(t *testing.T) string {
	t.Helper()
	requireNFT(t)
	out, err := w.ns.Output("nft", "list", "table", "inet", NATTableName)
	if err != nil {
		if strings.Contains(err.Error(), "No such file or directory") {
			return ""
		}
		t.Fatalf("nft list: %v", err)
	}
	return nftCounterValues.ReplaceAllString(out, "counter")
}

func TestNATApplyInstallsTheRuleset(t *testing.T) {
	w := newNATKTWorld(t)
	n := w.nat(t)
	if writes := w.apply(t, n); writes == 0 {
		t.Fatal("first Apply wrote nothing")
	}
	if got, want := w.nftList(t), n.Ruleset(); got != want {
		t.Errorf("nft list differs from Ruleset:\n--- nft\n%s\n--- Ruleset\n%s", got, want)
	}
	if writes := w.apply(t, n); writes != 0 {
		t.Errorf("second Apply made %d writes, want 0", writes)
	}
}
