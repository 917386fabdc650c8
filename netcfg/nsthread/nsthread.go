// Package nsthread runs a function on an OS thread inside a network
// namespace. It is the one place that enters namespaces: netcfg uses it for
// sockets and sysctls, the test and simulation helpers for everything else.
package nsthread

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs fn on an OS thread inside ns, or on the calling goroutine when ns is
// not open (the caller's own namespace). Sockets fn creates stay in ns for
// their whole life, and /proc/sys/net shows ns's values: both follow the
// thread that opens them. The thread returns to its original namespace
// afterwards; if it cannot, it stays locked and the runtime throws it away
// with its goroutine, so no other goroutine ever runs in the wrong namespace.
func Do(ns netns.NsHandle, fn func() error) error {
	if !ns.IsOpen() {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("getting current namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering namespace: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("leaving namespace: %w", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
