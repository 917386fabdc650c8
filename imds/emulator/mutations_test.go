package emulator_test

import (
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

func newENI(mac string, device int, ips ...string) imds.ENI {
	e := imds.ENI{
		MAC:            mac,
		DeviceNumber:   device,
		InterfaceID:    "eni-0aaaaaaaaaaaaaaaa",
		SubnetID:       "subnet-0bbbbbbbbbbbbbbbb",
		VPCID:          "vpc-0cccccccccccccccc",
		OwnerID:        "123456789012",
		SubnetIPv4CIDR: netip.MustParsePrefix("192.0.2.0/24"),
		VPCIPv4CIDRs:   []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("198.51.100.0/24")},
	}
	for _, ip := range ips {
		e.LocalIPv4s = append(e.LocalIPv4s, netip.MustParseAddr(ip))
	}
	return e
}

func TestAttachUpdateDetach(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(1, 1, 0, 0, 1))
	const mac = "02:aa:bb:cc:dd:ee"
	macs := "/latest/meta-data/network/interfaces/macs/"

	if err := srv.AttachENI(newENI(mac, 3, "192.0.2.10", "192.0.2.11")); err != nil {
		t.Fatal(err)
	}
	if got, want := c.mustGet(macs), "02:00:00:00:00:00/\n"+mac+"/"; got != want {
		t.Fatalf("after attach macs/ = %q, want %q", got, want)
	}
	if got := c.mustGet(macPath(mac, "local-ipv4s")); got != "192.0.2.10\n192.0.2.11" {
		t.Errorf("local-ipv4s = %q", got)
	}
	if got := c.mustGet(macPath(mac, "vpc-ipv4-cidr-block")); got != "192.0.2.0/24" {
		t.Errorf("vpc-ipv4-cidr-block = %q, want the first VPC CIDR", got)
	}
	if got := c.mustGet(macPath(mac, "vpc-ipv4-cidr-blocks")); got != "192.0.2.0/24\n198.51.100.0/24" {
		t.Errorf("vpc-ipv4-cidr-blocks = %q", got)
	}
	if err := srv.AttachENI(newENI(mac, 4)); err == nil {
		t.Error("attaching a MAC twice succeeded")
	}

	// Add a secondary IP and a prefix, drop the first IP.
	err := srv.UpdateENI(mac, func(e *imds.ENI) {
		e.LocalIPv4s = append(e.LocalIPv4s[1:], netip.MustParseAddr("192.0.2.12"))
		e.IPv4Prefixes = []netip.Prefix{netip.MustParsePrefix("192.0.2.64/28")}
		e.IPv6s = []netip.Addr{netip.MustParseAddr("2001:db8::5")}
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.mustGet(macPath(mac, "local-ipv4s")); got != "192.0.2.11\n192.0.2.12" {
		t.Errorf("after update local-ipv4s = %q", got)
	}
	if got := c.mustGet(macPath(mac, "ipv4-prefix")); got != "192.0.2.64/28" {
		t.Errorf("after update ipv4-prefix = %q", got)
	}
	if !strings.Contains(c.mustGet(macPath(mac, "")), "\nipv6s\n") {
		t.Error("ipv6s not listed after update")
	}
	// Removing every IPv4 makes local-ipv4s absent (as on IPv6-only ENIs).
	if err := srv.UpdateENI(mac, func(e *imds.ENI) { e.LocalIPv4s = nil }); err != nil {
		t.Fatal(err)
	}
	if status, _ := c.get(macPath(mac, "local-ipv4s")); status != 404 {
		t.Errorf("local-ipv4s without IPv4s: status %d, want 404", status)
	}
	if err := srv.UpdateENI("02:00:00:00:99:99", func(*imds.ENI) {}); err == nil {
		t.Error("updating an unknown MAC succeeded")
	}
	if err := srv.UpdateENI(mac, func(e *imds.ENI) { e.MAC = "02:00:00:00:00:00" }); err == nil {
		t.Error("renaming an ENI onto an attached MAC succeeded")
	}

	if err := srv.SetRawKey(mac, "device-number", "x"); err != nil {
		t.Fatal(err)
	}
	if err := srv.DetachENI(mac); err != nil {
		t.Fatal(err)
	}
	if got := c.mustGet(macs); got != "02:00:00:00:00:00/" {
		t.Errorf("after detach macs/ = %q (a raw override must not keep a detached MAC listed)", got)
	}
	if status, _ := c.get(macPath(mac, "device-number")); status != 404 {
		t.Errorf("detached MAC's key: status %d, want 404", status)
	}
	if err := srv.DetachENI(mac); err == nil {
		t.Error("detaching twice succeeded")
	}

	// Detaching every ENI leaves an empty, still existing macs/ directory.
	if err := srv.DetachENI("02:00:00:00:00:00"); err != nil {
		t.Fatal(err)
	}
	if status, body := c.get(macs); status != 200 || body != "" {
		t.Errorf("empty macs/: %d %q, want 200 \"\"", status, body)
	}
}

func TestPrimaryMACAndInstanceSnapshot(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(2, 1, 0, 0, 1))
	withPrimary := func(mac string) emulator.Instance {
		inst := emulator.ExampleInstance(2, 1, 0, 0, 1)
		inst.PrimaryMAC = mac
		return inst
	}
	if err := srv.SetInstance(withPrimary("02:00:00:00:00:01")); err != nil {
		t.Fatal(err)
	}
	if got := c.mustGet("/latest/meta-data/mac"); got != "02:00:00:00:00:01" {
		t.Errorf("mac = %q", got)
	}
	if got := c.mustGet("/latest/meta-data/local-ipv4"); got != "10.1.0.10" {
		t.Errorf("local-ipv4 = %q, want the new primary's first IP", got)
	}
	srv.SetInstance(withPrimary(""))
	if status, _ := c.get("/latest/meta-data/mac"); status != 404 {
		t.Errorf("no primary MAC: status %d, want 404", status)
	}

	snap := srv.Instance()
	snap.ENIs[0].LocalIPv4s[0] = netip.MustParseAddr("203.0.113.1")
	snap.ENIs = nil
	if got := srv.Instance(); len(got.ENIs) != 2 || got.ENIs[0].LocalIPv4s[0].String() != "10.0.0.10" {
		t.Errorf("Instance() aliases the server's state: %+v", got.ENIs)
	}
	if err := srv.SetInstance(emulator.ExampleInstance(3, 1, 0, 0, 1)); err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(c.mustGet("/latest/meta-data/network/interfaces/macs/"), "/"); got != 3 {
		t.Errorf("after SetInstance: %d MACs listed, want 3", got)
	}
	bad := emulator.ExampleInstance(2, 1, 0, 0, 1)
	bad.ENIs[1].MAC = bad.ENIs[0].MAC
	if err := srv.SetInstance(bad); err == nil {
		t.Error("SetInstance accepted duplicate MACs")
	}
}

