package imds

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	mac1 = "02:00:00:00:00:01" // primary
	mac2 = "02:00:00:00:00:02"
	mac3 = "02:00:00:00:00:03"
)

func keyPath(mac, key string) string { return "meta-data/" + macsPath + mac + "/" + key }

func twoENIs() *fakeIMDS {
	f := newFakeIMDS()
	f.addENI(mac1, 0)
	f.addENI(mac2, 1)
	return f
}

func mustSnapshot(t *testing.T, c *Client) Snapshot {
	t.Helper()
	snap, err := c.Snapshot(context.Background())
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	return snap
}

func TestSnapshotParsesEveryKey(t *testing.T) {
	f := twoENIs()
	f.set(mac2, "ipv4-prefix", "10.2.1.32/28\n10.2.1.48/28")
	f.set(mac2, "ipv6-prefix", "2001:db8:2:1:a::/80")
	f.set(mac2, "network-card", "1")
	c := f.start(t, Options{})
	snap := mustSnapshot(t, c)

	want := ENI{
		MAC: mac2, Ready: true, DeviceNumber: 1, NetworkCard: 1,
		InterfaceID: "eni-00000000000000002", SubnetID: "subnet-00000000000000002",
		VPCID: "vpc-00000000000000002", OwnerID: "123456789012",
		SubnetIPv4CIDR:  netip.MustParsePrefix("10.2.1.0/24"),
		SubnetIPv6CIDRs: []netip.Prefix{netip.MustParsePrefix("2001:db8:2:1::/64")},
		VPCIPv4CIDRs:    []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16"), netip.MustParsePrefix("100.64.2.0/24")},
		VPCIPv6CIDRs:    []netip.Prefix{netip.MustParsePrefix("2001:db8:2::/56")},
		LocalIPv4s:      []netip.Addr{netip.MustParseAddr("10.2.1.10"), netip.MustParseAddr("10.2.1.11")},
		IPv6s:           []netip.Addr{netip.MustParseAddr("2001:db8:2:1::10")},
		IPv4Prefixes:    []netip.Prefix{netip.MustParsePrefix("10.2.1.32/28"), netip.MustParsePrefix("10.2.1.48/28")},
		IPv6Prefixes:    []netip.Prefix{netip.MustParsePrefix("2001:db8:2:1:a::/80")},
	}
	if snap.PrimaryMAC != mac1 || len(snap.ENIs) != 2 {
		t.Fatalf("got primary %q and %d ENIs, want %q and 2", snap.PrimaryMAC, len(snap.ENIs), mac1)
	}
	if got, _ := snap.ENI(mac2); !reflect.DeepEqual(got, want) {
		t.Errorf("ENI %s:\n got %+v\nwant %+v", mac2, got, want)
	}
	if p, ok := snap.ENI(snap.PrimaryMAC); !ok || !p.Ready || p.DeviceNumber != 0 || p.IPv4Prefixes != nil {
		t.Errorf("primary ENI = %+v, want ready device 0 without prefixes", p)
	}
}

// Only listed keys are read: absent optional keys cost no 404, keys we do
// not use cost nothing, and vpc-ipv4-cidr-block is skipped when the plural
// key is there. The count includes the token and is exact.
func TestSnapshotFetchesOnlyListedKeysAndCountsRequests(t *testing.T) {
	f := twoENIs()
	c := f.start(t, Options{})
	snap := mustSnapshot(t, c)

	for _, r := range f.log() {
		for _, never := range []string{"ipv4-prefix", "ipv6-prefix", "network-card", "local-hostname", "security-group-ids", "vpc-ipv4-cidr-block", "/mac"} {
			if strings.HasSuffix(r, never) && !strings.HasSuffix(r, "meta-data/mac") {
				t.Errorf("requested %s; it is absent or unused", r)
			}
		}
	}
	// token + mac + macs/ + 2 listings + 2 x 11 keys
	const want = 1 + 1 + 1 + 2 + 2*11
	if snap.Requests != want || len(f.log()) != want || c.Requests() != want {
		t.Errorf("Snapshot.Requests = %d, server saw %d, Client.Requests = %d; want %d", snap.Requests, len(f.log()), c.Requests(), want)
	}
	// The token is cached: the second snapshot costs one request less, and
	// the cumulative counter keeps adding.
	snap2 := mustSnapshot(t, c)
	if snap2.Requests != want-1 || c.Requests() != 2*want-1 {
		t.Errorf("second snapshot: Requests = %d (want %d), cumulative %d (want %d)", snap2.Requests, want-1, c.Requests(), 2*want-1)
	}
	if !reflect.DeepEqual(snap.ENIs, snap2.ENIs) {
		t.Errorf("two snapshots of the same instance differ")
	}
}

