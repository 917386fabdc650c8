package agent

import (
	"context"
	"strconv"
	"testing"

	"github.com/dualhomed/dualhomed/imds/emulator"
	"github.com/dualhomed/dualhomed/netcfg"
	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// BenchmarkReconcileNoOp measures the reconcile the daemon runs on a kernel
// event when nothing changed: Observe (netlink dumps), Desired, Diff, and no
// write, for an instance with 16 ENIs of 4 addresses each, from the last good
// snapshot (no IMDS read).
func BenchmarkReconcileNoOp(b *testing.B) {
	nstest.RequireRoot(b)
	ns, router := nstest.New(b), nstest.New(b)
	inst := emulator.ExampleInstance(16, 4, 0, 0, 1)
	emu := emulator.New(inst)
	url, err := emu.Start("127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer emu.Close()
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
	defer k.Close()
	src, _ := testSource(cfg.IMDS)
	rec := atOnce(NewReconciler(src, k, cfg))
	ctx := context.Background()
	if rep, err := rec.Reconcile(ctx, TriggerStart, false); err != nil || !rep.OK() || configured(rep) != 15 {
		b.Fatalf("configuring: %v %s", err, rep.Summary())
	}
	b.ResetTimer()
	for b.Loop() {
		rep, err := rec.Reconcile(ctx, TriggerAddr, false)
		if err != nil || rep.Writes != 0 || rep.Fresh {
			b.Fatalf("not a no-op: err=%v writes=%d fresh=%v", err, rep.Writes, rep.Fresh)
		}
	}
}
