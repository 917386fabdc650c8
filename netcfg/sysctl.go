package netcfg

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"

	"github.com/dualhomed/dualhomed/netcfg/nsthread"
)

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
	err = nsthread.Do(ns, func() error {
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
	err := nsthread.Do(ns, func() error {
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
	err = nsthread.Do(ns, func() error {
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