func TestSnapshotFallsBackToSingleVPCCIDR(t *testing.T) {
	f := twoENIs()
	f.del(mac2, "vpc-ipv4-cidr-blocks")
	snap := mustSnapshot(t, f.start(t, Options{}))
	e, _ := snap.ENI(mac2)
	if want := []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")}; !reflect.DeepEqual(e.VPCIPv4CIDRs, want) {
		t.Errorf("VPCIPv4CIDRs = %v, want %v", e.VPCIPv4CIDRs, want)
	}
}

func TestSnapshotSortsENIsByMAC(t *testing.T) {
	f := newFakeIMDS()
	f.addENI("02:00:00:00:00:0f", 2)
	f.addENI(mac3, 0)
	f.addENI("02:00:00:00:00:0a", 1)
	f.hook = func(w http.ResponseWriter, r *http.Request, path string, _ int) bool {
		if path == "meta-data/"+macsPath { // listed out of order, upper case
			w.Write([]byte("02:00:00:00:00:0F/\n02:00:00:00:00:03/\n02:00:00:00:00:0A/"))
			return true
		}
		return false
	}
	snap := mustSnapshot(t, f.start(t, Options{}))
	var got []string
	for _, e := range snap.ENIs {
		got = append(got, e.MAC)
	}
	if want := []string{mac3, "02:00:00:00:00:0a", "02:00:00:00:00:0f"}; !slices.Equal(got, want) {
		t.Errorf("ENI order = %v, want %v", got, want)
	}
}

