package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat:
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// daemonProc is a `dualhomed daemon` process running in the instance
// namespace, with its log in a temporary directory.
type daemonProc struct {
	cmd     *exec.Cmd
	dir     string // state directory and log
	exited  chan struct{}
	waitErr error
}

// startDaemon starts bin as the daemon against the emulator at endpoint,
// with config as its configuration file ("": none, the documented defaults).
func startDaemon(bin, endpoint, config string) (*daemonProc, error) {
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("finding the dualhomed binary (run `make build`): %w", err)
	}
	dir, err := os.MkdirTemp("", "dualhomed-bench-daemon-*")
	if err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "daemon.log"))
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	defer logf.Close()
	configFile := filepath.Join(dir, "absent.yaml") // absent: the documented defaults
	if config != "" {
		configFile = filepath.Join(dir, "config.yaml")
		if err := os.WriteFile(configFile, []byte(config), 0o644); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("writing the daemon's configuration: %w", err)
		}
	}
	cmd := exec.Command(bin, "daemon",
		"--imds-endpoint", endpoint,
		"--state-dir", filepath.Join(dir, "state"),
		"--config", configFile,
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group (Ctrl-C is ours to handle), and killed with us.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET=") // no systemd here
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("starting %s daemon: %w", bin, err)
	}
	d := &daemonProc{cmd: cmd, dir: dir, exited: make(chan struct{})}
	go func() {
		d.waitErr = cmd.Wait()
		close(d.exited)
	}()
	return d, nil
}

// alive returns an error, with the end of the daemon's log, if it exited.
func (d *daemonProc) alive() error {
	select {
	case <-d.exited:
		return fmt.Errorf("the daemon exited (%v); its log ends with:\n%s", d.waitErr, d.logTail(15))
	default:
		return nil
	}
}

// waitReady waits until the daemon logs that its start-up reconcile is
// done (it then watches netlink), or fails after timeout.
func (d *daemonProc) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := d.alive(); err != nil {
			return err
		}
		b, _ := os.ReadFile(filepath.Join(d.dir, "daemon.log"))
		if bytes.Contains(b, []byte(`"msg":"ready"`)) {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return d.logContext(fmt.Errorf("the daemon did not log \"ready\" within %v", timeout))
}

// logContext is the end of the daemon's log, to attach to an error.
func (d *daemonProc) logContext(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w\n  the daemon's last warnings and errors:\n%s\n  the daemon's log ends with:\n%s", err, d.logProblems(10), d.logTail(5))
}

// logProblems returns the last n warning and error lines of the log.
func (d *daemonProc) logProblems(n int) string {
	b, _ := os.ReadFile(filepath.Join(d.dir, "daemon.log"))
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, `"level":"warn"`) || strings.Contains(line, `"level":"error"`) {
			out = append(out, line)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	if len(out) == 0 {
		return "(none)"
	}
	return strings.Join(out, "\n")
}

func (d *daemonProc) logTail(lines int) string {
	b, _ := os.ReadFile(filepath.Join(d.dir, "daemon.log"))
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// stop ends the daemon with SIGTERM (SIGKILL after 10 s), copies its log to
// keepLog (if set) and removes its directory.
func (d *daemonProc) stop(keepLog string) {
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
		<-d.exited
	}
	if keepLog != "" {
		if b, err := os.ReadFile(filepath.Join(d.dir, "daemon.log")); err == nil {
			_ = os.WriteFile(keepLog, b, 0o644)
		}
	}
	os.RemoveAll(d.dir)
}

// cpuTime is the CPU time (user + system, every thread, exited ones
// included) the daemon used so far, read from its process CPU-time clock
// (what clock_getcpuclockid(3) returns for another process): nanoseconds
// of the scheduler's accounting, where /proc/<pid>/stat truncates the same
// sum to 10 ms ticks.
func (d *daemonProc) cpuTime() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(processCPUClock(d.cmd.Process.Pid), &ts); err != nil {
		return 0, fmt.Errorf("reading the daemon's CPU clock: %w", err)
	}
	return time.Duration(ts.Nano()), nil
}

// processCPUClock is the clock id of pid's process CPU-time clock, as
// glibc's clock_getcpuclockid builds it: the negated pid shifted by 3, with
// CPUCLOCK_SCHED (2) and no per-thread bit.
func processCPUClock(pid int) int32 {
	const cpuClockSched = 2
	return int32(^pid)<<3 | cpuClockSched
}

// cpuTicks is the CPU time (user + system, all threads) the daemon used so
// far as /proc/<pid>/stat reports it: utime+stime in 10 ms ticks.
func (d *daemonProc) cpuTicks() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", d.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	s := string(b)
	end := strings.LastIndexByte(s, ')')
	if end < 0 {
		return 0, errors.New("parsing /proc/<pid>/stat: no command name")
	}
	f := strings.Fields(s[end+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, errors.New("parsing /proc/<pid>/stat: too few fields")
	}
	utime, err1 := strconv.ParseInt(f[14-3], 10, 64)
	stime, err2 := strconv.ParseInt(f[15-3], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("parsing /proc/<pid>/stat: %w", err)
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}

// memory returns the peak (VmHWM) and current (VmRSS) resident set in KiB.
func (d *daemonProc) memory() (peakKiB, nowKiB int, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmHWM:":
			peakKiB, _ = strconv.Atoi(f[1])
		case "VmRSS:":
			nowKiB, _ = strconv.Atoi(f[1])
		}
	}
	if peakKiB == 0 {
		return 0, 0, errors.New("no VmHWM in /proc/<pid>/status")
	}
	return peakKiB, nowKiB, nil
}
