package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/dualhomed/dualhomed/netcfg"
)

// StatusFile is the name of the daemon's status file inside the state directory.
const StatusFile = "status.json"

// StatusSchema is the version of status.json's and `dualhomed status
// --json`'s fields (docs/cli.md): it goes up when a field is renamed,
// removed or changes type, not when one is added.
// testdata/status.schema lists the fields of the version.
const StatusSchema = 1

// Health is what the daemon publishes in <state_dir>/status.json after every
// reconcile, for `dualhomed status` and for humans.
type Health struct {
	Schema  int       `json:"schema"` // StatusSchema
	PID     int       `json:"pid"`
	Version string    `json:"version"`
	Started time.Time `json:"started"`
	Updated time.Time `json:"updated"`
	// Ready is true once READY=1 was sent (possibly degraded, after start_timeout).
	Ready bool `json:"ready"`
	// Degraded is true while IMDS is unreachable or changes fail to apply.
	Degraded    bool      `json:"degraded"`
	Summary     string    `json:"summary"`
	LastSuccess time.Time `json:"last_success,omitempty"`
	LastError   string    `json:"last_error,omitempty"`
	Report      Report    `json:"report"`
}

// WriteStatus replaces <dir>/status.json atomically, so a reader never sees
// a half-written file. Any user may read it.
func WriteStatus(dir string, h Health) error {
	h.Schema = StatusSchema
	return netcfg.WriteStateFile(filepath.Join(dir, StatusFile), h, 0o644)
}

// ReadStatus reads the daemon's status file from dir.
func ReadStatus(dir string) (Health, error) {
	var h Health
	data, err := os.ReadFile(filepath.Join(dir, StatusFile))
	if err != nil {
		return h, err
	}
	if err := json.Unmarshal(data, &h); err != nil {
		return h, fmt.Errorf("decoding %s: %w", filepath.Join(dir, StatusFile), err)
	}
	return h, nil
}