func TestSnapshotReadiness(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mac    string // the ENI to change and check
		change func(f *fakeIMDS)
		ready  bool
		device int
		reason string
	}{
		{"secondary ready", mac2, func(*fakeIMDS) {}, true, 1, ""},
		{"device-number 0 on the primary is fine", mac1, func(*fakeIMDS) {}, true, 0, ""},
		{"device-number 0 on a secondary", mac2, func(f *fakeIMDS) { f.set(mac2, "device-number", "0") }, false, DeviceNumberUnknown, "device-number 0"},
		// Multi-card instances: EC2 lists network-card for every ENI, the primary included.
		{"device 0 on card 1 is valid", mac2, multiCard("1", "0"), true, 0, ""},
		{"device 0 on card 0 of a multi-card secondary", mac2, multiCard("0", "0"), false, DeviceNumberUnknown, "device-number 0 on card 0"},
		{"highest device on card 31", mac2, multiCard("31", "99"), true, 99, ""},
		{"network-card not listed yet on a multi-card instance", mac2, func(f *fakeIMDS) {
			multiCard("1", "1")(f)
			f.del(mac2, "network-card")
		}, false, DeviceNumberUnknown, "network-card not listed yet"},
		{"device-number not listed", mac2, func(f *fakeIMDS) { f.del(mac2, "device-number") }, false, DeviceNumberUnknown, "device-number not listed"},
		{"no keys listed yet", mac2, func(f *fakeIMDS) { f.macs[mac2] = map[string]string{} }, false, DeviceNumberUnknown, "none of its keys"},
		{"listing 404", mac2, func(f *fakeIMDS) {
			f.hook = func(w http.ResponseWriter, r *http.Request, path string, _ int) bool {
				if path == keyPath(mac2, "") {
					http.NotFound(w, r)
					return true
				}
				return false
			}
		}, false, DeviceNumberUnknown, "none of its keys"},
		{"no addresses yet", mac2, func(f *fakeIMDS) { f.del(mac2, "local-ipv4s"); f.del(mac2, "ipv6s") }, false, 1, "neither local-ipv4s nor ipv6s"},
		{"no interface-id yet", mac2, func(f *fakeIMDS) { f.del(mac2, "interface-id") }, false, 1, "interface-id"},
		{"IPv4 without subnet", mac2, func(f *fakeIMDS) { f.del(mac2, "subnet-ipv4-cidr-block") }, false, 1, "subnet-ipv4-cidr-block"},
		{"IPv6-only ENI is ready", mac2, func(f *fakeIMDS) { f.del(mac2, "local-ipv4s"); f.del(mac2, "subnet-ipv4-cidr-block") }, true, 1, ""},
		{"IPv6 without subnet", mac2, func(f *fakeIMDS) { f.del(mac2, "subnet-ipv6-cidr-blocks") }, false, 1, "subnet-ipv6-cidr-blocks"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := twoENIs()
			tc.change(f)
			snap := mustSnapshot(t, f.start(t, Options{}))
			if len(snap.ENIs) != 2 {
				t.Fatalf("got %d ENIs, want 2 (a not-ready ENI is kept)", len(snap.ENIs))
			}
			e, _ := snap.ENI(tc.mac)
			if e.Ready != tc.ready || e.DeviceNumber != tc.device || !strings.Contains(e.NotReadyReason, tc.reason) || (tc.ready && e.NotReadyReason != "") {
				t.Errorf("got Ready=%v DeviceNumber=%d reason %q; want Ready=%v DeviceNumber=%d reason containing %q",
					e.Ready, e.DeviceNumber, e.NotReadyReason, tc.ready, tc.device, tc.reason)
			}
			if other, _ := snap.ENI(mac1); tc.mac != mac1 && !other.Ready {
				t.Errorf("primary ENI not ready: %s", other.NotReadyReason)
			}
		})
	}
}

// multiCard makes twoENIs a multi-card instance with mac2 at card, device.
func multiCard(card, device string) func(f *fakeIMDS) {
	return func(f *fakeIMDS) {
		f.set(mac1, "network-card", "0")
		f.set(mac2, "network-card", card)
		f.set(mac2, "device-number", device)
	}
}

