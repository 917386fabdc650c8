package imds_test

import (
	"context"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// staticKeys are the keys Refresh must not read again for a ready ENI
// whose link is not new: they are fixed for the life of an attachment.
var staticKeys = []string{"device-number", "network-card", "interface-id", "subnet-id", "vpc-id", "owner-id", "subnet-ipv4-cidr-block"}

func refresh(t *testing.T, c *imds.Client, prev imds.Snapshot, u imds.Update) imds.Snapshot {
	t.Helper()
	snap, err := c.Refresh(context.Background(), prev, u)
	if err != nil {
		t.Fatalf("Refresh: %v", err)
	}
	return snap
}

// sameENIs compares what two snapshots say, ignoring what they cost.
func sameENIs(t *testing.T, what string, got, want imds.Snapshot) {
	t.Helper()
	got.Requests, want.Requests = 0, 0
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s: Refresh and Snapshot disagree:\nrefresh  %+v\nsnapshot %+v", what, got, want)
	}
}

// staticReads counts the requests for static keys in the stats' paths.
func staticReads(st emulator.Stats) map[string]int64 {
	out := map[string]int64{}
	for path, n := range st.ByPath {
		for _, k := range staticKeys {
			if strings.HasSuffix(path, "/"+k) {
				out[path] += n
			}
		}
	}
	return out
}

// A poll's Refresh (dynamic keys only) must see every change that can
// happen while ENIs stay attached, and attaches and detaches through the
// listing, exactly as a full Snapshot does, without reading a static key of
// the ENIs it already knows.
func TestRefreshSeesWhatSnapshotSees(t *testing.T) {
	inst := emulator.ExampleInstance(3, 3, 2, 1, 1)
	srv, c := startEmulator(t, inst, imds.Options{})
	prev := snapshot(t, c)
	mac1, mac2 := inst.ENIs[1].MAC, inst.ENIs[2].MAC
	extra := emulator.ExampleInstance(4, 2, 1, 0, 1).ENIs[3]

	steps := []struct {
		name   string
		change func() error
	}{
		{"nothing changed", func() error { return nil }},
		{"secondary IPv4 assigned", func() error {
			return srv.UpdateENI(mac1, func(e *imds.ENI) { e.LocalIPv4s = append(e.LocalIPv4s, netip.MustParseAddr("10.1.0.99")) })
		}},
		{"every IPv6 unassigned (ipv6s no longer listed)", func() error {
			return srv.UpdateENI(mac2, func(e *imds.ENI) { e.IPv6s = nil })
		}},
		{"delegated prefixes changed", func() error {
			return srv.UpdateENI(mac1, func(e *imds.ENI) {
				e.IPv4Prefixes = append(e.IPv4Prefixes, netip.MustParsePrefix("10.1.9.0/28"))
				e.IPv6Prefixes = nil
			})
		}},
		{"VPC CIDR block associated", func() error {
			return srv.UpdateENI(mac2, func(e *imds.ENI) {
				e.VPCIPv4CIDRs = append(e.VPCIPv4CIDRs, netip.MustParsePrefix("100.64.0.0/24"))
			})
		}},
		{"subnet IPv6 CIDR associated", func() error {
			return srv.UpdateENI(mac1, func(e *imds.ENI) {
				e.SubnetIPv6CIDRs = append(e.SubnetIPv6CIDRs, netip.MustParsePrefix("2001:db8:0:1f0::/64"))
			})
		}},
		{"IPv6 CIDR blocks disassociated (keys no longer listed)", func() error {
			return srv.UpdateENI(mac2, func(e *imds.ENI) { e.SubnetIPv6CIDRs, e.VPCIPv6CIDRs = nil, nil })
		}},
		{"ENI attached", func() error { return srv.AttachENI(extra) }},
		{"ENI detached", func() error { return srv.DetachENI(mac2) }},
	}
	for _, st := range steps {
		if err := st.change(); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		srv.ResetStats()
		got := refresh(t, c, prev, imds.Update{Dynamic: true})
		stats := srv.Stats()
		for path, n := range staticReads(stats) {
			if !strings.Contains(path, extra.MAC) {
				t.Errorf("%s: Refresh read static key %s (%d times) of an ENI it knew", st.name, path, n)
			}
		}
		if int64(got.Requests) != stats.Requests {
			t.Errorf("%s: Refresh counted %d requests, the emulator saw %d", st.name, got.Requests, stats.Requests)
		}
		sameENIs(t, st.name, got, snapshot(t, c))
		prev = got
	}
}

