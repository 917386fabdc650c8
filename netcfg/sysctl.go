package netcfg

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"
)

// inNamespace runs fn on an OS thread inside ns, or on the calling goroutine
// when ns is not open (the caller's own namespace). /proc/sys/net shows the
// namespace of the thread that opens a file, so sysctls must be read and
// written from there.
func inNamespace(ns netns.NsHandle, fn func() error) error {
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
			// Stay locked: the runtime throws the thread away when the
			// goroutine ends, so no other goroutine runs in the wrong namespace.
			errc <- fmt.Errorf("leaving namespace: %w", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// rpFilterPath is /proc/sys/net/ipv4/conf/<link>/rp_filter; link names that
// could escape the directory are refused.
func rpFilterPath(link string) (string, error) {
	if link == "" || link == "." || link == ".." || strings.ContainsAny(link, "/\x00") {
		return "", fmt.Errorf("invalid link name %q", link)
	}
	return filepath.Join("/proc/sys/net/ipv4/conf", link, "rp_filter"), nil
}

// readRPFilter is `sysctl net.ipv4.conf.<link>.rp_filter` inside ns.
func readRPFilter(ns netns.NsHandle, link string) (int, error) {
	path, err := rpFilterPath(link)
	if err != nil {
		return 0, err
	}
	var v int
	err = inNamespace(ns, func() error {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		v, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("reading net.ipv4.conf.%s.rp_filter: %w", link, err)
	}
	return v, nil
}

// readRPFilters reads the rp_filter of each link inside ns in one trip into
// the namespace; a link that does not exist reads as -1.
func readRPFilters(ns netns.NsHandle, links []string) ([]int, error) {
	paths := make([]string, len(links))
	for i, link := range links {
		p, err := rpFilterPath(link)
		if err != nil {
			return nil, err
		}
		paths[i] = p
	}
	values := make([]int, len(links))
	err := inNamespace(ns, func() error {
		for i, path := range paths {
			b, err := os.ReadFile(path)
			if errors.Is(err, fs.ErrNotExist) {
				values[i] = -1
				continue
			}
			if err == nil {
				values[i], err = strconv.Atoi(strings.TrimSpace(string(b)))
			}
			if err != nil {
				return fmt.Errorf("reading net.ipv4.conf.%s.rp_filter: %w", links[i], err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return values, nil
}

// writeRPFilter is `sysctl -w net.ipv4.conf.<link>.rp_filter=<v>` inside ns.
func writeRPFilter(ns netns.NsHandle, link string, v int) error {
	path, err := rpFilterPath(link)
	if err != nil {
		return err
	}
	err = inNamespace(ns, func() error {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		if _, err := f.WriteString(strconv.Itoa(v)); err != nil {
			f.Close()
			return err
		}
		return f.Close()
	})
	if err != nil {
		return fmt.Errorf("setting net.ipv4.conf.%s.rp_filter=%d: %w", link, v, err)
	}
	return nil
}
