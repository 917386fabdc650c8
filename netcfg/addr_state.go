package netcfg

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// addrStateFile records the addresses dualhomed added, on kernels older than
// 5.18 that cannot mark an address with IFA_PROTO. It lives under the state
// directory (/run/dualhomed: gone at reboot, like the addresses themselves).
const addrStateFile = "addresses.json"

// addrRecord is one address we added: link index and address/prefix length.
type addrRecord struct {
	Link   int    `json:"link"`
	Prefix string `json:"prefix"`
}

func (k *Kernel) addrStatePath() string { return filepath.Join(k.stateDir, addrStateFile) }

func recordOf(link int, p netip.Prefix) addrRecord { return addrRecord{Link: link, Prefix: p.String()} }

// addrRecords returns the recorded addresses as a set.
func (k *Kernel) addrRecords() (map[addrRecord]bool, error) {
	var recs []addrRecord
	if err := readJSON(k.addrStatePath(), &recs); err != nil {
		return nil, fmt.Errorf("reading owned addresses: %w", err)
	}
	set := make(map[addrRecord]bool, len(recs))
	for _, r := range recs {
		set[r] = true
	}
	return set, nil
}

func (k *Kernel) writeAddrRecords(set map[addrRecord]bool) error {
	recs := slices.SortedFunc(maps.Keys(set), func(a, b addrRecord) int {
		return cmp.Or(cmp.Compare(a.Link, b.Link), strings.Compare(a.Prefix, b.Prefix))
	})
	if err := WriteStateFile(k.addrStatePath(), recs, 0o600); err != nil {
		return fmt.Errorf("recording owned addresses: %w", err)
	}
	return nil
}

// recordAddr notes that we added a (owned) or deleted it, on a kernel
// without IFA_PROTO.
func (k *Kernel) recordAddr(a Addr, owned bool) error {
	if k.addrProto {
		return nil
	}
	set, err := k.addrRecords()
	if err != nil {
		return err
	}
	rec := recordOf(a.LinkIndex, a.Prefix)
	if set[rec] == owned {
		return nil
	}
	if owned {
		set[rec] = true
	} else {
		delete(set, rec)
	}
	return k.writeAddrRecords(set)
}

// pruneAddrRecords forgets recorded addresses that are no longer on their
// link (deleted by somebody else, or gone with their link): should another
// tool add the same address later, it is not ours.
func (k *Kernel) pruneAddrRecords() error {
	if k.addrProto {
		return nil
	}
	set, err := k.addrRecords()
	if err != nil || len(set) == 0 {
		return err
	}
	present, err := k.dump.addrs(unix.AF_UNSPEC)
	if err != nil {
		return err
	}
	kept := map[addrRecord]bool{}
	for _, a := range present {
		if rec := recordOf(a.LinkIndex, a.Prefix); set[rec] {
			kept[rec] = true
		}
	}
	if len(kept) == len(set) {
		return nil
	}
	return k.writeAddrRecords(kept)
}
