// Package emulator is an EC2 instance metadata service (IMDSv2) that tests,
// benchmarks and the demo control: it speaks the real protocol (token PUT
// with TTL bounds, 401 for missing, bogus or expired tokens, 405 for GET on
// the token path, IMDS-formatted listings, 404 for absent keys), its instance
// can change while it runs, and it injects faults on demand.
//
// In-process use:
//
//	srv := emulator.New(emulator.ExampleInstance(3, 2, 2, 1, 1))
//	base, err := srv.Start("127.0.0.1:0") // "http://127.0.0.1:41234"
//	defer srv.Close()
//
// A *Server is also an http.Handler (httptest.NewServer(srv) works), and
// Serve takes a listener made elsewhere (inside a network namespace).
//
// At a glance: the model is an Instance of shared imds.ENI values
// (AttachENI, DetachENI, UpdateENI, SetInstance, Instance); raw keys win
// over it (SetRawKey, DeleteKey, ClearOverrides); Faults are injected with SetFaults
// (latency, statuses with Retry-After, dropped connections, rejected tokens,
// MACs listed before their keys, device-number 0 for the first reads) plus
// the one-shot ExpireTokens and AdvanceClock; Stats counts requests,
// statuses, paths and bytes. The process form is cmd/imds-emulator.
package emulator

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/dualhomed/dualhomed/imds"
)

// Protocol constants of IMDSv2.
const (
	TokenPath       = "/latest/api/token"
	TokenHeader     = "X-aws-ec2-metadata-token"
	TokenTTLHeader  = "X-aws-ec2-metadata-token-ttl-seconds"
	MinTokenTTL     = 1     // seconds
	MaxTokenTTL     = 21600 // seconds (6 hours)
	metadataVersion = "latest"
)

// Server is one emulated IMDS. All methods are safe for concurrent use.
type Server struct {
	mu         sync.Mutex
	inst       Instance
	raw        map[string]map[string]rawKey // SetRawKey's and DeleteKey's keys, by MAC
	tree       tree                         // rendered from inst and raw after every change
	faults     Faults
	tokenKey   [32]byte      // signs tokens, which are stateless like real IMDS's
	tokenEpoch uint32        // bumped by ExpireTokens: older tokens are invalid
	clockSkew  time.Duration // added to time.Now by AdvanceClock
	stats      Stats

	httpSrv *http.Server
	closed  chan struct{}
	once    sync.Once
}

// New returns a server for inst (deep-copied). An invalid instance (empty or
// duplicate MACs) panics: it is a bug in the calling test.
func New(inst Instance) *Server {
	if err := inst.Validate(); err != nil {
		panic("emulator.New: " + err.Error())
	}
	s := &Server{
		inst:   inst.Clone(),
		raw:    map[string]map[string]rawKey{},
		stats:  Stats{}.clone(),
		closed: make(chan struct{}),
	}
	rand.Read(s.tokenKey[:])
	s.rebuild()
	return s
}

// Start listens on addr ("127.0.0.1:0", "[::1]:0", "169.254.169.254:80" in a
// test namespace) and serves in the background. It returns the base URL,
// e.g. "http://127.0.0.1:41234", to use as the IMDS endpoint.
func (s *Server) Start(addr string) (baseURL string, err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", fmt.Errorf("listening for IMDS on %s: %w", addr, err)
	}
	return s.Serve(ln)
}

// Serve serves IMDS on ln in the background and returns the base URL. Use it
// with a listener made elsewhere, for example inside a network namespace
// (net.Listen from a thread in the namespace: the socket stays there while
// the server runs on any thread). Close closes ln.
func (s *Server) Serve(ln net.Listener) (baseURL string, err error) {
	s.mu.Lock()
	if s.httpSrv != nil {
		s.mu.Unlock()
		ln.Close()
		return "", errors.New("emulator already started")
	}
	s.httpSrv = &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	hs := s.httpSrv
	s.mu.Unlock()
	go hs.Serve(ln)
	return "http://" + ln.Addr().String(), nil
}

// Close stops the listener started by Start or Serve, closes its
// connections and wakes requests sleeping in a latency fault. Idempotent.
func (s *Server) Close() error {
	s.once.Do(func() { close(s.closed) })
	s.mu.Lock()
	hs := s.httpSrv
	s.mu.Unlock()
	if hs == nil {
		return nil
	}
	return hs.Close()
}

