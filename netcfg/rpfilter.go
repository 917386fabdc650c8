package netcfg

import (
	"fmt"
	"maps"
	"slices"
)

// ownedRPFilters reports the current rp_filter of every recorded link that
// still exists; values gives every link's value by name, as links() reads
// them. A recorded name that could not be a link's is an error: the state
// file is damaged.
func (k *Kernel) ownedRPFilters(values map[string]int) ([]RPFilter, error) {
	orig, err := k.originals(rpFilterStateFile)
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

// applyRPFilter sets the link's rp_filter (recording its original first),
// or restores the original (delete). Its value is read from the link dump.
func (k *Kernel) applyRPFilter(op Op) (int, error) {
	link := op.RPFilter.LinkName
	path, err := rpFilterPath(link)
	if err != nil {
		return 0, err
	}
	s := sysctl{file: rpFilterStateFile, key: link, path: path, read: func() (int, bool, error) {
		_, values, _, err := k.dump.links()
		v, ok := values[link]
		return v, ok, err
	}}
	if op.Delete {
		return k.restoreSysctl(s)
	}
	return k.setSysctl(s, op.RPFilter.Value)
}
