package main

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestBadUsageExits2WithUsage(t *testing.T) {
	for _, args := range [][]string{
		{"--bogus"},
		{"plan", "--bogus"},
		{"apply", "--wait", "soon"},
		{"status", "extra-arg"},
		{"frobnicate"},
		{},
		{"plan", "--log-format", "xml"},
		{"plan", "--imds-endpoint", "169.254.169.254"},
	} {
		code, _, stderr := runCLI(t, args...)
		if code != exitUsage {
			t.Errorf("dualhomed %q: exit %d, want %d (stderr %q)", args, code, exitUsage, stderr)
		}
		if !strings.Contains(stderr, "Usage:") || !strings.HasPrefix(stderr, "Error: ") {
			t.Errorf("dualhomed %q: stderr lacks the error and the usage:\n%s", args, stderr)
		}
	}
}

func TestHelpDocumentsExitCodes(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"plan", "--help"}, {"apply", "--help"}} {
		code, stdout, _ := runCLI(t, args...)
		if code != 0 || !strings.Contains(stdout, "Exit codes:") {
			t.Errorf("dualhomed %q: exit %d, help without exit codes:\n%s", args, code, stdout)
		}
	}
}

func TestVersionAndCompletion(t *testing.T) {
	version = "1.2.3-test"
	if code, out, _ := runCLI(t, "version"); code != 0 || out != "dualhomed 1.2.3-test\n" {
		t.Errorf("version: exit %d, %q", code, out)
	}
	if code, out, _ := runCLI(t, "completion", "bash"); code != 0 || !strings.Contains(out, "dualhomed") {
		t.Errorf("completion bash: exit %d", code)
	}
}

func TestGenMan(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "man1")
	if code, _, errs := runCLI(t, "gen-man", dir); code != 0 {
		t.Fatalf("gen-man: exit %d: %s", code, errs)
	}
	for _, page := range []string{"dualhomed.1", "dualhomed-daemon.1", "dualhomed-plan.1", "dualhomed-status.1"} {
		if _, err := os.Stat(filepath.Join(dir, page)); err != nil {
			t.Errorf("gen-man did not write %s: %v", page, err)
		}
	}
}

func TestBadConfigNamesFileAndLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dualhomed.yaml")
	if err := os.WriteFile(path, []byte("poll_interval: 15s\nrp_filter: medium\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCLI(t, "plan", "--config", path, "--imds-endpoint", "http://127.0.0.1:1")
	if code != exitError || !strings.Contains(stderr, path+`:2: rp_filter: "medium" is not one of loose, strict, keep`) {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}

// closedEndpoint is an http URL on loopback where nothing listens.
func closedEndpoint(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr
}

// On a machine that is not EC2, plan and status fail quickly with a clear
// message (the test's own timeout catches a hang).
func TestUnreachableIMDSIsExplained(t *testing.T) {
	url := closedEndpoint(t)
	state := t.TempDir()
	for _, cmd := range []string{"plan", "status"} {
		code, _, stderr := runCLI(t, cmd, "--config", filepath.Join(state, "none.yaml"), "--state-dir", state, "--imds-endpoint", url)
		want := "IMDS unreachable at " + url + ": is this an EC2 instance? (set --imds-endpoint)"
		if code != exitError || !strings.Contains(stderr, want) {
			t.Errorf("%s: exit %d, stderr %q, want it to contain %q", cmd, code, stderr, want)
		}
	}
	// The environment variable works like the flag.
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)
	code, _, stderr := runCLI(t, "plan", "--config", filepath.Join(state, "none.yaml"), "--state-dir", state)
	if code != exitError || !strings.Contains(stderr, "IMDS unreachable at "+url) {
		t.Errorf("plan with %s: exit %d, stderr %q", "AWS_EC2_METADATA_SERVICE_ENDPOINT", code, stderr)
	}
}
