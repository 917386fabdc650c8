package netcfg

import (
	"fmt"
	"path/filepath"
	"sort"

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

func (k *Kernel) readAddrRecords() ([]addrRecord, error) {
	var recs []addrRecord
	if err := readJSON(k.addrStatePath(), &recs); err != nil {
		return nil, fmt.Errorf("reading owned addresses: %w", err)
	}
	return recs, nil
}

// addrRecords returns the recorded addresses as a set.
func (k *Kernel) addrRecords() (map[addrRecord]bool, error) {
	recs, err := k.readAddrRecords()
	if err != nil {
		return nil, err
	}
	set := make(map[addrRecord]bool, len(recs))
	for _, r := range recs {
		set[r] = true
	}
	return set, nil
}

func (k *Kernel) writeAddrRecords(set map[addrRecord]bool) error {
	recs := make([]addrRecord, 0, len(set))
	for r := range set {
		recs = append(recs, r)
	}
	sort.Slice(recs, func(i, j int) bool {
		if recs[i].Link != recs[j].Link {
			return recs[i].Link < recs[j].Link
		}
		return recs[i].Prefix < recs[j].Prefix
	})
	if err := writeJSONAtomic(k.addrStatePath(), recs); err != nil {
		return fmt.Errorf("recording owned addresses: %w", err)
	}
	return nil
}

// recordAddr notes that we added a.
func (k *Kernel) recordAddr(a Addr) error {
	set, err := k.addrRecords()
	if err != nil {
		return err
	}
	set[addrRecord{Link: a.LinkIndex, Prefix: a.Prefix.String()}] = true
	return k.writeAddrRecords(set)
}

// forgetAddr drops a's record once it is deleted.
func (k *Kernel) forgetAddr(a Addr) error {
	set, err := k.addrRecords()
	if err != nil {
		return err
	}
	rec := addrRecord{Link: a.LinkIndex, Prefix: a.Prefix.String()}
	if !set[rec] {
		return nil
	}
	delete(set, rec)
	return k.writeAddrRecords(set)
}

// pruneAddrRecords forgets recorded addresses that are no longer on their
// link (deleted by somebody else, or gone with their link): should another
// tool add the same address later, it is not ours.
func (k *Kernel) pruneAddrRecords() error {
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
		rec := addrRecord{Link: a.LinkIndex, Prefix: a.Prefix.String()}
		if set[rec] {
			kept[rec] = true
		}
	}
	if len(kept) == len(set) {
		return nil
	}
	return k.writeAddrRecords(kept)
}