// The contract's other side: a static key is not read again unless the
// MAC is named in Full (the daemon names the MACs whose link is new: a
// re-attached ENI may come back with another device number).
func TestRefreshReadsStaticKeysOnlyWhenAsked(t *testing.T) {
	inst := emulator.ExampleInstance(3, 2, 0, 0, 1)
	srv, c := startEmulator(t, inst, imds.Options{})
	prev := snapshot(t, c)
	mac := inst.ENIs[2].MAC
	if err := srv.UpdateENI(mac, func(e *imds.ENI) { e.DeviceNumber = 5 }); err != nil {
		t.Fatal(err)
	}
	if e := eni(t, refresh(t, c, prev, imds.Update{Dynamic: true}), mac); e.DeviceNumber != 2 {
		t.Errorf("Dynamic refresh: device %d, want the previous snapshot's 2", e.DeviceNumber)
	}
	got := refresh(t, c, prev, imds.Update{Dynamic: true, Full: []string{mac}})
	if e := eni(t, got, mac); e.DeviceNumber != 5 {
		t.Errorf("Refresh with the MAC in Full: device %d, want 5", e.DeviceNumber)
	}
	sameENIs(t, "MAC in Full", got, snapshot(t, c))
}

// A hot attach: the daemon has just read the MAC listing; Refresh reads
// only the new MAC's directory and keys and keeps the others as they were.
func TestRefreshHotAttachReadsOnlyTheNewENI(t *testing.T) {
	inst := emulator.ExampleInstance(15, 50, 50, 4, 1)
	srv, c := startEmulator(t, inst, imds.Options{})
	prev := snapshot(t, c)
	extra := emulator.ExampleInstance(16, 50, 50, 4, 1).ENIs[15]
	if err := srv.AttachENI(extra); err != nil {
		t.Fatal(err)
	}
	macs, _, err := c.ListMACs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	srv.ResetStats()
	got := refresh(t, c, prev, imds.Update{MACs: macs})
	for path := range srv.Stats().ByPath {
		if !strings.Contains(path, extra.MAC) && path != emulator.TokenPath {
			t.Errorf("hot attach read %s, which is not the new ENI's", path)
		}
	}
	sameENIs(t, "hot attach", got, snapshot(t, c))
	t.Logf("hot attach: %d requests (a snapshot: %d)", got.Requests, prev.Requests)
}

// An ENI the previous snapshot has not ready is read in full, and a MAC
// still pending stays not ready.
func TestRefreshReadsNotReadyENIsInFull(t *testing.T) {
	inst := emulator.ExampleInstance(2, 2, 1, 0, 1)
	srv, c := startEmulator(t, inst, imds.Options{})
	extra := emulator.ExampleInstance(3, 2, 1, 0, 1).ENIs[2]
	if err := srv.AttachENI(extra); err != nil {
		t.Fatal(err)
	}
	if err := srv.SetFaults(emulator.Faults{PendingMACs: []string{extra.MAC}}); err != nil {
		t.Fatal(err)
	}
	prev := snapshot(t, c)
	if e := eni(t, refresh(t, c, prev, imds.Update{}), extra.MAC); e.Ready {
		t.Errorf("pending MAC ready after Refresh")
	}
	srv.ClearFaults()
	got := refresh(t, c, prev, imds.Update{})
	if e := eni(t, got, extra.MAC); !e.Ready || e.DeviceNumber != extra.DeviceNumber {
		t.Errorf("settled MAC: Ready=%v device %d (%s), want ready device %d", e.Ready, e.DeviceNumber, e.NotReadyReason, extra.DeviceNumber)
	}
	sameENIs(t, "settled", got, snapshot(t, c))
}

