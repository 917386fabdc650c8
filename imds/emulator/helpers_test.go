package emulator_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

func errorsAs(err error, target any) bool { return err != nil && errors.As(err, target) }

var (
	buildOnce sync.Once
	binDir    string
	binPath   string
	buildErr  error
)

// buildEmulator builds cmd/imds-emulator once per test binary run.
func buildEmulator(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "imds-emulator-test")
		if buildErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "imds-emulator")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/dualhomed/dualhomed/cmd/imds-emulator").CombinedOutput()
		if err != nil {
			buildErr = errors.New("building the emulator: " + err.Error() + "\n" + string(out))
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}
