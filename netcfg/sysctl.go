package netcfg

import (
	"fmt"
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
