package simworld

// What the test suites need around a world: the programs built, a world per
// test that cleans up after itself, and their logs quoted in failures.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// DualhomedPkg is the import path of the program a world runs.
const DualhomedPkg = "github.com/dualhomed/dualhomed/cmd/dualhomed"

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

// ForTest builds a world for t, with the instance's echo server running,
// or skips t unless it runs as root. When t ends, the world's programs are
// killed (so that their logs are complete, race reports included: a data
// race fails t), their logs and the instance's state are logged if t
// failed, and the world is removed; a namespace left behind fails t.
func ForTest(t testing.TB, dualhomedBin string) *World {
	t.Helper()
	return ForTestWith(t, Options{DualhomedBin: dualhomedBin})
}

// ForTestWith is ForTest with opts.
func ForTestWith(t testing.TB, opts Options) *World {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: the simulated instance needs root to create network namespaces (run `sudo make test`)")
	}
	w, err := New(opts)
	if err != nil {
		t.Fatalf("building the simulated instance: %v", err)
	}
	t.Cleanup(func() {
		for _, p := range w.Procs() {
			p.Kill()
			if log := p.Log(); strings.Contains(log, "WARNING: DATA RACE") {
				t.Errorf("the race detector caught a data race in %s:\n%s", p.Name, log[strings.Index(log, "WARNING: DATA RACE"):])
			}
		}
		if t.Failed() {
			for _, p := range w.Procs() {
				t.Logf("log of %s:\n%s", p.Name, Tail(p.Log(), 60))
			}
			if d, err := DumpState(w.Instance); err == nil {
				t.Logf("instance state at failure:\n%s", d)
			}
		}
		if err := w.Close(); err != nil {
			t.Errorf("tearing down the world: %v", err)
		}
		for _, name := range w.Namespaces() {
			if _, err := os.Stat(filepath.Join("/run/netns", name)); err == nil {
				t.Errorf("namespace %s left behind", name)
			}
		}
	})
	if err := w.ServeEcho(w.Instance, EchoPort); err != nil {
		t.Fatal(err)
	}
	return w
}