// Every bad answer for a key makes the whole snapshot fail with an error
// that names the key (and the value when IMDS answered).
func TestSnapshotFailsOnBadRequiredRead(t *testing.T) {
	status := func(path string, code int) func(f *fakeIMDS) {
		return func(f *fakeIMDS) {
			f.hook = func(w http.ResponseWriter, r *http.Request, p string, _ int) bool {
				if p == path {
					w.WriteHeader(code)
					return true
				}
				return false
			}
		}
	}
	for _, tc := range []struct {
		name    string
		change  func(f *fakeIMDS)
		wantKey string
		wantMsg string
		status  int
	}{
		{"bad IPv4", func(f *fakeIMDS) { f.set(mac2, "local-ipv4s", "10.2.1.10\n10.0.0.300") },
			keyPath(mac2, "local-ipv4s"), `macs/02:00:00:00:00:02/local-ipv4s: "10.0.0.300" is not an IPv4 address`, 0},
		{"500 on local-ipv4s", status(keyPath(mac2, "local-ipv4s"), 500),
			keyPath(mac2, "local-ipv4s"), "HTTP 500", 500},
		{"404 on a listed key", status(keyPath(mac2, "ipv6s"), 404),
			keyPath(mac2, "ipv6s"), "HTTP 404", 404},
		{"404 on mac", status("meta-data/mac", 404), "meta-data/mac", "HTTP 404", 404},
		{"404 on macs", status("meta-data/"+macsPath, 404), "meta-data/" + macsPath, "HTTP 404", 404},
		{"403 IMDS disabled", status("api/token", 403), "api/token", "HTTP 403", 403},
		{"empty MAC list", func(f *fakeIMDS) { f.macs = map[string]map[string]string{} },
			"meta-data/" + macsPath, `"" is empty`, 0},
		{"primary not listed", func(f *fakeIMDS) { f.primary = mac3 },
			"meta-data/" + macsPath, "is not listed", 0},
		{"binary junk", func(f *fakeIMDS) { f.set(mac2, "device-number", "\x00\xff\x1b[2J") },
			keyPath(mac2, "device-number"), "device-number: ", 0},
		{"bad prefix", func(f *fakeIMDS) { f.set(mac2, "ipv6-prefix", "2001:db8::1/80") },
			keyPath(mac2, "ipv6-prefix"), "host bits set", 0},
		{"huge body", func(f *fakeIMDS) { f.set(mac2, "ipv6s", strings.Repeat("2001:db8::1\n", 10000)) },
			keyPath(mac2, "ipv6s"), "exceeds", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := twoENIs()
			tc.change(f)
			c := f.start(t, Options{})
			snap, err := c.Snapshot(context.Background())
			if err == nil {
				t.Fatalf("Snapshot succeeded with %d ENIs, want an error", len(snap.ENIs))
			}
			if snap.ENIs != nil || snap.PrimaryMAC != "" {
				t.Errorf("failed Snapshot returned data: %+v", snap)
			}
			var ke *KeyError
			if !errors.As(err, &ke) || ke.Key != tc.wantKey {
				t.Fatalf("error %q is not a KeyError for %s", err, tc.wantKey)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("error %q does not contain %q", err, tc.wantMsg)
			}
			var se *StatusError
			if tc.status != 0 && (!errors.As(err, &se) || se.StatusCode != tc.status) {
				t.Errorf("error %q: want a StatusError %d", err, tc.status)
			}
			if IsUnreachable(err) {
				t.Errorf("IsUnreachable(%q) = true; IMDS answered", err)
			}
		})
	}
}

func TestSnapshotRetriesTransientFailures(t *testing.T) {
	target := keyPath(mac2, "local-ipv4s")
	for _, tc := range []struct {
		name  string
		fault func(w http.ResponseWriter)
		extra int // requests the faults cost
	}{
		{"500 twice", func(w http.ResponseWriter) { w.WriteHeader(500) }, 2},
		{"503 twice", func(w http.ResponseWriter) { w.WriteHeader(503) }, 2},
		{"429 twice", func(w http.ResponseWriter) { w.WriteHeader(429) }, 2},
		{"dropped connection twice", func(w http.ResponseWriter) {
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				conn.Close()
			}
		}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := twoENIs()
			f.hook = func(w http.ResponseWriter, r *http.Request, path string, hit int) bool {
				if path == target && hit <= 2 {
					tc.fault(w)
					return true
				}
				return false
			}
			c := f.start(t, Options{})
			snap := mustSnapshot(t, c)
			if e, _ := snap.ENI(mac2); len(e.LocalIPv4s) != 2 {
				t.Errorf("LocalIPv4s = %v after retries", e.LocalIPv4s)
			}
			if got, want := f.hitCount(target), 3; got != want {
				t.Errorf("%s requested %d times, want %d", target, got, want)
			}
			if want := 1 + 1 + 1 + 2 + 2*11 + tc.extra; snap.Requests != want {
				t.Errorf("Requests = %d, want %d", snap.Requests, want)
			}
		})
	}
}

func TestSnapshotRetriesTimeout(t *testing.T) {
	f := twoENIs()
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	f.hook = func(w http.ResponseWriter, r *http.Request, path string, hit int) bool {
		if path == "meta-data/mac" && hit == 1 {
			select { // answer too late
			case <-release:
			case <-r.Context().Done():
			}
			return true
		}
		return false
	}
	c := f.start(t, Options{Timeout: 300 * time.Millisecond})
	snap := mustSnapshot(t, c)
	if snap.PrimaryMAC != mac1 || f.hitCount("meta-data/mac") != 2 {
		t.Errorf("primary %q after %d reads of mac; want %s after 2", snap.PrimaryMAC, f.hitCount("meta-data/mac"), mac1)
	}
}

