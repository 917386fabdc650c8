package agent

import (
	"context"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/imds/emulator"
	"github.com/dualhomed/dualhomed/netcfg"
	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// fullScaleReconciler is the daemon's pipeline on a configured full-scale
// instance (15 ENIs, 50 IPv4 + 50 IPv6 addresses and 4 delegated prefixes
// each: about 3,100 objects), with IMDS the emulator, unpaced, in-process.
func fullScaleReconciler(b *testing.B) *Reconciler {
	nstest.RequireRoot(b)
	ns, router := nstest.New(b), nstest.New(b)
	for _, n := range []*nstest.NS{router, ns} {
		n.Sysctl(b, "net/ipv6/conf/all/accept_dad", "0")
		n.Sysctl(b, "net/ipv6/conf/default/accept_dad", "0")
	}
	inst := emulator.ExampleInstance(15, 50, 50, 4, 1)
	emu := emulator.New(inst)
	url, err := emu.Start("127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { emu.Close() })
	for i, e := range inst.ENIs {
		ns.Veth(b, "ens"+strconv.Itoa(i), e.MAC, router, "r"+strconv.Itoa(i))
	}
	cfg := DefaultConfig()
	cfg.StateDir = b.TempDir()
	cfg.IMDS = IMDSConfig{Endpoint: url, Timeout: DefaultIMDSTimeout}
	k, err := netcfg.NewKernel(ns.Handle, cfg.StateDir, cfg.Netcfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(k.Close)
	src, _ := testSource(cfg.IMDS)
	rec := atOnce(NewReconciler(src, k, cfg))
	ctx := context.Background()
	if rep, err := rec.Reconcile(ctx, TriggerStart, false); err != nil || !rep.OK() || configured(rep) != 14 {
		b.Fatalf("configuring: %v %s", err, rep.Summary())
	}
	time.Sleep(100 * time.Millisecond) // the kernel settles
	if rep, err := rec.Reconcile(ctx, TriggerStart, false); err != nil || rep.Writes != 0 {
		b.Fatalf("not a no-op: %v, %d writes", err, rep.Writes)
	}
	return rec
}

// BenchmarkFullScaleAgent measures the daemon's no-op reconciles at full
// scale, with the process's CPU time per reconcile (the emulator's
// included, the same in every variant):
//   - event: what a kernel event runs when nothing changed (no IMDS read);
//   - poll: the poll timer's, over whole cycles of FullReadEvery polls,
//     with a kernel feed that announces nothing (the quiet memo holds);
//   - poll-unwatched: the same without a feed: every poll reads the kernel.
func BenchmarkFullScaleAgent(b *testing.B) {
	rec := fullScaleReconciler(b)
	ctx := context.Background()
	run := func(b *testing.B, t Trigger) {
		b.ReportAllocs()
		c0 := processCPU(b)
		for b.Loop() {
			if rep, err := rec.Reconcile(ctx, t, false); err != nil || rep.Writes != 0 {
				b.Fatalf("not a no-op: %v, %d writes", err, rep.Writes)
			}
		}
		b.ReportMetric(float64(processCPU(b)-c0)/float64(b.N), "cpu-ns/op")
	}
	b.Run("event", func(b *testing.B) { run(b, TriggerAddr) })
	b.Run("poll-unwatched", func(b *testing.B) { run(b, TriggerPoll) })
	rec.KernelChanged() // a feed that stays quiet from now on
	b.Run("poll", func(b *testing.B) { run(b, TriggerPoll) })
}

// processCPU is the CPU time (user and system, every thread) the process
// used so far: on a shared machine it moves less than wall time.
func processCPU(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
