package emulator_test

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/imds/emulator"
)

// client is a plain net/http IMDSv2 client for the tests: no SDK, so the
// tests see exactly what the emulator sends.
type client struct {
	t     *testing.T
	base  string
	token string
}

func start(t *testing.T, inst emulator.Instance) (*emulator.Server, *client) {
	t.Helper()
	srv := emulator.New(inst)
	base, err := srv.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	c := &client{t: t, base: base}
	c.token = c.newToken()
	return srv, c
}

func (c *client) do(method, path string, hdr map[string]string) (int, string, http.Header) {
	c.t.Helper()
	req, err := http.NewRequest(method, c.base+path, nil)
	if err != nil {
		c.t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp.StatusCode, string(body), resp.Header
}

func (c *client) newToken() string {
	c.t.Helper()
	status, body, _ := c.do(http.MethodPut, "/latest/api/token", map[string]string{emulator.TokenTTLHeader: "21600"})
	if status != http.StatusOK || body == "" {
		c.t.Fatalf("PUT token: %d %q", status, body)
	}
	return body
}

// get reads path with the client's token.
func (c *client) get(path string) (int, string) {
	c.t.Helper()
	status, body, _ := c.do(http.MethodGet, path, map[string]string{emulator.TokenHeader: c.token})
	return status, body
}

func (c *client) mustGet(path string) string {
	c.t.Helper()
	status, body := c.get(path)
	if status != http.StatusOK {
		c.t.Fatalf("GET %s: status %d, body %q", path, status, body)
	}
	return body
}

func macPath(mac, key string) string {
	return "/latest/meta-data/network/interfaces/macs/" + mac + "/" + key
}

func TestTokenTTLBounds(t *testing.T) {
	_, c := start(t, emulator.ExampleInstance(1, 1, 0, 0, 1))
	for _, tc := range []struct {
		ttl    string // "" sends no header
		status int
	}{
		{"", 400}, {"0", 400}, {"-1", 400}, {"21601", 400}, {"abc", 400}, {"1.5", 400},
		{"1", 200}, {"21600", 200}, {"300", 200},
	} {
		hdr := map[string]string{}
		if tc.ttl != "" {
			hdr[emulator.TokenTTLHeader] = tc.ttl
		}
		status, body, h := c.do(http.MethodPut, "/latest/api/token", hdr)
		if status != tc.status {
			t.Errorf("PUT token ttl %q: status %d, want %d", tc.ttl, status, tc.status)
		}
		if status == 200 {
			if len(body) < 40 || strings.ContainsAny(body, "\r\n") {
				t.Errorf("PUT token ttl %q: implausible token %q", tc.ttl, body)
			}
			if got := h.Get(emulator.TokenTTLHeader); got != tc.ttl {
				t.Errorf("PUT token ttl %q: TTL header %q", tc.ttl, got)
			}
		}
	}
}

func TestTokenRequired(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(1, 1, 0, 0, 1))
	for _, tc := range []struct {
		name  string
		token string
	}{{"missing", ""}, {"bogus", "AAAA" + c.token[4:]}} {
		hdr := map[string]string{}
		if tc.token != "" {
			hdr[emulator.TokenHeader] = tc.token
		}
		if status, _, _ := c.do(http.MethodGet, "/latest/meta-data/mac", hdr); status != 401 {
			t.Errorf("%s token: status %d, want 401", tc.name, status)
		}
		// Absent keys also answer 401 first: auth comes before lookup.
		if status, _, _ := c.do(http.MethodGet, "/latest/meta-data/nope", hdr); status != 401 {
			t.Errorf("%s token, absent key: status %d, want 401", tc.name, status)
		}
	}
	if status, _ := c.get("/latest/meta-data/mac"); status != 200 {
		t.Fatalf("valid token: status %d", status)
	}

	// Expiry by TTL, without sleeping.
	_, short, _ := c.do(http.MethodPut, "/latest/api/token", map[string]string{emulator.TokenTTLHeader: "5"})
	hdr := map[string]string{emulator.TokenHeader: short}
	if status, _, _ := c.do(http.MethodGet, "/latest/meta-data/mac", hdr); status != 200 {
		t.Fatalf("fresh 5s token: status %d", status)
	}
	srv.AdvanceClock(6 * 1e9)
	if status, _, _ := c.do(http.MethodGet, "/latest/meta-data/mac", hdr); status != 401 {
		t.Errorf("expired token: status %d, want 401", status)
	}
	if status, _ := c.get("/latest/meta-data/mac"); status != 200 {
		t.Errorf("6h token after 6s: status %d, want 200", status)
	}
}