func TestSnapshotHonoursRetryAfter(t *testing.T) {
	t.Parallel()
	f := twoENIs()
	var first, second time.Time
	f.hook = func(w http.ResponseWriter, r *http.Request, path string, hit int) bool {
		if path == "meta-data/mac" {
			if hit == 1 {
				first = time.Now()
				w.Header().Set("Retry-After", "1")
				w.WriteHeader(http.StatusTooManyRequests)
				return true
			}
			second = time.Now()
		}
		return false
	}
	mustSnapshot(t, f.start(t, Options{}))
	// Not a timing assertion on our speed: a lower bound the client must
	// respect (it may not retry before the server allows it).
	if d := second.Sub(first); d < time.Second {
		t.Errorf("retried after %v, before Retry-After: 1", d)
	}
}

// A persistently failing key costs MaxAttempts requests, not more, and the
// error says how many attempts were made.
func TestSnapshotGivesUpAfterMaxAttempts(t *testing.T) {
	f := twoENIs()
	target := keyPath(mac2, "ipv6s")
	f.hook = func(w http.ResponseWriter, r *http.Request, path string, _ int) bool {
		if path == target {
			w.WriteHeader(500)
			return true
		}
		return false
	}
	c := f.start(t, Options{MaxAttempts: 4})
	_, err := c.Snapshot(context.Background())
	var se *StatusError
	if !errors.As(err, &se) || se.Attempts != 4 {
		t.Fatalf("error %v: want StatusError after 4 attempts", err)
	}
	if got := f.hitCount(target); got != 4 {
		t.Errorf("%s requested %d times, want 4", target, got)
	}
}

// A broken IMDS (every request 500) costs a bounded number of requests per
// snapshot, however many ENIs and workers: the first key to give up cancels
// the others, and retries share a small budget.
func TestBrokenIMDSCostsFewRequests(t *testing.T) {
	f := newFakeIMDS()
	for i := range 15 {
		f.addENI(netMAC(i), i)
	}
	f.hook = func(w http.ResponseWriter, r *http.Request, path string, _ int) bool {
		if strings.Count(path, "/") > 4 { // every key under macs/<mac>/
			w.WriteHeader(500)
			return true
		}
		return false
	}
	c := f.start(t, Options{})
	before := c.Requests()
	if _, err := c.Snapshot(context.Background()); err == nil {
		t.Fatal("Snapshot succeeded against a broken IMDS")
	}
	failing := int(c.Requests()-before) - (1 + 1 + 1 + 15) // token, mac, macs, listings
	if max := DefaultConcurrency * DefaultMaxAttempts; failing > max {
		t.Errorf("failing keys cost %d requests, want at most %d", failing, max)
	}
}

func netMAC(i int) string {
	return net.HardwareAddr{0x02, 0, 0, 0, 1, byte(i)}.String()
}

func TestSnapshotRefreshesExpiredTokenOnce(t *testing.T) {
	f := twoENIs()
	c := f.start(t, Options{})
	mustSnapshot(t, c)
	f.expireTokens()
	snap := mustSnapshot(t, c)
	if got := f.hitCount("api/token"); got != 2 {
		t.Errorf("token requested %d times, want 2 (one refresh after 401)", got)
	}
	if len(snap.ENIs) != 2 {
		t.Errorf("got %d ENIs after token refresh", len(snap.ENIs))
	}

	// IMDS that rejects every token: one refresh, then an error.
	f.hook = func(w http.ResponseWriter, r *http.Request, path string, _ int) bool {
		if path != "api/token" {
			w.WriteHeader(http.StatusUnauthorized)
			return true
		}
		return false
	}
	before := c.Requests()
	_, err := c.Snapshot(context.Background())
	var se *StatusError
	if !errors.As(err, &se) || se.StatusCode != 401 {
		t.Fatalf("error %v, want StatusError 401", err)
	}
	// GET (401), PUT token, GET (401).
	if got := c.Requests() - before; got != 3 {
		t.Errorf("rejected tokens cost %d requests, want 3", got)
	}
}

