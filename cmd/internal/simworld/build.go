package simworld

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The programs a world runs, by import path.
const (
	DualhomedPkg = "github.com/dualhomed/dualhomed/cmd/dualhomed"
	EmulatorPkg  = "github.com/dualhomed/dualhomed/cmd/imds-emulator"
)

// Build compiles pkg into dir with the go command that runs the tests and
// returns the binary's path. With race, the binary is built with the race
// detector (which needs cgo), so that a data race in a program under test
// shows up in its log; without it, CGO_ENABLED=0 as in the packages.
func Build(dir, pkg string, race bool) (string, error) {
	gobin := filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	if _, err := os.Stat(gobin); err != nil {
		gobin = "go"
	}
	args := []string{"build", "-o", dir + "/"}
	env := append(os.Environ(), "CGO_ENABLED=0")
	if race {
		args = append(args, "-race")
		env = os.Environ()
	}
	cmd := exec.Command(gobin, append(args, pkg)...)
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building %s: %v\n%s", pkg, err, out)
	}
	return filepath.Join(dir, filepath.Base(pkg)), nil
}

// Tail returns the last lines of s, for quoting a program's log in a failure.
func Tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}
