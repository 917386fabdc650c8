package imds_test

import (
	"context"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// BenchmarkSnapshot15ENIs reads an instance with 15 ENIs of 50 IPv4 and 50
// IPv6 addresses each from the emulator on loopback, and reports the HTTP
// requests per snapshot (token refreshes included) next to the time.
//
//	unpaced:  the client's raw cost (MaxRequestsPerSecond < 0).
//	default:  with the default pacing of 100 requests/s (burst 250) that
//	          keeps IMDS well under its link-local packet budget. Back to
//	          back, the time is the sustained rate's, by design; a single
//	          snapshot after an idle poll interval fits in the burst and
//	          costs the unpaced time.
func BenchmarkSnapshot15ENIs(b *testing.B) {
	for _, bc := range []struct {
		name string
		rate float64
	}{
		{"unpaced", -1},
		{"default", 0},
	} {
		b.Run(bc.name, func(b *testing.B) {
			inst := emulator.ExampleInstance(15, 50, 50, 0, 1)
			_, c := startEmulator(b, inst, imds.Options{MaxRequestsPerSecond: bc.rate})
			if bc.rate == 0 {
				// startEmulator turns pacing off for tests; put the default back.
				var err error
				c, err = imds.New(imds.Options{Endpoint: c.Endpoint()})
				if err != nil {
					b.Fatal(err)
				}
			}
			ctx := context.Background()
			before := c.Requests()
			b.ReportAllocs()
			for b.Loop() {
				snap, err := c.Snapshot(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if len(snap.ENIs) != 15 || len(snap.ENIs[14].IPv6s) != 50 {
					b.Fatalf("snapshot has %d ENIs", len(snap.ENIs))
				}
			}
			b.ReportMetric(float64(c.Requests()-before)/float64(b.N), "requests/op")
		})
	}
}

// BenchmarkRefresh15ENIs measures the daemon's cheaper reads at full scale
// (15 ENIs x 50 IPv4 + 50 IPv6 + 4 prefixes), unpaced: a poll (dynamic keys
// of every ENI) and a hot attach (only the new ENI, the MAC listing given).
func BenchmarkRefresh15ENIs(b *testing.B) {
	inst := emulator.ExampleInstance(15, 50, 50, 4, 1)
	_, c := startEmulator(b, inst, imds.Options{})
	ctx := context.Background()
	prev, err := c.Snapshot(ctx)
	if err != nil {
		b.Fatal(err)
	}
	run := func(b *testing.B, prev imds.Snapshot, u imds.Update) {
		before := c.Requests()
		b.ReportAllocs()
		for b.Loop() {
			snap, err := c.Refresh(ctx, prev, u)
			if err != nil {
				b.Fatal(err)
			}
			if len(snap.ENIs) != len(inst.ENIs) {
				b.Fatalf("refresh has %d ENIs, want %d", len(snap.ENIs), len(inst.ENIs))
			}
		}
		b.ReportMetric(float64(c.Requests()-before)/float64(b.N), "requests/op")
	}
	b.Run("poll", func(b *testing.B) { run(b, prev, imds.Update{Dynamic: true}) })
	b.Run("hot-attach", func(b *testing.B) {
		// prev without the last ENI: the listing names it as new.
		known := prev
		known.ENIs = prev.ENIs[:len(prev.ENIs)-1]
		macs := make([]string, 0, len(prev.ENIs))
		for _, e := range prev.ENIs {
			macs = append(macs, e.MAC)
		}
		run(b, known, imds.Update{MACs: macs})
	})
}