func TestSnapshotUnreachable(t *testing.T) {
	// A port that nothing listens on: connection refused.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	c, err := New(Options{Endpoint: "http://" + addr, MaxRequestsPerSecond: -1})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Snapshot(context.Background())
	if !IsUnreachable(err) {
		t.Errorf("IsUnreachable(%v) = false for connection refused", err)
	}
	if !strings.Contains(err.Error(), "unreachable") || !strings.Contains(err.Error(), addr) {
		t.Errorf("error %q should say unreachable and name %s", err, addr)
	}
	if got := c.Requests(); got != DefaultMaxAttempts {
		t.Errorf("unreachable IMDS cost %d requests, want %d", got, DefaultMaxAttempts)
	}
}

func TestSnapshotCanceled(t *testing.T) {
	f := twoENIs()
	c := f.start(t, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.Snapshot(ctx)
	if !errors.Is(err, context.Canceled) || IsUnreachable(err) {
		t.Errorf("Snapshot(canceled) = %v, want context.Canceled and not unreachable", err)
	}
}

func TestConcurrentSnapshots(t *testing.T) {
	f := twoENIs()
	c := f.start(t, Options{})
	want := mustSnapshot(t, c)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			got, err := c.Snapshot(context.Background())
			if err != nil || !reflect.DeepEqual(got.ENIs, want.ENIs) || got.Requests != want.Requests-1 {
				t.Errorf("concurrent Snapshot = %d ENIs, %d requests, %v", len(got.ENIs), got.Requests, err)
			}
		})
	}
	wg.Wait()
}

