package matrix

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Settings, from the environment (`make matrix` sets MATRIX=1).
var (
	enabled = os.Getenv("MATRIX") == "1"
	// quiet is the fight window after every step.
	quiet = envDuration("MATRIX_QUIET", 60*time.Second)
	// only restricts the run to the stacks whose name matches.
	only = regexp.MustCompile(os.Getenv("MATRIX_ONLY"))
	// daemonFixed lists the daemon changes (results_test.go) whose
	// assertions are plain assertions, no longer expected failures:
	// MATRIX_DAEMON_FIXED=all, or numbers such as 1,3.
	daemonFixed = os.Getenv("MATRIX_DAEMON_FIXED")
	outDir      = envOr("MATRIX_OUT", "../../../build/matrix")
)

// Filled by TestMain.
var (
	rootDir  string // the cached Debian root (lower layer)
	workDir  string // this run's directory
	debV1    string // dualhomed's .deb
	debV2    string // the same with a higher version
	setupErr error
)

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func envDuration(k string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(k)); err == nil {
		return d
	}
	return def
}

func TestMain(m *testing.M) {
	if !enabled || os.Geteuid() != 0 {
		os.Exit(m.Run()) // every test skips with a message
	}
	// MATRIX_KEEP keeps what runs leave behind for inspection: this run's
	// directory, and a killed run's containers and namespaces.
	if os.Getenv("MATRIX_KEEP") == "" {
		sweep()
	}
	var err error
	workDir, err = os.MkdirTemp("/var/tmp", fmt.Sprintf("dualhomed-matrix-%d-", os.Getpid()))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sig
		fmt.Fprintf(os.Stderr, "matrix: %v: stopping the containers and removing their namespaces\n", s)
		teardown()
		os.Exit(1)
	}()
	setupErr = setup()
	code := m.Run()
	teardown()
	os.Exit(code)
}

// teardown kills every container, removes every namespace and the run's
// directory. Safe to call twice.
func teardown() {
	killAllContainers()
	closeAllWorlds()
	if workDir != "" && os.Getenv("MATRIX_KEEP") == "" {
		_ = exec.Command("sh", "-c", "grep -o ' "+workDir+"[^ ]*' /proc/mounts | xargs -r -n1 umount -l").Run()
		os.RemoveAll(workDir)
	}
}

// sweep removes what a killed run (SIGKILL, where no handler runs) left:
// its containers (they live in its namespaces), namespaces and overlays.
func sweep() {
	entries, _ := os.ReadDir("/run/netns")
	re := regexp.MustCompile(`^mx([0-9]+)c[0-9]+-`)
	for _, e := range entries {
		m := re.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		if pid, _ := strconv.Atoi(m[1]); pid == os.Getpid() || syscall.Kill(pid, 0) == nil {
			continue
		}
		killNSProcesses(e.Name())
		_ = exec.Command("ip", "netns", "delete", e.Name()).Run()
		fmt.Fprintf(os.Stderr, "matrix: removed namespace %s of a killed run\n", e.Name())
	}
	dirs, _ := filepath.Glob("/var/tmp/dualhomed-matrix-*")
	for _, d := range dirs {
		var pid int
		if _, err := fmt.Sscanf(filepath.Base(d), "dualhomed-matrix-%d-", &pid); err != nil || syscall.Kill(pid, 0) == nil {
			continue
		}
		_ = exec.Command("sh", "-c", "grep -o ' "+d+"[^ ]*' /proc/mounts | xargs -r -n1 umount -l").Run()
		os.RemoveAll(d)
		fmt.Fprintf(os.Stderr, "matrix: removed %s of a killed run\n", d)
	}
}

// setup builds the emulator, finds the .deb, makes its higher-version twin
// and the cached root.
func setup() error {
	var err error
	debV1 = os.Getenv("MATRIX_DEB")
	if debV1 == "" {
		debs, _ := filepath.Glob("../../../dist/dualhomed_*_amd64.deb")
		if len(debs) != 1 {
			return fmt.Errorf("want one dist/dualhomed_*_amd64.deb (make package), found %d", len(debs))
		}
		debV1, _ = filepath.Abs(debs[0])
	}
	if debV2, err = bumpDeb(debV1); err != nil {
		return err
	}
	script, err := os.ReadFile("root.sh")
	if err != nil {
		return err
	}
	sum := sha256.Sum256(script)
	cache := envOr("MATRIX_CACHE", "/var/cache/dualhomed-matrix")
	if os.Getenv("CI") != "" && os.Getenv("MATRIX_CACHE") == "" {
		cache = filepath.Join(workDir, "cache") // CI starts clean
	}
	dir := filepath.Join(cache, hex.EncodeToString(sum[:])[:16])
	start := time.Now()
	cmd := exec.Command("bash", "root.sh", dir)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("building the Debian root: %w", err)
	}
	rootDir = strings.TrimSpace(string(out))
	fmt.Fprintf(os.Stderr, "matrix: Debian root %s ready in %s\n", rootDir, time.Since(start).Round(time.Second))
	return nil
}

// bumpDeb repacks the .deb with its Debian revision raised by one, for the
// upgrade step (dpkg runs the upgrade scripts for a higher version).
func bumpDeb(deb string) (string, error) {
	dir := filepath.Join(workDir, "deb-v2")
	if out, err := exec.Command("dpkg-deb", "-R", deb, dir).CombinedOutput(); err != nil {
		return "", fmt.Errorf("unpacking %s: %v: %s", deb, err, out)
	}
	ctl := filepath.Join(dir, "DEBIAN", "control")
	b, err := os.ReadFile(ctl)
	if err != nil {
		return "", err
	}
	re := regexp.MustCompile(`(?m)^Version: (.*)-([0-9]+)$`)
	m := re.FindSubmatch(b)
	if m == nil {
		return "", fmt.Errorf("%s: no Version: x-N line", ctl)
	}
	rev, _ := strconv.Atoi(string(m[2]))
	b = re.ReplaceAll(b, []byte(fmt.Sprintf("Version: ${1}-%d", rev+1)))
	if err := os.WriteFile(ctl, b, 0o644); err != nil {
		return "", err
	}
	out := filepath.Join(workDir, "dualhomed-v2.deb")
	if o, err := exec.Command("dpkg-deb", "-Zxz", "-b", dir, out).CombinedOutput(); err != nil {
		return "", fmt.Errorf("repacking: %v: %s", err, o)
	}
	return out, nil
}

func needMatrix(t *testing.T) {
	t.Helper()
	if !enabled {
		t.Skip("skipping: the coexistence matrix runs with MATRIX=1 (`sudo make matrix`)")
	}
	if os.Geteuid() != 0 {
		t.Skip("skipping: the coexistence matrix needs root (namespaces, systemd-nspawn)")
	}
	if setupErr != nil {
		t.Fatalf("setting up the matrix: %v", setupErr)
	}
}
