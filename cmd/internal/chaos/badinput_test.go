package chaos

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// result is how one dualhomed invocation ended.
type result struct {
	code           int // -1: killed after the timeout (it hung)
	stdout, stderr string
}

// invoke runs dualhomed with exactly args inside the instance, killing it
// after timeout.
func invoke(w *simworld.World, timeout time.Duration, args ...string) result {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := w.Instance.Command(ctx, dualhomedBin, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		r.code = -1
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		r.code = -2
		r.stderr += err.Error()
	}
	return r
}

// TestBadInput feeds dualhomed command-line misuse and unusable
// configuration files while a change is pending (a new address in IMDS):
// each invocation fails with its exit code and a clear message, within
// seconds, and the kernel is left exactly as it was.
func TestBadInput(t *testing.T) {
	w := newWorld(t, simworld.Options{})
	if err := w.WriteConfig(simworld.DaemonOptions{PollInterval: 2 * time.Second}); err != nil {
		t.Fatal(err)
	}
	runDualhomed(t, w, "apply")
	// A pending change: whatever runs by mistake would apply it.
	pending := netip.MustParseAddr("10.1.1.77")
	if err := w.AddIP(w.ENI("eth1"), pending); err != nil {
		t.Fatal(err)
	}
	before := dump(t, w)

	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	notDir := write("plain-file", "poll_interval: 5s\n")
	fifo := filepath.Join(dir, "config.fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	flags := func(config string) []string {
		return []string{"--config", config, "--imds-endpoint", simworld.IMDSEndpoint, "--state-dir", w.StateDir()}
	}
	good := w.ConfigPath()

	type tc struct {
		name string
		args []string
		code int
		// want: words the error output must hold.
		want []string
	}
	var cases []tc
	for _, cmd := range []string{"apply", "daemon", "plan"} {
		cases = append(cases,
			tc{cmd + " with a directory as config", append([]string{cmd}, flags(dir)...), 1, []string{dir, "directory"}},
			tc{cmd + " with a config path through a file", append([]string{cmd}, flags(notDir+"/dualhomed.yaml")...), 1, []string{notDir, "not a directory"}},
			tc{cmd + " with invalid YAML", append([]string{cmd}, flags(write(cmd+"-invalid.yaml", "poll_interval: 5s\nlog: [level: info\n"))...), 1, []string{cmd + "-invalid.yaml:"}},
			tc{cmd + " with an unknown key", append([]string{cmd}, flags(write(cmd+"-unknown.yaml", "# comment\npol_interval: 5s\n"))...), 1, []string{cmd + "-unknown.yaml:2", "pol_interval"}},
			tc{cmd + " with a bad value", append([]string{cmd}, flags(write(cmd+"-value.yaml", "log:\n  level: info\nprotocol: 300\n"))...), 1, []string{cmd + "-value.yaml:3", "protocol", "300"}},
			tc{cmd + " with binary junk as config", append([]string{cmd}, flags(write(cmd+"-junk.yaml", "\x00\x01\xfe\xff\x7fjunk"))...), 1, []string{cmd + "-junk.yaml"}},
			// A FIFO nobody writes to: reading it would block for ever (and a
			// character device such as /dev/zero would never end).
			tc{cmd + " with a FIFO as config", append([]string{cmd}, flags(fifo)...), 1, []string{fifo}},
		)
	}
	cases = append(cases,
		tc{"no command", flags(good), 2, []string{"Usage:"}},
		tc{"unknown command", append([]string{"frobnicate"}, flags(good)...), 2, []string{"frobnicate", "Usage:"}},
		tc{"unknown flag", append([]string{"apply", "--frobnicate"}, flags(good)...), 2, []string{"--frobnicate", "Usage:"}},
		tc{"unexpected argument", append([]string{"apply", "now"}, flags(good)...), 2, []string{"now", "Usage:"}},
		tc{"negative --wait", append([]string{"apply", "--wait=-1s"}, flags(good)...), 2, []string{"--wait", "Usage:"}},
		tc{"bad --wait", append([]string{"apply", "--wait=soon"}, flags(good)...), 2, []string{"--wait", "Usage:"}},
		tc{"bad --imds-endpoint", append([]string{"apply"}, append(flags(good), "--imds-endpoint", "ftp://imds")...), 2, []string{"--imds-endpoint", "Usage:"}},
		tc{"relative --state-dir", append([]string{"apply"}, append(flags(good), "--state-dir", "state")...), 2, []string{"--state-dir", "Usage:"}},
		tc{"bad --log-level", append([]string{"daemon"}, append(flags(good), "--log-level", "loud")...), 2, []string{"--log-level", "Usage:"}},
		tc{"flag without its value", []string{"apply", "--config"}, 2, []string{"--config", "Usage:"}},
	)

	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			r := invoke(w, 5*time.Second, c.args...)
			out := r.stdout + r.stderr
			switch {
			case r.code == -1:
				t.Errorf("dualhomed %s: still running after 5 s (hangs)", strings.Join(c.args, " "))
			case r.code != c.code:
				t.Errorf("dualhomed %s: exit %d, want %d\n%s", strings.Join(c.args, " "), r.code, c.code, simworld.Tail(out, 10))
			}
			for _, word := range c.want {
				if !strings.Contains(r.stderr, word) {
					t.Errorf("dualhomed %s: error output does not name %q:\n%s", strings.Join(c.args, " "), word, simworld.Tail(out, 10))
				}
			}
			if c.code == 1 && strings.Contains(r.stderr, "Usage:") {
				t.Errorf("a bad configuration is not a usage error, but the usage was printed:\n%s", simworld.Tail(out, 10))
			}
			removed, added := before.Diff(dump(t, w))
			if len(removed)+len(added) > 0 {
				t.Fatalf("the kernel changed: -%v +%v", removed, added)
			}
		})
	}

	// An empty file, or one with only comments, means the defaults: the
	// pending change is then applied (which proves the checks above could fail).
	for _, content := range []string{"", "# nothing here\n\n"} {
		cfg := write("empty.yaml", content)
		if r := invoke(w, 10*time.Second, append([]string{"plan"}, flags(cfg)...)...); r.code != 2 || !strings.Contains(r.stdout, pending.String()) {
			t.Errorf("plan with an empty config %q: exit %d, want 2 with %s pending\n%s", content, r.code, pending, simworld.Tail(r.stdout+r.stderr, 10))
		}
	}
	if r := invoke(w, 20*time.Second, append([]string{"apply"}, flags(write("empty.yaml", ""))...)...); r.code != 0 {
		t.Fatalf("apply with an empty config: exit %d\n%s", r.code, r.stderr)
	}
	if _, added := before.Diff(dump(t, w)); len(dump(t, w).Grep(pending.String())) == 0 {
		t.Errorf("apply with an empty config did not apply the pending %s (added: %v)", pending, added)
	}
}