// A failed read is an error naming the key, never a partial snapshot.
func TestRefreshFailsWhole(t *testing.T) {
	inst := emulator.ExampleInstance(3, 2, 1, 0, 1)
	srv, c := startEmulator(t, inst, imds.Options{MaxAttempts: 2})
	prev := snapshot(t, c)
	key := inst.ENIs[1].MAC + "/local-ipv4s"
	if err := srv.SetFaults(emulator.Faults{Match: key, Status: 500}); err != nil {
		t.Fatal(err)
	}
	snap, err := c.Refresh(context.Background(), prev, imds.Update{Dynamic: true})
	var ke *imds.KeyError
	if !errors.As(err, &ke) || !strings.Contains(ke.Key, key) {
		t.Fatalf("Refresh with %s failing: err %v, want a KeyError naming it", key, err)
	}
	if len(snap.ENIs) != 0 || snap.PrimaryMAC != "" {
		t.Errorf("failed Refresh returned a partial snapshot: %+v", snap)
	}
	srv.ClearFaults()
	if err := srv.SetRawKey(inst.ENIs[2].MAC, "ipv6s", "not-an-address"); err != nil {
		t.Fatal(err)
	}
	_, err = c.Refresh(context.Background(), prev, imds.Update{Dynamic: true})
	var ve *imds.ValueError
	if !errors.As(err, &ke) || !strings.Contains(ke.Key, inst.ENIs[2].MAC+"/ipv6s") || !errors.As(err, &ve) || ve.Value != "not-an-address" {
		t.Errorf("bad value: err %v, want a KeyError naming the key and the value", err)
	}
}

// Without a previous snapshot Refresh is a Snapshot.
func TestRefreshWithoutPreviousSnapshot(t *testing.T) {
	inst := emulator.ExampleInstance(2, 1, 1, 0, 1)
	_, c := startEmulator(t, inst, imds.Options{})
	sameENIs(t, "no previous snapshot", refresh(t, c, imds.Snapshot{}, imds.Update{Dynamic: true}), snapshot(t, c))
}

// A hot attach on a multi-card instance reads only the new MAC, yet knows
// from the previous snapshot that the instance is multi-card: while IMDS
// does not list the new ENI's network-card it is not ready (its device 1
// would otherwise land on card 0, another ENI's table).
func TestRefreshHotAttachOnMultiCardWaitsForNetworkCard(t *testing.T) {
	all := emulator.ExampleInstance(4, 1, 0, 0, 2) // cards 0 and 1, devices 0 and 1 on each
	inst := all
	inst.ENIs = all.ENIs[:3]
	srv, c := startEmulator(t, inst, imds.Options{})
	prev := snapshot(t, c)
	if !prev.MultiCard {
		t.Fatal("snapshot of a multi-card instance: MultiCard false")
	}
	extra := all.ENIs[3]
	if err := srv.AttachENI(extra); err != nil {
		t.Fatal(err)
	}
	if err := srv.DeleteKey(extra.MAC, "network-card"); err != nil {
		t.Fatal(err)
	}
	u := imds.Update{MACs: append(macsOf(prev), extra.MAC)}
	if e := eni(t, refresh(t, c, prev, u), extra.MAC); e.Ready || !strings.Contains(e.NotReadyReason, "network-card") {
		t.Errorf("network-card not listed yet: Ready=%v (%s), want not ready", e.Ready, e.NotReadyReason)
	}
	srv.ClearOverrides()
	got := refresh(t, c, prev, u)
	if e := eni(t, got, extra.MAC); !e.Ready || e.NetworkCard != 1 || e.DeviceNumber != 1 {
		t.Errorf("listed: %+v, want ready at card 1 device 1", e)
	}
	sameENIs(t, "settled", got, snapshot(t, c))
}

func macsOf(s imds.Snapshot) []string {
	var out []string
	for _, e := range s.ENIs {
		out = append(out, e.MAC)
	}
	return out
}
