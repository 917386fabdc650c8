package imds

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"syscall"
)

// KeyError is returned by Snapshot when one metadata key could not be read
// or parsed. It makes the whole snapshot fail: a snapshot is never partial.
type KeyError struct {
	// Key is the path below /latest/, e.g.
	// "meta-data/network/interfaces/macs/02:00:00:00:00:02/local-ipv4s".
	Key string
	// Err is a *ValueError (which names the offending value), a
	// *StatusError, or the transport error of the last attempt.
	Err error
}

func (e *KeyError) Error() string {
	var ve *ValueError
	if errors.As(e.Err, &ve) {
		// `<key>: "10.0.0.300" is not an IPv4 address`
		return fmt.Sprintf("%s: %v", e.Key, e.Err)
	}
	return fmt.Sprintf("reading %s: %v", e.Key, e.Err)
}

func (e *KeyError) Unwrap() error { return e.Err }

// StatusError is an HTTP status other than 200 that IMDS answered with,
// after retries when the status is retryable.
type StatusError struct {
	StatusCode int
	Attempts   int
}

func (e *StatusError) Error() string {
	s := fmt.Sprintf("IMDS answered HTTP %d %s", e.StatusCode, http.StatusText(e.StatusCode))
	if e.Attempts > 1 {
		s += fmt.Sprintf(" (%d attempts)", e.Attempts)
	}
	return s
}

// ErrBodyTooLarge is returned (wrapped) when a response body exceeds
// MaxBodySize: a huge answer is an error, never unbounded memory.
var ErrBodyTooLarge = fmt.Errorf("response body exceeds %d bytes", MaxBodySize)

// errUnreachable marks a transport failure that means nothing answers at
// the endpoint (connection refused, no route, timeout).
var errUnreachable = errors.New("unreachable")

// IsUnreachable reports whether err means that nothing usable answers at the
// IMDS endpoint: connection refused, no route, or timeouts. Callers use it to
// say "IMDS unreachable: not on EC2?" rather than a generic failure. It is
// false for HTTP errors (IMDS answered) and for the caller's own cancellation.
func IsUnreachable(err error) bool {
	return errors.Is(err, errUnreachable) || isUnreachableTransport(err)
}

func isUnreachableTransport(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	var ne net.Error
	var oe *net.OpError
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, context.DeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout()) || (errors.As(err, &oe) && oe.Op == "dial")
}
