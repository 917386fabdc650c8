package imds

import (
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
)

// fakeIMDS is a minimal in-process IMDSv2 for unit tests: tokens, 401 on a
// missing or unknown token, directory listings formatted like real IMDS (one
// entry per line, no trailing newline) and 404 for absent keys. Tests inject
// faults through hook. The full-featured emulator lives in imds/emulator.
type fakeIMDS struct {
	mu       sync.Mutex
	primary  string
	macs     map[string]map[string]string // MAC -> key -> value
	tokens   map[string]bool
	nextTok  int
	hits     map[string]int // path below /latest/ -> requests
	requests []string       // "METHOD path", in arrival order
	// hook, when set, sees every request first (after hits are counted) and
	// returns true if it answered it.
	hook func(w http.ResponseWriter, r *http.Request, path string, hit int) bool
}

func newFakeIMDS() *fakeIMDS {
	return &fakeIMDS{macs: map[string]map[string]string{}, tokens: map[string]bool{}, hits: map[string]int{}}
}

// addENI adds an ENI with a typical set of keys; device 0 is the primary.
func (f *fakeIMDS) addENI(mac string, device int) map[string]string {
	n := device + 1
	keys := map[string]string{
		"device-number":           fmt.Sprint(device),
		"interface-id":            fmt.Sprintf("eni-%017x", n),
		"mac":                     mac,
		"owner-id":                "123456789012",
		"subnet-id":               fmt.Sprintf("subnet-%017x", n),
		"vpc-id":                  fmt.Sprintf("vpc-%017x", n),
		"subnet-ipv4-cidr-block":  fmt.Sprintf("10.%d.1.0/24", n),
		"vpc-ipv4-cidr-block":     fmt.Sprintf("10.%d.0.0/16", n),
		"vpc-ipv4-cidr-blocks":    fmt.Sprintf("10.%d.0.0/16\n100.64.%d.0/24", n, n),
		"local-ipv4s":             fmt.Sprintf("10.%d.1.10\n10.%d.1.11", n, n),
		"subnet-ipv6-cidr-blocks": fmt.Sprintf("2001:db8:%x:1::/64", n),
		"vpc-ipv6-cidr-blocks":    fmt.Sprintf("2001:db8:%x::/56", n),
		"ipv6s":                   fmt.Sprintf("2001:db8:%x:1::10", n),
		"local-hostname":          "ip-10-0-0-1.ec2.internal",
		"security-group-ids":      "sg-0123456789abcdef0",
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if device == 0 {
		f.primary = mac
	}
	f.macs[mac] = keys
	return keys
}

func (f *fakeIMDS) set(mac, key, value string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.macs[mac][key] = value
}

func (f *fakeIMDS) del(mac, key string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.macs[mac], key)
}

func (f *fakeIMDS) hitCount(path string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.hits[path]
}

func (f *fakeIMDS) log() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.requests)
}

func (f *fakeIMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := strings.TrimPrefix(r.URL.Path, "/latest/")
	f.mu.Lock()
	f.hits[path]++
	hit := f.hits[path]
	f.requests = append(f.requests, r.Method+" "+path)
	hook := f.hook
	f.mu.Unlock()
	if hook != nil && hook(w, r, path, hit) {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if path == "api/token" {
		if r.Method != http.MethodPut {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		ttl := r.Header.Get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds")
		f.nextTok++
		tok := fmt.Sprintf("token-%d", f.nextTok)
		f.tokens[tok] = true
		w.Header().Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", ttl)
		fmt.Fprint(w, tok)
		return
	}
	if !f.tokens[r.Header.Get("X-Aws-Ec2-Metadata-Token")] {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	body, ok := f.lookup(strings.TrimPrefix(path, "meta-data/"))
	if !ok {
		http.NotFound(w, r)
		return
	}
	fmt.Fprint(w, body)
}

// lookup answers one meta-data path; the caller holds f.mu.
func (f *fakeIMDS) lookup(p string) (string, bool) {
	if p == "mac" {
		return f.primary, f.primary != ""
	}
	if p == macsPath {
		var lines []string
		for _, mac := range slices.Sorted(maps.Keys(f.macs)) {
			lines = append(lines, mac+"/")
		}
		return strings.Join(lines, "\n"), true
	}
	rest, ok := strings.CutPrefix(p, macsPath)
	if !ok {
		return "", false
	}
	mac, key, _ := strings.Cut(rest, "/")
	keys, ok := f.macs[mac]
	if !ok {
		return "", false
	}
	if key == "" {
		return strings.Join(slices.Sorted(maps.Keys(keys)), "\n"), true
	}
	v, ok := keys[key]
	return v, ok
}

// expireTokens forgets every token, as IMDS does when a token's TTL ends.
func (f *fakeIMDS) expireTokens() {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.tokens)
}

// start serves f on 127.0.0.1 and returns a client for it with fast
// retries and no request pacing.
func (f *fakeIMDS) start(t testing.TB, opts Options) *Client {
	t.Helper()
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	opts.Endpoint = srv.URL
	if opts.MaxRequestsPerSecond == 0 {
		opts.MaxRequestsPerSecond = -1
	}
	c, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return c
}