func TestResolveEndpoint(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opts    Options
		env     map[string]string
		want    string
		wantErr string
	}{
		{"default", Options{}, nil, DefaultIPv4Endpoint, ""},
		{"IPv6 env", Options{}, map[string]string{EnvEndpointMode: "ipv6"}, DefaultIPv6Endpoint, ""},
		{"IPv4 env", Options{}, map[string]string{EnvEndpointMode: "IPv4"}, DefaultIPv4Endpoint, ""},
		{"bad mode", Options{}, map[string]string{EnvEndpointMode: "IPv5"}, "", EnvEndpointMode},
		{"env endpoint", Options{}, map[string]string{EnvEndpoint: "http://127.0.0.1:1338/", EnvEndpointMode: "IPv6"}, "http://127.0.0.1:1338", ""},
		{"option beats env", Options{Endpoint: "http://[::1]:8080"}, map[string]string{EnvEndpoint: "http://127.0.0.1:1338"}, "http://[::1]:8080", ""},
		{"bad env endpoint", Options{}, map[string]string{EnvEndpoint: "127.0.0.1:1338"}, "", EnvEndpoint},
		{"no scheme", Options{Endpoint: "127.0.0.1"}, nil, "", "want http://"},
		{"ftp", Options{Endpoint: "ftp://127.0.0.1"}, nil, "", "want http://"},
		{"path", Options{Endpoint: "http://127.0.0.1/latest"}, nil, "", "path not allowed"},
		{"query", Options{Endpoint: "http://127.0.0.1/?x=1"}, nil, "", "query"},
		{"bad port", Options{Endpoint: "http://127.0.0.1:99999"}, nil, "", "port"},
		{"no host", Options{Endpoint: "http://:80"}, nil, "", "no host"},
		{"garbage", Options{Endpoint: "http://[::1"}, nil, "", "not a URL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := resolveEndpoint(tc.opts, func(k string) string { return tc.env[k] })
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("resolveEndpoint = %q, %v; want error containing %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("resolveEndpoint = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

// New reads the environment for real; the table above covers precedence.
func TestNewUsesEnvironment(t *testing.T) {
	f := twoENIs()
	srv := f.start(t, Options{}) // only for its endpoint
	t.Setenv(EnvEndpoint, srv.Endpoint())
	c, err := New(Options{MaxRequestsPerSecond: -1})
	if err != nil {
		t.Fatal(err)
	}
	if c.Endpoint() != srv.Endpoint() {
		t.Fatalf("Endpoint() = %q, want %q from %s", c.Endpoint(), srv.Endpoint(), EnvEndpoint)
	}
	if snap := mustSnapshot(t, c); len(snap.ENIs) != 2 {
		t.Errorf("got %d ENIs", len(snap.ENIs))
	}
	t.Setenv(EnvEndpoint, "not a url")
	if _, err := New(Options{}); err == nil || !strings.Contains(err.Error(), EnvEndpoint) {
		t.Errorf("New with bad %s: %v", EnvEndpoint, err)
	}
}

// recordingTransport answers nothing and sends nothing: it records where
// the client would have sent each request. It lets the default endpoints be
// tested without a packet leaving the host.
type recordingTransport struct {
	mu   sync.Mutex
	urls []string
}

func (r *recordingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	r.mu.Lock()
	r.urls = append(r.urls, req.Method+" "+req.URL.String())
	r.mu.Unlock()
	return nil, errors.New("recordingTransport sends nothing")
}

func TestDefaultEndpointsReachTheSDK(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
		mode string
		want string
	}{
		{"IPv4 default", Options{}, "", "PUT http://169.254.169.254/latest/api/token"},
		{"IPv6 env", Options{}, "IPv6", "PUT http://[fd00:ec2::254]/latest/api/token"},
		{"explicit endpoint beats IPv6", Options{Endpoint: "http://[::1]:1"}, "IPv6", "PUT http://[::1]:1/latest/api/token"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(EnvEndpoint, "")
			t.Setenv(EnvEndpointMode, tc.mode)
			rec := &recordingTransport{}
			tc.opts.Transport, tc.opts.MaxAttempts, tc.opts.MaxRequestsPerSecond = rec, 1, -1
			c, err := New(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Snapshot(context.Background()); err == nil {
				t.Fatal("Snapshot succeeded through a transport that answers nothing")
			}
			if len(rec.urls) != 1 || rec.urls[0] != tc.want {
				t.Errorf("requests %q, want [%q]", rec.urls, tc.want)
			}
		})
	}
}

// A caller that calls Snapshot again and again against a broken IMDS is
// paced by the client's retry budget. The assertion is an upper bound that
// grows with elapsed time, so a slow machine cannot make it fail.
func TestBrokenIMDSPacesRepeatedSnapshots(t *testing.T) {
	t.Parallel()
	f := twoENIs()
	f.hook = func(w http.ResponseWriter, r *http.Request, path string, _ int) bool {
		w.WriteHeader(http.StatusInternalServerError)
		return true
	}
	c := f.start(t, Options{})
	start := time.Now()
	for time.Since(start) < time.Second {
		if _, err := c.Snapshot(context.Background()); err == nil {
			t.Fatal("Snapshot succeeded against a broken IMDS")
		}
	}
	elapsed := time.Since(start).Seconds()
	t.Logf("%d requests in %.2fs", c.Requests(), elapsed)
	// One free first request, the burst, then the refill rate.
	if max := 1 + retryBurst + int(retriesPerSecond*elapsed+1); c.Requests() > uint64(max) {
		t.Errorf("%d requests in %.1fs, want at most %d", c.Requests(), elapsed, max)
	}
}

// A 200 whose body stalls past the timeout is retried like any timeout,
// not mistaken for an answer.
func TestSnapshotRetriesStalledBody(t *testing.T) {
	f := twoENIs()
	target := keyPath(mac2, "ipv6s")
	f.hook = func(w http.ResponseWriter, r *http.Request, path string, hit int) bool {
		if path != target || hit > 1 {
			return false
		}
		w.Header().Set("Content-Length", "100")
		w.WriteHeader(http.StatusOK)
		w.Write([]byte("2001:db8:2:1::10\n"))
		w.(http.Flusher).Flush()
		<-r.Context().Done() // the rest never comes
		return true
	}
	c := f.start(t, Options{Timeout: 300 * time.Millisecond})
	snap := mustSnapshot(t, c)
	if e, _ := snap.ENI(mac2); len(e.IPv6s) != 1 || f.hitCount(target) != 2 {
		t.Errorf("IPv6s = %v after %d reads, want one address after 2 reads", e.IPv6s, f.hitCount(target))
	}
}

// ListMACs reads the MAC listing only: one request once the token is
// cached, sorted and lower case, counted like a snapshot's requests.
func TestListMACsCostsOneRequest(t *testing.T) {
	f := newFakeIMDS()
	f.addENI(mac1, 0)
	f.addENI(mac3, 2)
	f.addENI(mac2, 1)
	c := f.start(t, Options{})
	macs, n, err := c.ListMACs(context.Background())
	if err != nil {
		t.Fatalf("ListMACs: %v", err)
	}
	if want := []string{mac1, mac2, mac3}; !slices.Equal(macs, want) {
		t.Errorf("ListMACs = %v, want %v", macs, want)
	}
	if n != 2 || c.Requests() != 2 { // token + macs/
		t.Errorf("first ListMACs cost %d requests (client counted %d), want 2", n, c.Requests())
	}
	_, n, err = c.ListMACs(context.Background())
	if err != nil || n != 1 || c.Requests() != 3 {
		t.Errorf("second ListMACs: %d requests (cumulative %d), err %v; want 1 (3)", n, c.Requests(), err)
	}
	for _, r := range f.log() {
		if !strings.HasSuffix(r, "api/token") && !strings.HasSuffix(r, "meta-data/"+macsPath) {
			t.Errorf("ListMACs requested %s", r)
		}
	}
}

// A failing or unparsable listing is an error naming the key, never a
// partial list; transient failures are retried as in a snapshot.
func TestListMACsErrors(t *testing.T) {
	t.Run("retries 5xx", func(t *testing.T) {
		f := twoENIs()
		f.hook = func(w http.ResponseWriter, r *http.Request, path string, hit int) bool {
			if strings.HasSuffix(path, macsPath) && hit == 1 {
				w.WriteHeader(http.StatusServiceUnavailable)
				return true
			}
			return false
		}
		c := f.start(t, Options{})
		macs, n, err := c.ListMACs(context.Background())
		if err != nil || len(macs) != 2 || n != 3 { // token + failed GET + retried GET
			t.Errorf("ListMACs after one 503: %v, %d requests, %v; want 2 MACs, 3 requests", macs, n, err)
		}
	})
	t.Run("gives up", func(t *testing.T) {
		f := twoENIs()
		f.hook = func(w http.ResponseWriter, r *http.Request, path string, _ int) bool {
			if strings.HasSuffix(path, macsPath) {
				w.WriteHeader(http.StatusInternalServerError)
				return true
			}
			return false
		}
		c := f.start(t, Options{MaxAttempts: 2})
		macs, _, err := c.ListMACs(context.Background())
		var ke *KeyError
		if err == nil || macs != nil || !errors.As(err, &ke) || ke.Key != "meta-data/"+macsPath {
			t.Errorf("ListMACs against a broken IMDS: %v, %v; want a *KeyError naming the listing", macs, err)
		}
	})
	t.Run("bad value", func(t *testing.T) {
		f := twoENIs()
		f.hook = func(w http.ResponseWriter, r *http.Request, path string, _ int) bool {
			if strings.HasSuffix(path, macsPath) {
				_, _ = w.Write([]byte(mac1 + "/\nnot-a-mac/"))
				return true
			}
			return false
		}
		c := f.start(t, Options{})
		_, _, err := c.ListMACs(context.Background())
		var ke *KeyError
		var ve *ValueError
		if !errors.As(err, &ke) || !errors.As(err, &ve) || ve.Value == "" {
			t.Errorf("ListMACs with a bad MAC: %v; want a *KeyError naming the value", err)
		}
	})
}
