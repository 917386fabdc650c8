package emulator_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/imds/emulator"
)

func TestStatusFaultOnOneKey(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(2, 2, 0, 0, 1))
	mac := emulator.ExampleMAC(0, 1)
	err := srv.SetFaults(emulator.Faults{Match: mac + "/local-ipv4s", Status: 500})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if status, body := c.get(macPath(mac, "local-ipv4s")); status != 500 || !strings.Contains(body, "500 - Internal Server Error") {
			t.Fatalf("faulted key: %d %q, want 500 with IMDS's error page", status, body)
		}
	}
	// Other keys, the other ENI's same key and the token are unaffected.
	c.mustGet(macPath(mac, "device-number"))
	c.mustGet(macPath(emulator.ExampleMAC(0, 0), "local-ipv4s"))
	c.newToken()

	srv.ClearFaults()
	if got := c.mustGet(macPath(mac, "local-ipv4s")); got != "10.1.0.10\n10.1.0.11" {
		t.Errorf("after ClearFaults: %q", got)
	}
}

func TestStatusFaultCountAndRetryAfter(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(1, 1, 0, 0, 1))
	for _, bad := range []emulator.Faults{{Status: 1000}, {Latency: -1}, {StatusCount: -1}, {DeviceNumberZeroReads: map[string]int{"m": -1}}} {
		if err := srv.SetFaults(bad); err == nil {
			t.Errorf("invalid faults %+v accepted", bad)
		}
	}
	srv.SetFaults(emulator.Faults{Match: "meta-data/", Status: 429, StatusCount: 2})
	for i := range 2 {
		status, _, h := c.do(http.MethodGet, "/latest/meta-data/mac", map[string]string{emulator.TokenHeader: c.token})
		if status != 429 || h.Get("Retry-After") != "1" {
			t.Fatalf("request %d: status %d Retry-After %q, want 429 and 1", i, status, h.Get("Retry-After"))
		}
	}
	c.mustGet("/latest/meta-data/mac") // the third succeeds, and the next
	c.mustGet("/latest/meta-data/mac")

	srv.SetFaults(emulator.Faults{Status: 503, RetryAfter: 1500 * time.Millisecond})
	status, _, h := c.do(http.MethodPut, "/latest/api/token", map[string]string{emulator.TokenTTLHeader: "60"})
	if status != 503 || h.Get("Retry-After") != "2" {
		t.Errorf("Match \"\" on the token PUT: %d Retry-After %q, want 503 and 2", status, h.Get("Retry-After"))
	}
	if err := srv.SetFaults(emulator.Faults{Status: 42}); err == nil {
		t.Error("SetFaults accepted status 42")
	}
}

func TestLatencyFault(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(1, 1, 0, 0, 1))
	srv.SetFaults(emulator.Faults{Match: "instance-id", Latency: time.Hour})
	c.mustGet("/latest/meta-data/mac") // not selected: answered at once

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/latest/meta-data/instance-id", nil)
	req.Header.Set(emulator.TokenHeader, c.token)
	_, err := http.DefaultClient.Do(req)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("GET with an hour of latency: %v, want a client timeout", err)
	}
	// Close must not wait for the hour either (t.Cleanup closes again: idempotent).
	done := make(chan struct{})
	go func() { srv.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Close hung on a request sleeping in a latency fault")
	}
}

func TestDropConnections(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(1, 1, 0, 0, 1))
	srv.SetFaults(emulator.Faults{Match: "meta-data/mac", DropConnections: true, DropCount: 2})
	// A fresh connection per request: net/http silently retries an
	// idempotent request once when a reused keep-alive connection dies.
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	for i := range 2 {
		req, _ := http.NewRequest(http.MethodGet, c.base+"/latest/meta-data/mac", nil)
		req.Header.Set(emulator.TokenHeader, c.token)
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			t.Fatalf("request %d: got %s, want a dropped connection", i, resp.Status)
		}
	}
	c.mustGet("/latest/meta-data/mac")
	st := srv.Stats()
	answered := int64(0)
	for _, n := range st.ByStatus {
		answered += n
	}
	if st.Requests-answered != 2 {
		t.Errorf("%d requests, %d answered: want 2 dropped", st.Requests, answered)
	}
}