func TestRawOverrides(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(2, 2, 0, 0, 1))
	mac := emulator.ExampleMAC(0, 1)

	junk := "\x00\xff\xfe binary \r\n junk \x80"
	huge := strings.Repeat("10.1.0.10\n", 200_000) // 2 MB
	for key, raw := range map[string]string{
		"local-ipv4s":   "10.0.0.300",
		"device-number": junk,
		"ipv4-prefix":   huge,
		"public-ipv4s":  "", // a key the model has no field for, with an empty value
	} {
		if err := srv.SetRawKey(mac, key, raw); err != nil {
			t.Fatal(err)
		}
		if got := c.mustGet(macPath(mac, key)); got != raw {
			t.Errorf("raw %s: got %d bytes, want %d bytes byte-exact", key, len(got), len(raw))
		}
	}
	listing := c.mustGet(macPath(mac, ""))
	if !strings.Contains(listing, "\npublic-ipv4s\n") || !strings.Contains(listing, "\nipv4-prefix\n") {
		t.Errorf("raw keys not listed: %q", listing)
	}

	if err := srv.DeleteKey(mac, "subnet-id"); err != nil {
		t.Fatal(err)
	}
	if status, _ := c.get(macPath(mac, "subnet-id")); status != 404 {
		t.Errorf("deleted key: status %d, want 404", status)
	}
	if strings.Contains(c.mustGet(macPath(mac, "")), "subnet-id\n") {
		t.Error("deleted key still listed")
	}
	// The model changing does not undo a raw key: raw wins.
	srv.UpdateENI(mac, func(e *imds.ENI) { e.SubnetID = "subnet-0new" })
	if status, _ := c.get(macPath(mac, "subnet-id")); status != 404 {
		t.Errorf("deleted key after model update: status %d, want 404", status)
	}
	srv.UpdateENI(mac, func(e *imds.ENI) { e.SubnetID = "subnet-0new" })
	if err := srv.SetRawKey(mac, "subnet-id", "subnet-0raw"); err != nil {
		t.Fatal(err)
	}
	srv.UpdateENI(mac, func(e *imds.ENI) { e.SubnetID = "subnet-0newer" })
	if got := c.mustGet(macPath(mac, "subnet-id")); got != "subnet-0raw" {
		t.Errorf("raw key after model update: %q, want subnet-0raw", got)
	}
	for _, k := range []struct{ mac, key string }{{mac, ""}, {mac, "a/b"}, {"02:00:00:00:99:99", "mac"}} {
		if err := srv.SetRawKey(k.mac, k.key, "x"); err == nil {
			t.Errorf("SetRawKey(%q, %q) accepted a key that is not an attached ENI's", k.mac, k.key)
		}
	}

	srv.ClearOverrides()
	if got := c.mustGet(macPath(mac, "subnet-id")); got != "subnet-0newer" {
		t.Errorf("after ClearOverrides subnet-id = %q", got)
	}
	if got := c.mustGet(macPath(mac, "local-ipv4s")); got != "10.1.0.10\n10.1.0.11" {
		t.Errorf("after ClearOverrides local-ipv4s = %q", got)
	}
	if status, _ := c.get(macPath(mac, "public-ipv4s")); status != 404 {
		t.Errorf("after ClearOverrides public-ipv4s: status %d, want 404", status)
	}
}

// TestConcurrentMutations runs readers against writers; -race checks the locking,
// and every answer must be one complete rendering (never a torn listing).
func TestConcurrentMutations(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(2, 1, 0, 0, 1))
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			mac := fmt.Sprintf("02:00:00:00:aa:%02x", i%50)
			srv.AttachENI(newENI(mac, 1+i%50, "192.0.2.1"))
			srv.UpdateENI(mac, func(e *imds.ENI) { e.DeviceNumber++ })
			srv.SetFaults(emulator.Faults{DeviceNumberZeroReads: map[string]int{mac: 1}})
			srv.Stats()
			srv.DetachENI(mac)
		}
	}()
	for range 200 {
		body := c.mustGet("/latest/meta-data/network/interfaces/macs/")
		if !strings.HasPrefix(body, "02:00:00:00:00:00/\n02:00:00:00:00:01/") || strings.HasSuffix(body, "\n") {
			t.Fatalf("torn listing %q", body)
		}
	}
	close(stop)
	wg.Wait()
}
