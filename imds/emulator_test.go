package imds_test

import (
	"context"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// These tests run the client against the IMDS emulator (imds/emulator): the
// real protocol, an instance model we control, and injected faults.

func startEmulator(t testing.TB, inst emulator.Instance, opts imds.Options) (*emulator.Server, *imds.Client) {
	t.Helper()
	srv := emulator.New(inst)
	url, err := srv.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	opts.Endpoint = url
	if opts.MaxRequestsPerSecond == 0 {
		opts.MaxRequestsPerSecond = -1
	}
	c, err := imds.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return srv, c
}

// wantENIs is what a snapshot of a fully settled model must say: every ENI
// ready, sorted by MAC.
func wantENIs(inst emulator.Instance) []imds.ENI {
	want := emulator.Instance{ENIs: inst.ENIs}.Clone().ENIs
	for i := range want {
		want[i].Ready = true
	}
	slices.SortFunc(want, func(a, b imds.ENI) int { return strings.Compare(a.MAC, b.MAC) })
	return want
}

func snapshot(t *testing.T, c *imds.Client) imds.Snapshot {
	t.Helper()
	snap, err := c.Snapshot(context.Background())
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	return snap
}

func TestEmulatorSnapshotMatchesModel(t *testing.T) {
	for _, tc := range []struct {
		name                           string
		n, ipv4, ipv6, prefixes, cards int
	}{
		{"dual stack", 3, 3, 2, 2, 1},
		{"IPv6-only ENIs", 2, 0, 3, 1, 1},
		{"two network cards", 4, 2, 1, 0, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inst := emulator.ExampleInstance(tc.n, tc.ipv4, tc.ipv6, tc.prefixes, tc.cards)
			srv, c := startEmulator(t, inst, imds.Options{})
			snap := snapshot(t, c)
			if snap.PrimaryMAC != inst.PrimaryMAC {
				t.Errorf("PrimaryMAC = %q, want %q", snap.PrimaryMAC, inst.PrimaryMAC)
			}
			if want := wantENIs(inst); !reflect.DeepEqual(snap.ENIs, want) {
				t.Errorf("ENIs differ from the model:\n got %+v\nwant %+v", snap.ENIs, want)
			}
			// Our count and the emulator's agree, and no read was a 404.
			st := srv.Stats()
			if int64(snap.Requests) != st.Requests || c.Requests() != uint64(st.Requests) {
				t.Errorf("client counted %d (cumulative %d), emulator served %d", snap.Requests, c.Requests(), st.Requests)
			}
			if st.ByStatus[404] != 0 || st.TokenRequests != 1 {
				t.Errorf("emulator saw %d 404s and %d token requests, want 0 and 1", st.ByStatus[404], st.TokenRequests)
			}
		})
	}
}

func TestEmulatorHotAttachAndDetach(t *testing.T) {
	inst := emulator.ExampleInstance(2, 2, 1, 0, 1)
	srv, c := startEmulator(t, inst, imds.Options{})
	snapshot(t, c)

	extra := emulator.ExampleInstance(3, 2, 1, 0, 1).ENIs[2]
	if err := srv.AttachENI(extra); err != nil {
		t.Fatal(err)
	}
	// A MAC listed before its keys exist, then device-number 0 for two reads:
	// not ready (never device 0), then ready with the right device.
	if err := srv.SetFaults(emulator.Faults{PendingMACs: []string{extra.MAC}}); err != nil {
		t.Fatal(err)
	}
	e := eni(t, snapshot(t, c), extra.MAC)
	if e.Ready || e.DeviceNumber != imds.DeviceNumberUnknown {
		t.Errorf("pending MAC: Ready=%v DeviceNumber=%d, want not ready and unknown", e.Ready, e.DeviceNumber)
	}
	if err := srv.SetFaults(emulator.Faults{DeviceNumberZeroReads: map[string]int{extra.MAC: 2}}); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		snap := snapshot(t, c)
		if e := eni(t, snap, extra.MAC); e.Ready || e.DeviceNumber != imds.DeviceNumberUnknown || !strings.Contains(e.NotReadyReason, "device-number 0") {
			t.Errorf("read %d with device-number 0: Ready=%v DeviceNumber=%d reason %q", i, e.Ready, e.DeviceNumber, e.NotReadyReason)
		}
		for _, other := range inst.ENIs {
			if !eni(t, snap, other.MAC).Ready {
				t.Errorf("ENI %s not ready while another ENI settles", other.MAC)
			}
		}
	}
	if e := eni(t, snapshot(t, c), extra.MAC); !e.Ready || e.DeviceNumber != extra.DeviceNumber {
		t.Errorf("settled: Ready=%v DeviceNumber=%d, want ready device %d (%s)", e.Ready, e.DeviceNumber, extra.DeviceNumber, e.NotReadyReason)
	}

	if err := srv.DetachENI(extra.MAC); err != nil {
		t.Fatal(err)
	}
	if _, ok := snapshot(t, c).ENI(extra.MAC); ok {
		t.Errorf("detached ENI %s still in the snapshot", extra.MAC)
	}
}

