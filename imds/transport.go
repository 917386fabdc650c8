package imds

import (
	"context"
	"io"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// MaxBodySize bounds every IMDS response body. The largest body dualhomed
// reads is an address list: 50 IPv6 addresses are about 2 KiB.
const MaxBodySize = 64 << 10

// maxRetryAfter caps how long a Retry-After header can make us wait, so a
// bogus header cannot stall a snapshot.
const maxRetryAfter = 5 * time.Second

type (
	snapshotCounterKey struct{}
	attemptRecordKey   struct{}
)

// attemptRecord is what the transport saw during one attempt (one SDK
// GetMetadata call: possibly a token PUT, then the GET). The SDK wraps
// token errors in a type that hides the cause, so the retry logic decides
// from what actually went over the wire instead. It needs no lock: an
// attempt runs on one goroutine, which sends the requests through the
// transport and reads the bodies (the SDK the token's, Client.get the
// value's).
type attemptRecord struct {
	path         string // of the last request, below /latest/
	status       int    // of the last response; 0 when the last request got no response
	retryAfter   time.Duration
	transportErr error
	bodyTooLarge bool
}

// countingTransport counts every HTTP request (cumulative and per read),
// records each attempt's outcome and bounds response bodies. Every request
// comes from Client.get within Client.read, which put the attempt record and
// the read's counter in its context.
type countingTransport struct {
	next  http.RoundTripper
	total *atomic.Uint64
}

func (t *countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	perRead := ctx.Value(snapshotCounterKey{}).(*atomic.Int64)
	count := func() {
		t.total.Add(1)
		perRead.Add(1)
	}
	// One round trip is one request, even when it never reaches the wire
	// (connection refused). http.Transport silently resends an idempotent
	// request once when a reused connection turns out to be closed; count
	// such resends too, since IMDS sees them.
	count()
	var writes atomic.Int32
	req = req.WithContext(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		WroteRequest: func(httptrace.WroteRequestInfo) {
			if writes.Add(1) > 1 {
				count()
			}
		},
	}))
	rec := ctx.Value(attemptRecordKey{}).(*attemptRecord)
	rec.path = strings.TrimPrefix(req.URL.Path, "/latest/")
	rec.status, rec.retryAfter, rec.transportErr = 0, 0, nil
	resp, err := t.next.RoundTrip(req)
	if err != nil {
		rec.transportErr = err
		return nil, err
	}
	rec.status = resp.StatusCode
	rec.retryAfter = parseRetryAfter(resp.Header.Get("Retry-After"))
	resp.Body = &limitedBody{ReadCloser: resp.Body, remaining: MaxBodySize, rec: rec}
	return resp, nil
}

// parseRetryAfter understands the delta-seconds form only; IMDS sends no
// dates, and an unparsable header simply means "use our own backoff".
func parseRetryAfter(h string) time.Duration {
	secs, err := strconv.Atoi(strings.TrimSpace(h))
	if err != nil || secs <= 0 {
		return 0
	}
	return min(time.Duration(secs)*time.Second, maxRetryAfter)
}

// limitedBody fails with ErrBodyTooLarge once more than MaxBodySize bytes
// have been read, so the SDK's io.ReadAll cannot grow without bound.
type limitedBody struct {
	io.ReadCloser
	remaining int64
	rec       *attemptRecord
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if b.remaining < 0 {
		return 0, ErrBodyTooLarge
	}
	if int64(len(p)) > b.remaining+1 {
		p = p[:b.remaining+1]
	}
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		// A body cut short or too slow (http.Client.Timeout) is a transport
		// failure even though the status line said 200: retry it.
		b.rec.transportErr = err
	}
	b.remaining -= int64(n)
	if b.remaining < 0 {
		b.rec.bodyTooLarge = true
		return n, ErrBodyTooLarge
	}
	return n, err
}

// limiter is a token bucket: Client paces its requests and its retries
// with one each.
type limiter struct {
	mu     sync.Mutex
	rate   float64 // tokens per second
	burst  float64
	tokens float64
	last   time.Time
}

func newLimiter(rate float64, burst int) *limiter {
	if rate <= 0 {
		return nil // unlimited
	}
	return &limiter{rate: rate, burst: float64(burst), tokens: float64(burst), last: time.Now()}
}

// wait takes one token, sleeping until it is available or ctx is done.
func (l *limiter) wait(ctx context.Context) error {
	if l == nil {
		return ctx.Err()
	}
	l.mu.Lock()
	now := time.Now()
	l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	l.last = now
	l.tokens--
	delay := time.Duration(-l.tokens / l.rate * float64(time.Second)) // not positive while tokens remain
	l.mu.Unlock()
	return sleep(ctx, delay)
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