func (s *Server) now() time.Time { return time.Now().Add(s.clockSkew) }

// rebuild re-renders the tree; call with s.mu held after every model change.
func (s *Server) rebuild() { s.tree = render(s.inst, s.raw) }

// ---- model mutations -------------------------------------------------------

// Instance returns a deep copy of the current model (raw keys and faults not
// applied).
func (s *Server) Instance() Instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inst.Clone()
}

// SetInstance replaces the whole model. Raw keys stay.
func (s *Server) SetInstance(inst Instance) error {
	return s.change(func(i *Instance) error { *i = inst.Clone(); return nil })
}

// AttachENI adds an ENI, listed after the existing ones. Its MAC must be new.
func (s *Server) AttachENI(e imds.ENI) error {
	return s.change(func(inst *Instance) error {
		if inst.eniIndex(e.MAC) >= 0 {
			return fmt.Errorf("attaching ENI %s: already attached", e.MAC)
		}
		inst.ENIs = append(inst.ENIs, cloneENI(e))
		return nil
	})
}

// DetachENI removes the ENI with mac, and its raw keys, so it disappears
// from IMDS entirely.
func (s *Server) DetachENI(mac string) error {
	return s.change(func(inst *Instance) error {
		i := inst.eniIndex(mac)
		if i < 0 {
			return fmt.Errorf("detaching ENI %s: not attached", mac)
		}
		inst.ENIs = slices.Delete(inst.ENIs, i, i+1)
		delete(s.raw, mac)
		return nil
	})
}

// UpdateENI changes the ENI with mac in place through update, which gets a
// copy (add or remove IPs and prefixes, change the device number...).
func (s *Server) UpdateENI(mac string, update func(*imds.ENI)) error {
	return s.change(func(inst *Instance) error {
		i := inst.eniIndex(mac)
		if i < 0 {
			return fmt.Errorf("updating ENI %s: not attached", mac)
		}
		update(&inst.ENIs[i])
		return nil
	})
}

// change applies fn to a copy of the model, and serves the copy if it is
// valid.
func (s *Server) change(fn func(*Instance) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	next := s.inst.Clone()
	if err := fn(&next); err != nil {
		return err
	}
	if err := next.Validate(); err != nil {
		return fmt.Errorf("changing the instance: %w", err)
	}
	s.inst = next
	s.rebuild()
	return nil
}

// rawKey is a key of an ENI as SetRawKey or DeleteKey made it.
type rawKey struct {
	body   string
	absent bool
}

// SetRawKey serves raw, byte for byte, as macs/<mac>/<key> of an attached
// ENI, whatever the model says (malformed values, huge or binary bodies,
// keys the model has no field for); the key appears in the MAC's listing.
// Use "" for an empty value.
func (s *Server) SetRawKey(mac, key, raw string) error { return s.setRaw(mac, key, rawKey{body: raw}) }

// DeleteKey makes macs/<mac>/<key> of an attached ENI absent (404, not
// listed), whatever the model says.
func (s *Server) DeleteKey(mac, key string) error { return s.setRaw(mac, key, rawKey{absent: true}) }

func (s *Server) setRaw(mac, key string, k rawKey) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if key == "" || strings.Contains(key, "/") {
		return fmt.Errorf("setting raw key %q: not a key name", key)
	}
	if s.inst.eniIndex(mac) < 0 {
		return fmt.Errorf("setting raw key %s of ENI %s: not attached", key, mac)
	}
	if s.raw[mac] == nil {
		s.raw[mac] = map[string]rawKey{}
	}
	s.raw[mac][key] = k
	s.rebuild()
	return nil
}

// ClearOverrides drops every raw key, so the model alone decides again.
func (s *Server) ClearOverrides() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.raw)
	s.rebuild()
}

// ---- faults, tokens, clock, stats ------------------------------------------

// SetFaults replaces the injected faults (the zero Faults clears them).
func (s *Server) SetFaults(f Faults) error {
	if err := f.validate(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = f.clone()
	return nil
}

// ClearFaults removes every injected fault.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = Faults{}
}

