package netcfg

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/netcfg/nstest"
	"golang.org/x/sys/unix"
)

// Full scale: the largest single-card instance types take 15 ENIs with 50
// IPv4 and 50 IPv6 addresses each. Every secondary ENI here also has one
// delegated prefix per family, and all secondaries sit in VPC B.
const (
	fullScaleENIs  = 15
	fullScaleAddrs = 50
)

// fullScaleWriteCount is what a cold apply of fullScaleSnapshot must write:
// per secondary 100 addresses, 4 table routes, 102 rules, 1 rp_filter; 2
// main-table routes to VPC B; the primary's 100 addresses; 2 altnames per ENI.
const fullScaleWriteCount = (fullScaleENIs-1)*(2*fullScaleAddrs+4+2*fullScaleAddrs+2+1) + 2 + 2*fullScaleAddrs + 2*fullScaleENIs

func fullScaleSnapshot() imds.Snapshot {
	snap := imds.Snapshot{PrimaryMAC: ktMAC(0)}
	for i := range fullScaleENIs {
		e := imds.ENI{
			MAC: ktMAC(i), Ready: true, DeviceNumber: i, InterfaceID: fmt.Sprintf("eni-%d", i),
			VPCID: "vpc-b", SubnetID: fmt.Sprintf("subnet-%d", i),
			SubnetIPv4CIDR:  netip.MustParsePrefix(fmt.Sprintf("10.1.%d.0/24", i)),
			VPCIPv4CIDRs:    []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")},
			SubnetIPv6CIDRs: []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("2600:1f18:b:%x::/64", i))},
			VPCIPv6CIDRs:    []netip.Prefix{netip.MustParsePrefix("2600:1f18:b::/56")},
		}
		if i == 0 {
			e.VPCID = "vpc-a"
			e.SubnetIPv4CIDR = netip.MustParsePrefix("10.0.0.0/24")
			e.VPCIPv4CIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/16")}
			e.SubnetIPv6CIDRs = []netip.Prefix{netip.MustParsePrefix("2600:1f18:a::/64")}
			e.VPCIPv6CIDRs = []netip.Prefix{netip.MustParsePrefix("2600:1f18:a::/56")}
		} else {
			e.IPv4Prefixes = []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("10.1.%d.128/28", i))}
			e.IPv6Prefixes = []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("2600:1f18:b:%x:1::/80", i))}
		}
		v4 := e.SubnetIPv4CIDR.Addr().As4()
		v6 := e.SubnetIPv6CIDRs[0].Addr().As16()
		for j := range fullScaleAddrs {
			v4[3] = byte(10 + j)
			v6[15] = byte(0x10 + j)
			e.LocalIPv4s = append(e.LocalIPv4s, netip.AddrFrom4(v4))
			e.IPv6s = append(e.IPv6s, netip.AddrFrom16(v6))
		}
		snap.ENIs = append(snap.ENIs, e)
	}
	return snap
}

// fullScaleKernel builds the instance namespace with fullScaleENIs links.
func fullScaleKernel(tb testing.TB) *Kernel {
	tb.Helper()
	router := nstest.New(tb)
	ns := nstest.New(tb)
	for _, n := range []*nstest.NS{router, ns} {
		n.Sysctl(tb, "net/ipv6/conf/all/accept_dad", "0")
		n.Sysctl(tb, "net/ipv6/conf/default/accept_dad", "0")
	}
	for i := range fullScaleENIs {
		ns.Veth(tb, fmt.Sprintf("eth%d", i), ktMAC(i), router, fmt.Sprintf("vpc%d", i))
	}
	k, err := NewKernel(ns.Handle, tb.TempDir(), DefaultConfig())
	if err != nil {
		tb.Fatalf("NewKernel: %v", err)
	}
	tb.Cleanup(k.Close)
	return k
}

// reconcileOnce is the agent's pipeline: Observe, Desired, Diff, Apply.
func reconcileOnce(tb testing.TB, k *Kernel, snap imds.Snapshot) int {
	tb.Helper()
	obs, err := k.Observe()
	if err != nil {
		tb.Fatalf("Observe: %v", err)
	}
	res := Desired(snap, obs, DefaultConfig())
	n, err := k.Apply(Diff(obs.Owned, res.State))
	if err != nil {
		tb.Fatalf("Apply: %v", err)
	}
	return n
}

func TestFullScaleColdApply(t *testing.T) {
	k := fullScaleKernel(t)
	snap := fullScaleSnapshot()
	start := time.Now()
	writes := reconcileOnce(t, k, snap)
	cold := time.Since(start)
	if writes != fullScaleWriteCount {
		t.Errorf("cold apply made %d writes, want %d", writes, fullScaleWriteCount)
	}
	start = time.Now()
	if n := reconcileOnce(t, k, snap); n != 0 {
		t.Errorf("second reconcile made %d writes, want 0", n)
	}
	noop := time.Since(start)
	start = time.Now()
	n, err := k.Cleanup()
	if err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	if n != fullScaleWriteCount {
		t.Errorf("cleanup made %d writes, want %d", n, fullScaleWriteCount)
	}
	t.Logf("%d ENIs x %d+%d addresses: cold reconcile %d writes in %v; no-op reconcile in %v; cleanup %d writes in %v (informative, -race build)",
		fullScaleENIs, fullScaleAddrs, fullScaleAddrs, writes, cold, noop, n, time.Since(start))
}

