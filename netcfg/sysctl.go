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

// The sysctls dualhomed changes, rp_filter of secondary ENIs and ip_forward
// for the NAT, get their value from before our first write recorded in a
// file of the state directory, by key, so that cleanup can restore it. The
// kernel has no owner mark for sysctls: these files are the only record.
const (
	rpFilterStateFile  = "rp_filter.json" // by link name
	ipForwardStateFile = "ip_forward.json"
	ipForwardKey       = "ip_forward"
	ipForwardPath      = "/proc/sys/net/ipv4/ip_forward"
)

// sysctl is one sysctl dualhomed changes: where its original is recorded
// (file, key), its /proc/sys path, and how to read its value now (ok false:
// it is gone, with its link).
type sysctl struct {
	file, key, path string
	read            func() (v int, ok bool, err error)
}

// readSysctl is `sysctl <path>` inside ns: the value of a /proc/sys file.
func readSysctl(ns netns.NsHandle, path string) (int, error) {
	var v int
	err := nsthread.Do(ns, func() error {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		v, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("reading %s: %w", path, err)
	}
	return v, nil
}

// writeSysctl is `sysctl -w <path>=<v>` inside ns.
func writeSysctl(ns netns.NsHandle, path string, v int) error {
	err := nsthread.Do(ns, func() error {
		return os.WriteFile(path, []byte(strconv.Itoa(v)), 0)
	})
	if err != nil {
		return fmt.Errorf("setting %s=%d: %w", path, v, err)
	}
	return nil
}

// originals reads the values recorded in file, by key.
func (k *Kernel) originals(file string) (map[string]int, error) {
	orig := map[string]int{}
	if err := readJSON(filepath.Join(k.stateDir, file), &orig); err != nil {
		return nil, fmt.Errorf("reading recorded sysctl values: %w", err)
	}
	return orig, nil
}

// setSysctl records s's value (the first time only, before writing, so that
// a crash never loses it) and sets it to v. It writes nothing when the value
// is already v.
func (k *Kernel) setSysctl(s sysctl, v int) (int, error) {
	cur, ok, err := s.read()
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("reading %s: no such link", s.path)
	}
	orig, err := k.originals(s.file)
	if err != nil {
		return 0, err
	}
	if _, ok := orig[s.key]; !ok {
		orig[s.key] = cur
		if err := WriteStateFile(filepath.Join(k.stateDir, s.file), orig, 0o600); err != nil {
			return 0, fmt.Errorf("recording the original of %s: %w", s.path, err)
		}
	}
	if cur == v {
		return 0, nil
	}
	return 1, writeSysctl(k.ns, s.path, v)
}

// restoreSysctl puts back the value recorded for s and forgets it. A sysctl
// that is gone (with its link) has nothing left to restore.
func (k *Kernel) restoreSysctl(s sysctl) (int, error) {
	orig, err := k.originals(s.file)
	if err != nil {
		return 0, err
	}
	want, recorded := orig[s.key]
	if !recorded {
		return 0, nil
	}
	cur, present, err := s.read()
	if err != nil {
		return 0, err
	}
	writes := 0
	if present && cur != want {
		writes = 1
		if err := writeSysctl(k.ns, s.path, want); err != nil {
			return writes, fmt.Errorf("restoring %s: %w", s.path, err)
		}
	}
	delete(orig, s.key)
	if err := WriteStateFile(filepath.Join(k.stateDir, s.file), orig, 0o600); err != nil {
		return writes, fmt.Errorf("forgetting the original of %s: %w", s.path, err)
	}
	return writes, nil
}

// rpFilterPath is /proc/sys/net/ipv4/conf/<link>/rp_filter; link names that
// could escape the directory are refused.
func rpFilterPath(link string) (string, error) {
	if link == "" || link == "." || link == ".." || strings.ContainsAny(link, "/\x00") {
		return "", fmt.Errorf("invalid link name %q", link)
	}
	return filepath.Join("/proc/sys/net/ipv4/conf", link, "rp_filter"), nil
}

// ipForward is net.ipv4.ip_forward, which the NAT sets. No link carries it:
// it is read from /proc/sys.
func (k *Kernel) ipForward() sysctl {
	return sysctl{file: ipForwardStateFile, key: ipForwardKey, path: ipForwardPath, read: func() (int, bool, error) {
		v, err := readSysctl(k.ns, ipForwardPath)
		return v, err == nil, err
	}}
}