func TestTokenFaults(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(1, 1, 0, 0, 1))
	srv.ExpireTokens()
	if status, _ := c.get("/latest/meta-data/mac"); status != 401 {
		t.Fatalf("after ExpireTokens: status %d, want 401", status)
	}
	c.token = c.newToken()
	c.mustGet("/latest/meta-data/mac") // a new token works

	srv.SetFaults(emulator.Faults{RejectTokens: true})
	if status, _ := c.get("/latest/meta-data/mac"); status != 401 {
		t.Fatalf("RejectTokens, old token: status %d, want 401", status)
	}
	c.token = c.newToken()
	if status, _ := c.get("/latest/meta-data/mac"); status != 401 {
		t.Fatalf("RejectTokens, new token: status %d, want 401", status)
	}
	srv.ClearFaults()
	c.mustGet("/latest/meta-data/mac")
}

func TestPendingMAC(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(2, 1, 0, 0, 1))
	attached, unattached := emulator.ExampleMAC(0, 1), "02:00:00:00:00:07"
	srv.SetFaults(emulator.Faults{PendingMACs: []string{attached, unattached}})

	want := "02:00:00:00:00:00/\n02:00:00:00:00:01/\n02:00:00:00:00:07/"
	if got := c.mustGet("/latest/meta-data/network/interfaces/macs/"); got != want {
		t.Fatalf("macs/ = %q, want %q", got, want)
	}
	for _, mac := range []string{attached, unattached} {
		for _, key := range []string{"", "device-number", "local-ipv4s"} {
			if status, _ := c.get(macPath(mac, key)); status != 404 {
				t.Errorf("pending %s %q: status %d, want 404", mac, key, status)
			}
		}
	}
	c.mustGet(macPath(emulator.ExampleMAC(0, 0), "device-number"))

	srv.SetFaults(emulator.Faults{})
	if got := c.mustGet(macPath(attached, "device-number")); got != "1" {
		t.Errorf("after the keys arrive: device-number %q", got)
	}
	if got := c.mustGet("/latest/meta-data/network/interfaces/macs/"); got != "02:00:00:00:00:00/\n02:00:00:00:00:01/" {
		t.Errorf("after clearing: macs/ = %q", got)
	}
}

func TestDeviceNumberZeroReads(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(3, 1, 0, 0, 1))
	mac := emulator.ExampleMAC(0, 2)
	srv.SetFaults(emulator.Faults{DeviceNumberZeroReads: map[string]int{mac: 2}})
	c.mustGet(macPath(mac, "local-ipv4s")) // other keys do not consume reads
	if got := c.mustGet(macPath(emulator.ExampleMAC(0, 1), "device-number")); got != "1" {
		t.Errorf("other MAC's device-number = %q", got)
	}
	for i, want := range []string{"0", "0", "2", "2"} {
		if got := c.mustGet(macPath(mac, "device-number")); got != want {
			t.Errorf("read %d: device-number = %q, want %s", i, got, want)
		}
	}
}

func TestStats(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(1, 2, 0, 0, 1))
	srv.ResetStats()
	var bytes int64
	tok := c.newToken()
	bytes += int64(len(tok))
	mac := c.mustGet("/latest/meta-data/mac")
	bytes += int64(len(mac))
	ips := c.mustGet(macPath(mac, "local-ipv4s"))
	bytes += int64(len(ips))
	_, body := c.get("/latest/meta-data/nope")
	bytes += int64(len(body))
	_, body, _ = c.do(http.MethodGet, "/latest/meta-data/mac", nil)
	bytes += int64(len(body))

	st := srv.Stats()
	if st.Requests != 5 || st.TokenRequests != 1 {
		t.Errorf("Requests %d TokenRequests %d, want 5 and 1", st.Requests, st.TokenRequests)
	}
	if st.ByStatus[200] != 3 || st.ByStatus[404] != 1 || st.ByStatus[401] != 1 {
		t.Errorf("ByStatus = %v", st.ByStatus)
	}
	if st.ByPath["/latest/meta-data/mac"] != 2 || st.ByPath["/latest/api/token"] != 1 {
		t.Errorf("ByPath = %v", st.ByPath)
	}
	if st.BytesSent != bytes {
		t.Errorf("BytesSent = %d, want %d", st.BytesSent, bytes)
	}
	srv.ResetStats()
	if st := srv.Stats(); st.Requests != 0 || st.BytesSent != 0 || len(st.ByStatus) != 0 || st.ByStatus == nil {
		t.Errorf("after ResetStats: %+v", st)
	}
}