// BenchmarkColdApplyFullScale measures a cold reconcile (Observe, Desired,
// Diff, Apply) of the full-scale snapshot; the cleanup between rounds is not
// timed.
func BenchmarkColdApplyFullScale(b *testing.B) {
	k := fullScaleKernel(b)
	snap := fullScaleSnapshot()
	writes := 0
	for b.Loop() {
		writes = reconcileOnce(b, k, snap)
		b.StopTimer()
		if _, err := k.Cleanup(); err != nil {
			b.Fatalf("Cleanup: %v", err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(writes), "writes/op")
}

// BenchmarkNoopReconcileFullScale measures the steady state: a reconcile
// that finds nothing to change (three dumps, Desired, Diff, zero writes).
func BenchmarkNoopReconcileFullScale(b *testing.B) {
	k := fullScaleKernel(b)
	snap := fullScaleSnapshot()
	reconcileOnce(b, k, snap)
	defer reportCPU(b)()
	for b.Loop() {
		if n := reconcileOnce(b, k, snap); n != 0 {
			b.Fatalf("no-op reconcile made %d writes", n)
		}
	}
	b.StopTimer()
	if _, err := k.Cleanup(); err != nil {
		b.Fatalf("Cleanup: %v", err)
	}
}

// BenchmarkConflictsFullScale measures the conflict check a reconcile runs,
// on what Observe read of the full-scale configured kernel.
func BenchmarkConflictsFullScale(b *testing.B) {
	k := fullScaleKernel(b)
	snap := fullScaleSnapshot()
	reconcileOnce(b, k, snap)
	obs, err := k.Observe()
	if err != nil {
		b.Fatalf("Observe: %v", err)
	}
	desired := Desired(snap, obs, DefaultConfig()).State
	for b.Loop() {
		if w := Conflicts(obs, desired, DefaultConfig()); len(w) != 0 {
			b.Fatalf("Conflicts: %v", w)
		}
	}
	b.StopTimer()
	if _, err := k.Cleanup(); err != nil {
		b.Fatalf("Cleanup: %v", err)
	}
}

// BenchmarkObserveParts times each read Observe makes, one by one, on the
// configured full-scale kernel: where a no-op reconcile's kernel time goes.
func BenchmarkObserveParts(b *testing.B) {
	k := fullScaleKernel(b)
	snap := fullScaleSnapshot()
	reconcileOnce(b, k, snap)
	_, rpFilters, _, err := k.dump.links()
	if err != nil {
		b.Fatal(err)
	}
	parts := []struct {
		name string
		read func() error
	}{
		{"links", func() error { _, _, _, err := k.dump.links(); return err }},
		{"addrs-ipv4", func() error { _, err := k.dump.addrs(unix.AF_INET); return err }},
		{"addrs-ipv6", func() error { _, err := k.dump.addrs(unix.AF_INET6); return err }},
		{"rules", func() error { _, _, _, err := k.rules(); return err }},
		{"routes-except-local", func() error { _, err := k.dump.routes(); return err }},
		// As Observe reads them: from the links dump just made.
		{"rp-filters", func() error { _, err := k.ownedRPFilters(rpFilters); return err }},
		{"observe", func() error { _, err := k.Observe(); return err }},
	}
	for _, p := range parts {
		b.Run(p.name, func(b *testing.B) {
			b.ReportAllocs()
			defer reportCPU(b)()
			for b.Loop() {
				if err := p.read(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	// Sorting what Observe read, in the order the kernel gave it.
	unsorted := kernelOrderOwned(b, k)
	b.Run("sort-owned", func(b *testing.B) {
		b.ReportAllocs()
		st := unsorted.clone()
		for b.Loop() {
			copy(st.Routes, unsorted.Routes)
			copy(st.Rules, unsorted.Rules)
			copy(st.Addrs, unsorted.Addrs)
			copy(st.RPFilters, unsorted.RPFilters)
			st.Sort()
		}
	})
	b.StopTimer()
	if _, err := k.Cleanup(); err != nil {
		b.Fatalf("Cleanup: %v", err)
	}
}

// kernelOrderOwned is the state Observe reads, in the order the kernel dumps
// it (before Observe sorts it).
func kernelOrderOwned(tb testing.TB, k *Kernel) State {
	tb.Helper()
	var st State
	var err error
	if st.Rules, _, _, err = k.rules(); err != nil {
		tb.Fatal(err)
	}
	all, err := k.dump.addrs(unix.AF_UNSPEC)
	if err != nil {
		tb.Fatal(err)
	}
	if st.Addrs, _, err = k.ownedAddrs(all); err != nil {
		tb.Fatal(err)
	}
	routes, err := k.dump.routes()
	if err != nil {
		tb.Fatal(err)
	}
	for _, r := range routes {
		if k.cfg.ownsRoute(r) {
			st.Routes = append(st.Routes, r.Route)
		}
	}
	_, rpFilters, _, err := k.dump.links()
	if err != nil {
		tb.Fatal(err)
	}
	if st.RPFilters, err = k.ownedRPFilters(rpFilters); err != nil {
		tb.Fatal(err)
	}
	return st
}

// reportCPU returns a function that reports the CPU time the process used
// (user and system, every thread) per iteration since reportCPU was called.
// On a shared machine it moves less than wall time with the other load.
func reportCPU(b *testing.B) func() {
	start := processCPU(b)
	return func() {
		if b.N > 0 {
			b.ReportMetric(float64(processCPU(b)-start)/float64(b.N), "cpu-ns/op")
		}
	}
}

func processCPU(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
