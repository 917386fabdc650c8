package netcfg

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"syscall"
)

// recordFile is a file of the state directory that lists a set of records
// (the addresses or the altnames dualhomed added), sorted by compare.
type recordFile[T comparable] struct {
	name, what string // file name; what it records, for errors
	compare    func(a, b T) int
}

// read returns the recorded set of dir's file: empty when there is no file.
func (f recordFile[T]) read(dir string) (map[T]bool, error) {
	var recs []T
	if err := readJSON(filepath.Join(dir, f.name), &recs); err != nil {
		return nil, fmt.Errorf("reading owned %s: %w", f.what, err)
	}
	set := make(map[T]bool, len(recs))
	for _, r := range recs {
		set[r] = true
	}
	return set, nil
}

// write replaces dir's file with set.
func (f recordFile[T]) write(dir string, set map[T]bool) error {
	if err := WriteStateFile(filepath.Join(dir, f.name), slices.SortedFunc(maps.Keys(set), f.compare), 0o600); err != nil {
		return fmt.Errorf("recording owned %s: %w", f.what, err)
	}
	return nil
}

// readJSON decodes path into v. A missing file leaves v untouched: nothing
// was recorded yet.
func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("parsing %s: %w", path, err)
	}
	return nil
}

// WriteStateFile replaces path with v's JSON, with permissions perm, so that
// a crash leaves either the old or the new file, never a torn one: write a
// temporary file in the same directory, rename it over path. There is no
// fsync: what the files describe (our addresses, the rp_filter values we
// changed, the daemon's status) does not survive a power loss either. The
// file gets the directory's owner when root writes it: root's `dualhomed
// cleanup` or `apply` rewriting a record in the unit's directory (its
// DynamicUser=, kept over a stop) leaves it readable by the next daemon.
func WriteStateFile(path string, v any, perm os.FileMode) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("creating temporary file for %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op once renamed
	_, err = tmp.Write(append(b, '\n'))
	if err == nil {
		err = tmp.Chmod(perm)
	}
	if err == nil {
		err = chownToDir(tmp, dir)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("renaming %s to %s: %w", tmp.Name(), path, err)
	}
	return nil
}

// chownToDir gives f the owner and group of dir when the caller is root and
// they differ (`chown --reference=dir f`).
func chownToDir(f *os.File, dir string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || st.Uid == 0 && st.Gid == 0 {
		return nil
	}
	return f.Chown(int(st.Uid), int(st.Gid))
}
