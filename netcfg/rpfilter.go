package netcfg

import (
	"fmt"
	"maps"
	"path/filepath"
	"slices"
)

// rpFilterStateFile records, for each link whose rp_filter we changed, the
// value it had before our first write, so that cleanup can restore it. The
// kernel has no owner mark for sysctls: this file is the only record.
const rpFilterStateFile = "rp_filter.json"

func (k *Kernel) rpFilterStatePath() string { return filepath.Join(k.stateDir, rpFilterStateFile) }

// rpFilterOriginals reads the recorded originals, link name -> value.
func (k *Kernel) rpFilterOriginals() (map[string]int, error) {
	orig := map[string]int{}
	if err := readJSON(k.rpFilterStatePath(), &orig); err != nil {
		return nil, fmt.Errorf("reading rp_filter originals: %w", err)
	}
	return orig, nil
}

// ownedRPFilters reports the current rp_filter of every recorded link that
// still exists; values gives every link's value by name, as links() reads
// them. A recorded name that could not be a link's is an error: the state
// file is damaged.
func (k *Kernel) ownedRPFilters(values map[string]int) ([]RPFilter, error) {
	orig, err := k.rpFilterOriginals()
	if err != nil || len(orig) == 0 {
		return nil, err
	}
	var out []RPFilter
	for _, link := range slices.Sorted(maps.Keys(orig)) {
		if _, err := rpFilterPath(link); err != nil {
			return nil, fmt.Errorf("reading rp_filter originals: %w", err)
		}
		if v, ok := values[link]; ok {
			out = append(out, RPFilter{LinkName: link, Value: v})
		} // else the link is gone; its record waits for it to return
	}
	return out, nil
}

// rpFilterNow is link's rp_filter as the link dump reports it; false when
// the link has no IPv4 configuration (it is gone).
func (k *Kernel) rpFilterNow(link string) (value int, ok bool, err error) {
	_, values, _, err := k.dump.links()
	value, ok = values[link]
	return value, ok, err
}

// setRPFilter records the link's original value (first time only, before
// writing, so that a crash never loses it) and sets the new one. It writes
// nothing when the value is already right.
func (k *Kernel) setRPFilter(f RPFilter) (int, error) {
	cur, ok, err := k.rpFilterNow(f.LinkName)
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("reading net.ipv4.conf.%s.rp_filter: no such link", f.LinkName)
	}
	orig, err := k.rpFilterOriginals()
	if err != nil {
		return 0, err
	}
	if _, ok := orig[f.LinkName]; !ok {
		orig[f.LinkName] = cur
		if err := WriteStateFile(k.rpFilterStatePath(), orig, 0o600); err != nil {
			return 0, fmt.Errorf("recording original rp_filter of %s: %w", f.LinkName, err)
		}
	}
	if cur == f.Value {
		return 0, nil
	}
	return 1, writeRPFilter(k.ns, f.LinkName, f.Value)
}

// restoreRPFilter puts back the recorded original value of link's rp_filter
// and forgets the record. A link that is gone has nothing left to restore.
func (k *Kernel) restoreRPFilter(link string) (int, error) {
	orig, err := k.rpFilterOriginals()
	if err != nil {
		return 0, err
	}
	want, recorded := orig[link]
	if !recorded {
		return 0, nil
	}
	cur, present, err := k.rpFilterNow(link)
	if err != nil {
		return 0, err
	}
	writes := 0
	if present && cur != want {
		writes = 1
		if err := writeRPFilter(k.ns, link, want); err != nil {
			return writes, fmt.Errorf("restoring rp_filter of %s: %w", link, err)
		}
	}
	delete(orig, link)
	if err := WriteStateFile(k.rpFilterStatePath(), orig, 0o600); err != nil {
		return writes, fmt.Errorf("forgetting original rp_filter of %s: %w", link, err)
	}
	return writes, nil
}
