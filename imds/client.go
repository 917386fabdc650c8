package imds

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	sdkimds "github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

// The environment variables that the AWS SDKs use to override the IMDS
// endpoint, and the default endpoints of the instance metadata service.
const (
	EnvEndpoint         = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
	EnvEndpointMode     = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"
	DefaultIPv4Endpoint = "http://169.254.169.254"
	DefaultIPv6Endpoint = "http://[fd00:ec2::254]"
)

// DeviceNumberUnknown is the DeviceNumber of a not-ready ENI whose device
// number IMDS has not (credibly) told yet. It is never 0: device 0 is the
// primary ENI, and mistaking a new ENI for it is a bug the incumbents had.
const DeviceNumberUnknown = -1

// Defaults for Options.
const (
	DefaultTimeout              = time.Second
	DefaultMaxAttempts          = 3
	DefaultConcurrency          = 4 // keys fetched at once
	DefaultMaxRequestsPerSecond = 100
	// DefaultRequestBurst lets one full snapshot of the largest instance (15
	// ENIs with 100 addresses and 4 prefixes each: 212 requests) go out at
	// once, so a hot attach is configured in milliseconds, while the sustained
	// rate stays at MaxRequestsPerSecond:
	// about 3 packets a request keeps a worst-case second (burst + rate) under
	// the 1024 packets/s that IMDS, DNS and NTP share per ENI.
	DefaultRequestBurst = 250
)

// Retry pacing. A snapshot retries a key at most MaxAttempts-1 times with
// jittered exponential backoff, and all retries of a client share a bucket
// of retryBurst tokens refilled at retriesPerSecond, so a broken IMDS costs
// at most a few requests per second however many keys fail at once (and
// however often callers read again: see Client.read).
const (
	backoffBase      = 100 * time.Millisecond
	backoffMax       = 2 * time.Second
	retriesPerSecond = 2
	retryBurst       = 4
)

// Options configures a Client. The zero value reads the real IMDS.
type Options struct {
	// Endpoint overrides the IMDS endpoint, e.g. "http://127.0.0.1:1338"
	// (from the --imds-endpoint flag). Precedence: Endpoint, then
	// $AWS_EC2_METADATA_SERVICE_ENDPOINT, then the default for
	// $AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE (IPv4 or IPv6).
	Endpoint string
	// Timeout bounds each HTTP request (default 1s).
	Timeout time.Duration
	// MaxAttempts bounds the attempts per key on timeouts, connection
	// errors, 5xx and 429 (default 3).
	MaxAttempts int
	// MaxRequestsPerSecond paces requests (default 100, burst
	// DefaultRequestBurst): link-local services share 1024 packets/s per ENI.
	// Negative means unlimited (tests and benchmarks against an emulator).
	MaxRequestsPerSecond float64
	// Transport replaces the HTTP transport (tests). Requests through it are
	// still counted and bounded.
	Transport http.RoundTripper
}

// Client reads Snapshots from IMDSv2. It is safe for concurrent use.
type Client struct {
	sdk         *sdkimds.Client
	endpoint    string
	timeout     time.Duration
	maxAttempts int
	requests    *limiter
	retries     *limiter
	total       atomic.Uint64
	lastFailed  atomic.Bool // the last read failed: see Client.read
}