func TestTokenPathMethods(t *testing.T) {
	_, c := start(t, emulator.ExampleInstance(1, 1, 0, 0, 1))
	if status, _, _ := c.do(http.MethodPut, "/2021-03-23/api/token", map[string]string{emulator.TokenTTLHeader: "60"}); status != 403 {
		t.Errorf("PUT to a version-specific token path: %d, want 403", status)
	}
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodDelete} {
		status, _, _ := c.do(m, "/latest/api/token", map[string]string{emulator.TokenTTLHeader: "60", emulator.TokenHeader: c.token})
		if status != http.StatusMethodNotAllowed {
			t.Errorf("%s token path: status %d, want 405", m, status)
		}
	}
}

func TestListingsByteExact(t *testing.T) {
	_, c := start(t, emulator.ExampleInstance(2, 2, 1, 1, 1))
	mac1 := emulator.ExampleMAC(0, 1)
	for path, want := range map[string]string{
		"/latest/meta-data/network/interfaces/macs/": "02:00:00:00:00:00/\n02:00:00:00:00:01/",
		"/latest/meta-data/network/interfaces/macs":  "02:00:00:00:00:00/\n02:00:00:00:00:01/",
		"/latest/meta-data/network/interfaces/":      "macs/",
		"/latest/meta-data/mac":                      "02:00:00:00:00:00",
		"/latest/meta-data/instance-id":              "i-0123456789abcdef0",
		macPath(mac1, "local-ipv4s"):                 "10.1.0.10\n10.1.0.11",
		macPath(mac1, "ipv6s"):                       "2001:db8:0:100::1000",
		macPath(mac1, "ipv4-prefix"):                 "10.1.8.0/28",
		macPath(mac1, "ipv6-prefix"):                 "2001:db8:0:100:100::/80",
		macPath(mac1, "device-number"):               "1",
		macPath(mac1, "vpc-ipv4-cidr-block"):         "10.1.0.0/16",
		macPath(mac1, "vpc-ipv4-cidr-blocks"):        "10.1.0.0/16",
		macPath(mac1, "subnet-ipv4-cidr-block"):      "10.1.0.0/20",
		macPath(mac1, "subnet-ipv6-cidr-blocks"):     "2001:db8:0:100::/64",
		macPath(mac1, "vpc-ipv6-cidr-blocks"):        "2001:db8:0:100::/56",
		macPath(mac1, "mac"):                         mac1,
		macPath(mac1, "local-hostname"):              "ip-10-1-0-10.ec2.internal",
		macPath(mac1, ""):                            "device-number\ninterface-id\nipv4-prefix\nipv6-prefix\nipv6s\nlocal-hostname\nlocal-ipv4s\nmac\nowner-id\nsecurity-group-ids\nsubnet-id\nsubnet-ipv4-cidr-block\nsubnet-ipv6-cidr-blocks\nvpc-id\nvpc-ipv4-cidr-block\nvpc-ipv4-cidr-blocks\nvpc-ipv6-cidr-blocks",
	} {
		if got := c.mustGet(path); got != want {
			t.Errorf("GET %s = %q, want %q", path, got, want)
		}
	}
	md := c.mustGet("/latest/meta-data/")
	for _, entry := range []string{"mac", "instance-id", "network/", "local-ipv4"} {
		if !strings.Contains("\n"+md+"\n", "\n"+entry+"\n") {
			t.Errorf("meta-data/ listing %q lacks %q", md, entry)
		}
	}
	if strings.HasSuffix(md, "\n") {
		t.Errorf("meta-data/ listing ends with a newline: %q", md)
	}
}