func eni(t *testing.T, snap imds.Snapshot, mac string) imds.ENI {
	t.Helper()
	e, ok := snap.ENI(mac)
	if !ok {
		t.Fatalf("snapshot has no ENI %s", mac)
	}
	return e
}

// Transient faults cost retries, not correctness: the snapshot is complete
// and the emulator's request count matches ours.
func TestEmulatorTransientFaults(t *testing.T) {
	inst := emulator.ExampleInstance(3, 3, 2, 1, 1)
	secondary := inst.ENIs[1].MAC
	for _, tc := range []struct {
		name   string
		faults emulator.Faults
	}{
		{"500 twice on a key", emulator.Faults{Match: secondary + "/local-ipv4s", Status: 500, StatusCount: 2}},
		{"429 twice everywhere", emulator.Faults{Status: 429, StatusCount: 2}},
		{"503 on the token", emulator.Faults{Match: "api/token", Status: 503, StatusCount: 1}},
		{"dropped connections", emulator.Faults{Match: "meta-data/", DropConnections: true, DropCount: 2}},
		{"latency below the timeout", emulator.Faults{Latency: 20 * time.Millisecond}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, c := startEmulator(t, inst, imds.Options{})
			if err := srv.SetFaults(tc.faults); err != nil {
				t.Fatal(err)
			}
			snap := snapshot(t, c)
			if want := wantENIs(inst); !reflect.DeepEqual(snap.ENIs, want) {
				t.Errorf("ENIs differ from the model after faults")
			}
			if st := srv.Stats(); int64(snap.Requests) != st.Requests {
				t.Errorf("client counted %d requests, emulator served %d", snap.Requests, st.Requests)
			}
		})
	}
}

// Persistent faults make the snapshot fail with an error naming the key; it
// never yields an ENI with its addresses missing.
func TestEmulatorPersistentFaultsFail(t *testing.T) {
	inst := emulator.ExampleInstance(3, 3, 2, 1, 1)
	secondary := inst.ENIs[1].MAC
	for _, tc := range []struct {
		name        string
		faults      emulator.Faults
		key         string
		unreachable bool
	}{
		{"500 on one ENI's local-ipv4s", emulator.Faults{Match: secondary + "/local-ipv4s", Status: 500},
			"meta-data/network/interfaces/macs/" + secondary + "/local-ipv4s", false},
		{"throttled", emulator.Faults{Match: secondary + "/ipv6s", Status: 429, RetryAfter: time.Second},
			"meta-data/network/interfaces/macs/" + secondary + "/ipv6s", false},
		{"dropped connections", emulator.Faults{Match: secondary + "/ipv4-prefix", DropConnections: true},
			"meta-data/network/interfaces/macs/" + secondary + "/ipv4-prefix", false},
		{"latency beyond the timeout", emulator.Faults{Match: secondary + "/device-number", Latency: 10 * time.Second},
			"meta-data/network/interfaces/macs/" + secondary + "/device-number", true},
		{"tokens rejected", emulator.Faults{RejectTokens: true}, "meta-data/mac", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv, c := startEmulator(t, inst, imds.Options{Timeout: 300 * time.Millisecond})
			if err := srv.SetFaults(tc.faults); err != nil {
				t.Fatal(err)
			}
			snap, err := c.Snapshot(context.Background())
			if err == nil {
				t.Fatalf("Snapshot succeeded (%d ENIs) under a persistent fault", len(snap.ENIs))
			}
			var ke *imds.KeyError
			if !errors.As(err, &ke) || ke.Key != tc.key {
				t.Errorf("error %q: want a KeyError for %s", err, tc.key)
			}
			if imds.IsUnreachable(err) != tc.unreachable {
				t.Errorf("IsUnreachable(%q) = %v, want %v", err, !tc.unreachable, tc.unreachable)
			}
			// The fault cleared, the same client recovers.
			srv.ClearFaults()
			if want := wantENIs(inst); !reflect.DeepEqual(snapshot(t, c).ENIs, want) {
				t.Errorf("ENIs differ from the model after the fault cleared")
			}
		})
	}
}

func TestEmulatorTokenExpiry(t *testing.T) {
	inst := emulator.ExampleInstance(2, 2, 1, 0, 1)
	srv, c := startEmulator(t, inst, imds.Options{})
	snapshot(t, c)
	// Expired by the clock (the SDK asks for a 300 s token and refreshes it
	// early on its own clock, so jump the emulator's clock instead) ...
	if err := srv.AdvanceClock(10 * time.Minute); err != nil {
		t.Fatal(err)
	}
	snapshot(t, c)
	// ... and revoked outright.
	srv.ExpireTokens()
	snap := snapshot(t, c)
	if want := wantENIs(inst); !reflect.DeepEqual(snap.ENIs, want) {
		t.Errorf("ENIs differ from the model after token expiry")
	}
	if st := srv.Stats(); st.TokenRequests != 3 {
		t.Errorf("emulator saw %d token requests, want 3 (one per expiry)", st.TokenRequests)
	}
}
