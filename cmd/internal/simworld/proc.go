package simworld

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Proc is a program running inside a namespace of the world, its output in
// a log file under the world's directory.
type Proc struct {
	Name    string
	LogPath string
	cmd     *exec.Cmd
	logFrom int           // where this run's output starts in the log
	done    chan struct{} // closed once waitErr is set: the close orders the write before every read
	waitErr error
}

// start runs bin inside ns with output to Dir/<name>.log (appended, so
// restarts of the same program share one log). It is forked from a thread
// inside ns rather than through `ip netns exec`, whose own start would add
// about 6 ms to every timed start (100 starts of true(1): 1.12 s against
// 0.51 s). NOTIFY_SOCKET is cleared: a world's daemon never talks to the
// host's systemd.
func (w *World) start(ns *NS, name, bin string, args ...string) (*Proc, error) {
	logPath := filepath.Join(w.Dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening log for %s: %w", name, err)
	}
	fmt.Fprintf(f, "=== %s: %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	logFrom, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("opening log for %s: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = childAttrs()
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET=")
	cmd.Stdout, cmd.Stderr = f, f
	if err := ns.Do(cmd.Start); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s in %s: %w", name, ns.Name, err)
	}
	p := &Proc{Name: name, LogPath: logPath, cmd: cmd, logFrom: int(logFrom), done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		f.Close()
		p.waitErr = err
		close(p.done)
	}()
	w.mu.Lock()
	w.procs = append(w.procs, p)
	w.mu.Unlock()
	return p, nil
}

// Pid is the program's process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Exited reports whether the program has ended, and how.
func (p *Proc) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.waitErr
	default:
		return false, nil
	}
}

// Stop sends SIGTERM and waits for the program to end (SIGKILL after timeout).
// It returns the program's exit error (nil for a clean exit).
func (p *Proc) Stop(timeout time.Duration) error {
	if done, err := p.Exited(); done {
		return err
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("%s did not stop within %s of SIGTERM", p.Name, timeout)
	}
	_, err := p.Exited()
	return err
}

// Kill ends the program at once and waits for it.
func (p *Proc) Kill() {
	if done, _ := p.Exited(); done {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// Log returns what the program wrote so far.
func (p *Proc) Log() string {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// ErrExited is returned by waits that end because the program died.
var ErrExited = errors.New("program exited")

// WaitLog waits until this run of the program has logged s, or fails when
// the program exits or ctx ends.
func (p *Proc) WaitLog(ctx context.Context, s string) error {
	return WaitFor(ctx, func() error {
		if log := p.Log(); len(log) >= p.logFrom && strings.Contains(log[p.logFrom:], s) {
			return nil
		}
		if done, err := p.Exited(); done {
			return fmt.Errorf("%w (%v) before logging %q", ErrExited, err, s)
		}
		return fmt.Errorf("%s has not logged %q", p.Name, s)
	})
}

// CPUTime is the CPU time (user and system, every thread, exited ones
// included) the program used so far, from its process CPU-time clock (the
// clock clock_getcpuclockid(3) names): the scheduler's nanoseconds, where
// /proc/<pid>/stat rounds the same sum to 10 ms ticks (CPUTicks).
func (p *Proc) CPUTime() (time.Duration, error) {
	// glibc's clock id for a process: the negated pid shifted by 3, with
	// CPUCLOCK_SCHED (2) and no per-thread bit.
	const cpuClockSched = 2
	var ts unix.Timespec
	if err := unix.ClockGettime(int32(^p.Pid())<<3|cpuClockSched, &ts); err != nil {
		return 0, fmt.Errorf("reading the CPU clock of %s: %w", p.Name, err)
	}
	return time.Duration(ts.Nano()), nil
}

// CPUTicks is utime+stime of /proc/<pid>/stat: the program's CPU time in
// ticks of USER_HZ, which is 100 on every Linux architecture Go supports.
func (p *Proc) CPUTicks() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Pid()))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("parsing /proc/%d/stat: %q", p.Pid(), b)
	}
	utime, err1 := strconv.ParseInt(f[14-3], 10, 64) // f[0] is field 3, the state
	stime, err2 := strconv.ParseInt(f[15-3], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("parsing /proc/%d/stat: %w", p.Pid(), err)
	}
	return time.Duration(utime+stime) * time.Second / 100, nil
}

// Memory returns the program's peak (VmHWM) and current (VmRSS) resident
// set size, in KiB.
func (p *Proc) Memory() (peakKiB, nowKiB int, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Pid()))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		switch k {
		case "VmHWM":
			peakKiB = n
		case "VmRSS":
			nowKiB = n
		}
	}
	if peakKiB == 0 {
		return 0, 0, fmt.Errorf("no VmHWM in /proc/%d/status", p.Pid())
	}
	return peakKiB, nowKiB, nil
}
