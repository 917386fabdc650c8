package emulator_test

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/imds/emulator"
)

// BenchmarkFullWalk reads every key of every ENI the way a snapshot does
// (token, macs/ listing, each MAC's listing, each listed key) on the
// benchmark instance: 15 ENIs x 50 IPv4 x 50 IPv6 x 4 prefixes. It reports
// requests and response bytes per walk, the emulator-side cost of one poll.
func BenchmarkFullWalk(b *testing.B) {
	srv := emulator.New(emulator.ExampleInstance(15, 50, 50, 4, 1))
	base, err := srv.Start("127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	hc := &http.Client{}
	get := func(method, path string, hdr map[string]string) string {
		req, _ := http.NewRequest(method, base+path, nil)
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := hc.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("%s %s: %s", method, path, resp.Status)
		}
		return string(body)
	}
	walk := func() {
		tok := get(http.MethodPut, emulator.TokenPath, map[string]string{emulator.TokenTTLHeader: "21600"})
		h := map[string]string{emulator.TokenHeader: tok}
		const macs = "/latest/meta-data/network/interfaces/macs/"
		get(http.MethodGet, "/latest/meta-data/mac", h)
		for _, mac := range strings.Split(get(http.MethodGet, macs, h), "\n") {
			for _, key := range strings.Split(get(http.MethodGet, macs+mac, h), "\n") {
				get(http.MethodGet, macs+mac+key, h)
			}
		}
	}
	walk()
	srv.ResetStats()
	b.ResetTimer()
	for b.Loop() {
		walk()
	}
	b.StopTimer()
	st := srv.Stats()
	n := float64(b.N)
	b.ReportMetric(float64(st.Requests)/n, "requests/walk")
	b.ReportMetric(float64(st.BytesSent)/n, "bytes/walk")
}
