package emulator

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// Faults are misbehaviours injected on demand. The zero value injects none.
// Status, drop and latency faults apply to the requests selected by Match;
// the others are independent of it.
type Faults struct {
	// Match selects the requests the Latency, Status and DropConnections
	// faults apply to: those whose URL path contains Match. "" selects every
	// request, the token PUT included; "meta-data/" selects metadata reads
	// only; "api/token" only the token PUT; "02:00:00:00:00:01/local-ipv4s"
	// one key of one ENI.
	Match string

	// Latency delays each selected request before it is answered (or failed,
	// or dropped). A client that gives up earlier sees a timeout.
	Latency time.Duration

	// Status, when non-zero (e.g. 500, 503, 429), answers selected requests
	// with that status and IMDS's HTML error page instead of the real answer.
	Status int
	// StatusCount limits Status to the next N selected requests; 0 means
	// until cleared.
	StatusCount int
	// RetryAfter is sent as a Retry-After header (whole seconds, rounded up)
	// with a Status of 429 or 503. Zero sends "1" with 429 and nothing with 503.
	RetryAfter time.Duration

	// DropConnections hijacks selected requests and closes the connection
	// (with a TCP reset where possible) without writing any response. It
	// wins over Status. Beware: Go's net/http client silently retries an
	// idempotent request once when a reused keep-alive connection dies
	// before any response byte, so DropCount 1 may go unnoticed by it.
	DropConnections bool
	// DropCount limits DropConnections to the next N selected requests;
	// 0 means until cleared.
	DropCount int

	// RejectTokens answers every metadata read that carries a token with
	// 401 while set, as if every token had expired the moment it was issued. See also
	// Server.ExpireTokens for a one-shot expiry.
	RejectTokens bool

	// PendingMACs are MACs listed under network/interfaces/macs/ whose
	// directory and keys all answer 404, as IMDS does right after a hot
	// attach. A pending MAC need not be attached in the model (then it only
	// appears in the listing); if it is, its keys are hidden.
	PendingMACs []string

	// DeviceNumberZeroReads answers "0" for macs/<mac>/device-number for the
	// next N reads of that MAC's device-number (map: MAC -> N), as IMDS has
	// been seen to do for a freshly attached ENI.
	DeviceNumberZeroReads map[string]int
}

func (f Faults) validate() error {
	switch {
	case f.Latency < 0:
		return fmt.Errorf("faults: negative latency %v", f.Latency)
	case f.Status != 0 && (f.Status < 100 || f.Status > 599):
		return fmt.Errorf("faults: status %d is not an HTTP status", f.Status)
	case f.StatusCount < 0 || f.DropCount < 0:
		return fmt.Errorf("faults: negative count")
	case f.RetryAfter < 0:
		return fmt.Errorf("faults: negative Retry-After %v", f.RetryAfter)
	}
	for mac, n := range f.DeviceNumberZeroReads {
		if n < 0 {
			return fmt.Errorf("faults: negative device-number zero reads %d for %s", n, mac)
		}
	}
	return nil
}

func (f Faults) clone() Faults {
	f.PendingMACs = slices.Clone(f.PendingMACs)
	f.DeviceNumberZeroReads = maps.Clone(f.DeviceNumberZeroReads)
	return f
}

func (f Faults) selects(path string) bool { return strings.Contains(path, f.Match) }

// retryAfterHeader returns the Retry-After value to send with status, or "".
func (f Faults) retryAfterHeader() string {
	if f.RetryAfter > 0 {
		return fmt.Sprint(int64((f.RetryAfter + time.Second - 1) / time.Second))
	}
	if f.Status == 429 {
		return "1"
	}
	return ""
}

// Stats counts what the emulator served since start or the last ResetStats.
type Stats struct {
	Requests      int64 // every HTTP request, token PUTs and dropped ones included
	TokenRequests int64 // PUT /latest/api/token (whatever the outcome)
	// ByStatus counts answered requests by HTTP status.
	ByStatus map[int]int64
	// ByPath counts requests by URL path (as sent, e.g. "/latest/meta-data/mac").
	ByPath map[string]int64
	// BytesSent is the total of response bodies (headers not included).
	BytesSent int64
}

func (s Stats) clone() Stats {
	s.ByStatus = maps.Clone(s.ByStatus)
	s.ByPath = maps.Clone(s.ByPath)
	if s.ByStatus == nil {
		s.ByStatus = map[int]int64{}
	}
	if s.ByPath == nil {
		s.ByPath = map[string]int64{}
	}
	return s
}