// ExpireTokens expires every token issued so far: reads with them get 401
// until the client PUTs for a new token, which works.
func (s *Server) ExpireTokens() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenEpoch++
}

// AdvanceClock moves the emulator's token clock forward by d, so a test can
// expire tokens by their TTL without sleeping.
func (s *Server) AdvanceClock(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("advancing clock: negative duration %v", d)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clockSkew += d
	return nil
}

// Stats returns a copy of the counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats.clone()
}

// ResetStats zeroes the counters.
func (s *Server) ResetStats() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stats = Stats{}.clone()
}

// ---- HTTP ------------------------------------------------------------------

// ServeHTTP answers one IMDS request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	isToken := strings.TrimSuffix(path, "/") == TokenPath

	s.mu.Lock()
	s.stats.Requests++
	s.stats.ByPath[path]++
	if isToken {
		s.stats.TokenRequests++
	}
	latency, drop, status, retryAfter := s.takeFault(path)
	s.mu.Unlock()

	if latency > 0 {
		t := time.NewTimer(latency)
		select {
		case <-t.C:
		case <-r.Context().Done():
		case <-s.closed:
		}
		t.Stop()
	}
	var body string
	switch {
	case drop:
		dropConnection(w)
		return
	case status != 0:
		if retryAfter != "" {
			w.Header().Set("Retry-After", retryAfter)
		}
	case isToken:
		status, body = s.serveToken(w.Header(), r)
	case r.Method == http.MethodPut && strings.HasSuffix(strings.TrimSuffix(path, "/"), "/api/token"):
		// AWS documents 403 for a token PUT to a version-specific path
		// such as /2021-03-23/api/token: only /latest/api/token works.
		status = http.StatusForbidden
	default:
		status, body = s.serveMetadata(w.Header(), r)
	}
	h := w.Header()
	h.Set("Content-Type", "text/plain")
	if status != http.StatusOK {
		h.Set("Content-Type", "text/html")
		body = errorPage(status)
	}
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Server", "EC2ws")
	w.WriteHeader(status)
	if r.Method == http.MethodHead {
		body = ""
	}
	w.Write([]byte(body))
	s.mu.Lock()
	s.stats.ByStatus[status]++
	s.stats.BytesSent += int64(len(body))
	s.mu.Unlock()
}

// takeFault decides, with s.mu held, which faults apply to this request, and
// consumes counted ones.
func (s *Server) takeFault(path string) (latency time.Duration, drop bool, status int, retryAfter string) {
	f := &s.faults
	if !f.selects(path) {
		return 0, false, 0, ""
	}
	latency = f.Latency
	if f.DropConnections {
		if f.DropCount > 0 {
			f.DropCount--
			if f.DropCount == 0 {
				f.DropConnections = false
			}
		}
		return latency, true, 0, ""
	}
	if f.Status != 0 {
		status, retryAfter = f.Status, f.retryAfterHeader()
		if f.StatusCount > 0 {
			f.StatusCount--
			if f.StatusCount == 0 {
				f.Status = 0
			}
		}
	}
	return latency, false, status, retryAfter
}

func dropConnection(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		// Not hijackable (HTTP/2 or a test recorder): abort the handler,
		// which makes net/http drop the stream or connection.
		panic(http.ErrAbortHandler)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetLinger(0) // reset, not a graceful FIN: the client sees a broken connection
	}
	conn.Close()
}

// serveToken answers a token request: its status and, with 200, the token.
func (s *Server) serveToken(h http.Header, r *http.Request) (int, string) {
	if r.Method != http.MethodPut {
		return http.StatusMethodNotAllowed, ""
	}
	ttl, err := strconv.Atoi(strings.TrimSpace(r.Header.Get(TokenTTLHeader)))
	if err != nil || ttl < MinTokenTTL || ttl > MaxTokenTTL {
		return http.StatusBadRequest, ""
	}
	s.mu.Lock()
	token := s.issueToken(s.now().Add(time.Duration(ttl) * time.Second))
	s.mu.Unlock()
	h.Set(TokenTTLHeader, strconv.Itoa(ttl))
	return http.StatusOK, token
}