func TestAbsentKeys404(t *testing.T) {
	// One card: no network-card key. No IPv6, no prefixes.
	_, c := start(t, emulator.ExampleInstance(2, 1, 0, 0, 1))
	mac := emulator.ExampleMAC(0, 1)
	listing := c.mustGet(macPath(mac, ""))
	for _, key := range []string{"network-card", "ipv6s", "ipv4-prefix", "ipv6-prefix", "subnet-ipv6-cidr-blocks", "vpc-ipv6-cidr-blocks", "public-ipv4s"} {
		if status, body := c.get(macPath(mac, key)); status != 404 || !strings.Contains(body, "404 - Not Found") {
			t.Errorf("GET %s: %d %q, want IMDS's 404 page", key, status, body)
		}
		if strings.Contains("\n"+listing+"\n", "\n"+key+"\n") {
			t.Errorf("absent key %s is listed: %q", key, listing)
		}
	}
	for _, path := range []string{"/latest/meta-data/nope", "/latest/meta-data/network/interfaces/macs/02:00:00:00:99:99/", "/other/meta-data/", "/latest/meta-data/mac/extra"} {
		if status, _ := c.get(path); status != 404 {
			t.Errorf("GET %s: %d, want 404", path, status)
		}
	}
}

func TestNetworkCardOnlyOnMultiCard(t *testing.T) {
	_, c := start(t, emulator.ExampleInstance(4, 1, 0, 0, 2))
	macs := c.mustGet("/latest/meta-data/network/interfaces/macs/")
	want := "02:00:00:00:00:00/\n02:00:00:00:01:00/\n02:00:00:00:00:01/\n02:00:00:00:01:01/"
	if macs != want {
		t.Fatalf("macs/ = %q, want %q", macs, want)
	}
	for _, tc := range []struct{ mac, card, dev string }{
		{"02:00:00:00:00:00", "0", "0"}, {"02:00:00:00:01:00", "1", "0"}, {"02:00:00:00:01:01", "1", "1"},
	} {
		if got := c.mustGet(macPath(tc.mac, "network-card")); got != tc.card {
			t.Errorf("%s network-card = %q, want %s", tc.mac, got, tc.card)
		}
		if got := c.mustGet(macPath(tc.mac, "device-number")); got != tc.dev {
			t.Errorf("%s device-number = %q, want %s", tc.mac, got, tc.dev)
		}
	}
}

func TestHeadAndOtherMethods(t *testing.T) {
	_, c := start(t, emulator.ExampleInstance(1, 1, 0, 0, 1))
	hdr := map[string]string{emulator.TokenHeader: c.token}
	status, body, h := c.do(http.MethodHead, "/latest/meta-data/mac", hdr)
	if status != 200 || body != "" || h.Get("Content-Length") != "17" {
		t.Errorf("HEAD: %d %q Content-Length %q", status, body, h.Get("Content-Length"))
	}
	if status, _, _ := c.do(http.MethodPost, "/latest/meta-data/mac", hdr); status != 405 {
		t.Errorf("POST metadata: %d, want 405", status)
	}
	_, _, h = c.do(http.MethodGet, "/latest/meta-data/mac", hdr)
	if h.Get("Content-Type") != "text/plain" || h.Get("Server") != "EC2ws" {
		t.Errorf("headers %v", h)
	}
}

func TestIPv6Listener(t *testing.T) {
	srv := emulator.New(emulator.ExampleInstance(1, 1, 0, 0, 1))
	base, err := srv.Start("[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	}
	defer srv.Close()
	if !strings.HasPrefix(base, "http://[::1]:") {
		t.Fatalf("base URL %q", base)
	}
	c := &client{t: t, base: base}
	c.token = c.newToken()
	c.mustGet("/latest/meta-data/mac")
}