// New validates opts and returns a Client. It sends no request.
func New(opts Options) (*Client, error) {
	endpoint, err := resolveEndpoint(opts, os.Getenv)
	if err != nil {
		return nil, err
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.MaxAttempts <= 0 {
		opts.MaxAttempts = DefaultMaxAttempts
	}
	c := &Client{
		endpoint:    endpoint,
		timeout:     opts.Timeout,
		maxAttempts: opts.MaxAttempts,
		requests:    newLimiter(cmp.Or(opts.MaxRequestsPerSecond, DefaultMaxRequestsPerSecond), DefaultRequestBurst),
		retries:     newLimiter(retriesPerSecond, retryBurst),
	}
	next := opts.Transport
	if next == nil {
		next = &http.Transport{
			Proxy:                 nil, // never send IMDS requests through a proxy
			DialContext:           (&net.Dialer{Timeout: opts.Timeout}).DialContext,
			ResponseHeaderTimeout: opts.Timeout,
			MaxIdleConnsPerHost:   DefaultConcurrency,
			IdleConnTimeout:       30 * time.Second,
		}
	}
	c.sdk = sdkimds.New(sdkimds.Options{
		HTTPClient: &http.Client{Transport: &countingTransport{next: next, total: &c.total}, Timeout: opts.Timeout},
		// Retries are ours: the SDK's standard retryer neither honours our
		// budget nor lets us count attempts per key.
		Retryer:           aws.NopRetryer{},
		EnableFallback:    aws.FalseTernary, // IMDSv2 only: never fall back to tokenless v1
		ClientEnableState: sdkimds.ClientEnabled,
		Endpoint:          endpoint, // resolved here, the endpoint mode included
	})
	return c, nil
}

// resolveEndpoint applies the precedence Options.Endpoint >
// $AWS_EC2_METADATA_SERVICE_ENDPOINT > default of the endpoint mode.
func resolveEndpoint(opts Options, getenv func(string) string) (string, error) {
	endpoint, from := opts.Endpoint, ""
	if endpoint == "" {
		endpoint, from = getenv(EnvEndpoint), EnvEndpoint+"="
	}
	if endpoint != "" {
		u, err := ValidateEndpoint(endpoint)
		if err != nil {
			return "", fmt.Errorf("invalid IMDS endpoint %s%q: %w", from, endpoint, err)
		}
		return u, nil
	}
	mode := getenv(EnvEndpointMode)
	switch {
	case strings.EqualFold(mode, "IPv6"):
		return DefaultIPv6Endpoint, nil
	case mode == "" || strings.EqualFold(mode, "IPv4"):
		return DefaultIPv4Endpoint, nil
	default:
		return "", fmt.Errorf("invalid %s=%q: want IPv4 or IPv6", EnvEndpointMode, mode)
	}
}

// ValidateEndpoint accepts http(s)://host[:port][/] and returns it without
// the trailing slash. The SDK replaces the path of the endpoint, so a path
// would be silently ignored: reject it instead.
func ValidateEndpoint(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil {
		return "", errors.New("not a URL")
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return "", errors.New("want http://host[:port]")
	case u.Host == "" || u.Hostname() == "":
		return "", errors.New("no host")
	case u.User != nil:
		return "", errors.New("user info not allowed")
	case u.Path != "" && u.Path != "/":
		return "", errors.New("path not allowed (the client adds /latest/...)")
	case u.RawQuery != "" || u.Fragment != "" || u.ForceQuery:
		return "", errors.New("query or fragment not allowed")
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return "", fmt.Errorf("bad port %q", p)
		}
	}
	return u.Scheme + "://" + u.Host, nil
}

// Endpoint returns the endpoint the client talks to.
func (c *Client) Endpoint() string { return c.endpoint }

// Requests returns the number of HTTP requests (token requests and retries
// included) the client has sent since New.
func (c *Client) Requests() uint64 { return c.total.Load() }

