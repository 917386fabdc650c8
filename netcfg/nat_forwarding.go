package netcfg

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/dualhomed/dualhomed/netcfg/nsthread"
)

// ipForwardStateFile records net.ipv4.ip_forward as it was before the NAT
// turned it on, so that cleanup can restore it. The kernel has no owner mark
// for sysctls: this file is the only record.
const ipForwardStateFile = "ip_forward.json"

const ipForwardPath = "/proc/sys/net/ipv4/ip_forward"

type ipForwardRecord struct {
	Original int `json:"original"`
}

func (t *NATTable) ipForwardStatePath() string { return filepath.Join(t.stateDir, ipForwardStateFile) }

// forwardingRecord is the recorded original, nil when there is none.
func (t *NATTable) forwardingRecord() (*ipForwardRecord, error) {
	var rec *ipForwardRecord
	if err := readJSON(t.ipForwardStatePath(), &rec); err != nil {
		return nil, fmt.Errorf("reading ip_forward original: %w", err)
	}
	return rec, nil
}

// readForwarding is `sysctl net.ipv4.ip_forward` inside the namespace.
func (t *NATTable) readForwarding() (int, error) {
	var v int
	err := nsthread.Do(t.ns, func() error {
		b, err := os.ReadFile(ipForwardPath)
		if err != nil {
			return err
		}
		v, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("reading net.ipv4.ip_forward: %w", err)
	}
	return v, nil
}

// writeForwarding is `sysctl -w net.ipv4.ip_forward=<v>` inside the namespace.
func (t *NATTable) writeForwarding(v int) error {
	err := nsthread.Do(t.ns, func() error {
		return os.WriteFile(ipForwardPath, []byte(strconv.Itoa(v)), 0o644)
	})
	if err != nil {
		return fmt.Errorf("setting net.ipv4.ip_forward=%d: %w", v, err)
	}
	return nil
}

// enableForwarding records ip_forward's value (the first time only, before
// writing, so that a crash never loses it) and sets it to 1.
func (t *NATTable) enableForwarding() (int, error) {
	cur, err := t.readForwarding()
	if err != nil {
		return 0, err
	}
	rec, err := t.forwardingRecord()
	if err != nil {
		return 0, err
	}
	if rec == nil {
		if err := WriteStateFile(t.ipForwardStatePath(), ipForwardRecord{Original: cur}, 0o600); err != nil {
			return 0, fmt.Errorf("recording original ip_forward: %w", err)
		}
	}
	if cur == 1 {
		return 0, nil
	}
	return 1, t.writeForwarding(1)
}

// restoreForwarding puts back the recorded value and forgets the record.
// Without a record the NAT never changed ip_forward: nothing to do.
func (t *NATTable) restoreForwarding() (int, error) {
	rec, err := t.forwardingRecord()
	if err != nil || rec == nil {
		return 0, err
	}
	cur, err := t.readForwarding()
	if err != nil {
		return 0, err
	}
	writes := 0
	if cur != rec.Original {
		writes = 1
		if err := t.writeForwarding(rec.Original); err != nil {
			return writes, err
		}
	}
	if err := os.Remove(t.ipForwardStatePath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return writes, fmt.Errorf("forgetting ip_forward original: %w", err)
	}
	return writes, nil
}