// serveMetadata answers a metadata read: its status and, with 200, the body.
func (s *Server) serveMetadata(h http.Header, r *http.Request) (int, string) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return http.StatusMethodNotAllowed, ""
	}
	token := r.Header.Get(TokenHeader)

	s.mu.Lock()
	now := s.now()
	exp, known := s.checkToken(token)
	valid := known && now.Before(exp) && !s.faults.RejectTokens // IMDSv2 only: no token is a bad one
	body, found := "", false
	if valid {
		body, found = s.lookup(r.URL.Path)
	}
	s.mu.Unlock()

	switch {
	case !valid:
		return http.StatusUnauthorized, ""
	case !found:
		return http.StatusNotFound, ""
	}
	h.Set(TokenTTLHeader, strconv.Itoa(max(int(exp.Sub(now).Seconds()), 1)))
	return http.StatusOK, body
}

// Tokens are stateless, as real IMDS's are, so memory does not grow with the
// number of tokens a benchmark asks for: 8 bytes of expiry (Unix ns), 4 of
// epoch, 18 random, and a 12-byte HMAC-SHA256 over the rest; 42 bytes make
// 56 base64 characters, the length of real tokens.
const (
	tokenBodyLen = 8 + 4 + 18
	tokenMACLen  = 12
)

func (s *Server) issueToken(expiry time.Time) string {
	var raw [tokenBodyLen + tokenMACLen]byte
	binary.BigEndian.PutUint64(raw[0:8], uint64(expiry.UnixNano()))
	binary.BigEndian.PutUint32(raw[8:12], s.tokenEpoch)
	rand.Read(raw[12:tokenBodyLen])
	copy(raw[tokenBodyLen:], s.tokenMAC(raw[:tokenBodyLen]))
	return base64.StdEncoding.EncodeToString(raw[:])
}

// checkToken returns the token's expiry, and whether it is one of ours from
// the current epoch.
func (s *Server) checkToken(token string) (time.Time, bool) {
	raw, err := base64.StdEncoding.DecodeString(token)
	if err != nil || len(raw) != tokenBodyLen+tokenMACLen ||
		!hmac.Equal(raw[tokenBodyLen:], s.tokenMAC(raw[:tokenBodyLen])) ||
		binary.BigEndian.Uint32(raw[8:12]) != s.tokenEpoch {
		return time.Time{}, false
	}
	return time.Unix(0, int64(binary.BigEndian.Uint64(raw[0:8]))), true
}

func (s *Server) tokenMAC(body []byte) []byte {
	m := hmac.New(sha256.New, s.tokenKey[:])
	m.Write(body)
	return m.Sum(nil)[:tokenMACLen]
}

// lookup resolves a URL path to the body IMDS serves, with s.mu held.
// Directories are served with or without a trailing slash.
func (s *Server) lookup(urlPath string) (string, bool) {
	if urlPath == "/" {
		return metadataVersion, true
	}
	rel, ok := strings.CutPrefix(urlPath, "/"+metadataVersion)
	if !ok || rel != "" && rel[0] != '/' {
		return "", false
	}
	rel = strings.Trim(rel, "/")
	f, n := &s.faults, s.tree[rel]
	rest, underMACs := strings.CutPrefix(rel, macsDir+"/")
	mac, key, _ := strings.Cut(rest, "/")
	switch {
	case rel == macsDir && n != nil:
		entries := slices.Clone(n.entries)
		for _, m := range f.PendingMACs {
			if !slices.Contains(entries, m+"/") {
				entries = append(entries, m+"/")
			}
		}
		return strings.Join(entries, "\n"), true
	case n == nil || underMACs && slices.Contains(f.PendingMACs, mac):
		return "", false
	case underMACs && key == "device-number" && f.DeviceNumberZeroReads[mac] > 0:
		f.DeviceNumberZeroReads[mac]--
		return "0", true
	}
	return n.body, true
}

// errorPage is the body real IMDS sends with an error status.
func errorPage(status int) string {
	title := fmt.Sprintf("%d - %s", status, http.StatusText(status))
	return `<?xml version="1.0" encoding="iso-8859-1"?>
<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"
	"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">
 <head>
  <title>` + title + `</title>
 </head>
 <body>
  <h1>` + title + `</h1>
 </body>
</html>
`
}