// get reads meta-data/<path>, retrying timeouts, connection errors, 5xx and
// 429, and refreshing the token once on 401. A 404 is returned as a
// *StatusError without retry. Errors are *KeyError.
func (c *Client) get(ctx context.Context, path string) (string, error) {
	key := "meta-data/" + path
	refreshed := false
	for attempt := 1; ; attempt++ {
		if err := c.requests.wait(ctx); err != nil {
			return "", &KeyError{Key: key, Err: err}
		}
		rec := &attemptRecord{}
		actx, cancel := context.WithTimeout(context.WithValue(ctx, attemptRecordKey{}, rec), 2*c.timeout) // token + GET
		out, err := c.sdk.GetMetadata(actx, &sdkimds.GetMetadataInput{Path: path})
		var body []byte
		if err == nil {
			body, err = io.ReadAll(out.Content)
			out.Content.Close()
		}
		timedOut := actx.Err() == context.DeadlineExceeded
		cancel()
		if err == nil {
			return string(body), nil
		}
		if ctx.Err() != nil {
			return "", &KeyError{Key: key, Err: ctx.Err()}
		}
		// The last request sent names what failed: api/token, or key itself.
		failedKey := cmp.Or(rec.path, key)
		var retryAfter time.Duration
		switch {
		case rec.bodyTooLarge:
			return "", &KeyError{Key: failedKey, Err: ErrBodyTooLarge}
		case rec.status == http.StatusUnauthorized && !refreshed:
			// The token expired or was revoked; the SDK dropped its cached
			// token, so the next attempt fetches a fresh one. Once only: a
			// second 401 means IMDS rejects fresh tokens too.
			refreshed = true
			attempt--
			continue
		case (rec.status == http.StatusTooManyRequests || rec.status >= 500) && attempt < c.maxAttempts:
			retryAfter = rec.retryAfter
		case rec.status != 0 && rec.status != http.StatusOK:
			// 404 (absent), 400 (bad TTL), 403 (IMDS disabled), 401 twice,
			// 5xx and 429 after the last attempt ...
			return "", &KeyError{Key: failedKey, Err: &StatusError{StatusCode: rec.status, Attempts: attempt}}
		case rec.transportErr != nil || timedOut:
			cause := rec.transportErr
			if cause == nil || (isUnreachableTransport(err) && !isUnreachableTransport(cause)) {
				// http.Client's own timeout cancels the request: the transport
				// then saw only "net/http: request canceled", while the error
				// the client returned says what happened (Client.Timeout).
				cause = err
			}
			if attempt >= c.maxAttempts {
				if isUnreachableTransport(cause) || timedOut {
					err := fmt.Errorf("IMDS at %s %w after %d attempts: %w", c.endpoint, errUnreachable, attempt, cause)
					return "", &KeyError{Key: failedKey, Err: err}
				}
				return "", &KeyError{Key: failedKey, Err: fmt.Errorf("after %d attempts: %w", attempt, cause)}
			}
		default:
			// IMDS answered 200 but the SDK could not use the answer (e.g. a
			// token response without a TTL header): not worth retrying.
			return "", &KeyError{Key: failedKey, Err: err}
		}
		err = sleep(ctx, max(backoff(attempt), retryAfter))
		if err == nil {
			err = c.retries.wait(ctx)
		}
		if err != nil {
			return "", &KeyError{Key: key, Err: err}
		}
	}
}

// backoff returns the jittered delay before retry number attempt (1-based):
// between half and all of backoffBase*2^(attempt-1), capped at backoffMax.
func backoff(attempt int) time.Duration {
	d := min(backoffBase<<min(attempt-1, 8), backoffMax) // the shift stays far from overflow
	return d/2 + rand.N(d/2+1)
}

// forEach runs fn(i) for i in [0,n) on at most DefaultConcurrency goroutines. On
// the first failure it cancels the rest and returns the failure with the
// lowest index that is not a consequence of that cancellation, so the error
// does not depend on scheduling more than it must. A failure that returns
// once the cancellation is under way is a consequence, whatever it says:
// net/http reports a request cancelled mid-flight as "net/http: request
// canceled", which is not context.Canceled, and that must not hide the
// timeout that caused it.
func (c *Client) forEach(parent context.Context, n int, fn func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	causes := make([]error, n)       // failures before any cancellation
	consequences := make([]error, n) // failures once ctx was cancelled
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(DefaultConcurrency, n) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := fn(ctx, i); err != nil {
					if ctx.Err() != nil {
						consequences[i] = err
					} else {
						causes[i] = err
						cancel()
					}
				}
			}
		})
	}
	wg.Wait()
	errs := slices.Concat(causes, consequences)
	if i := slices.IndexFunc(errs, func(err error) bool { return err != nil && !errors.Is(err, context.Canceled) }); i >= 0 {
		return errs[i]
	}
	if i := slices.IndexFunc(errs, func(err error) bool { return err != nil }); i >= 0 {
		return errs[i]
	}
	return parent.Err() // canceled before every job ran
}
