package simworld

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proc is a program running inside a namespace of the world, its output in
// a log file under the world's directory.
type Proc struct {
	Name    string
	LogPath string
	cmd     *exec.Cmd
	done    chan struct{}
	mu      sync.Mutex
	waitErr error
}

// start runs `ip netns exec <ns> <bin> <args>` with output to Dir/<name>.log
// (appended, so restarts of the same program share one log).
func (w *World) start(ns *NS, name, bin string, args ...string) (*Proc, error) {
	logPath := filepath.Join(w.Dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening log for %s: %w", name, err)
	}
	fmt.Fprintf(f, "=== %s: %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	cmd := ns.Command(context.Background(), bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s in %s: %w", name, ns.Name, err)
	}
	p := &Proc{Name: name, LogPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.waitErr = err
		p.mu.Unlock()
		close(p.done)
	}()
	w.mu.Lock()
	w.procs = append(w.procs, p)
	w.mu.Unlock()
	w.logf("started %s (pid %d) in %s", name, cmd.Process.Pid, ns.Name)
	return p, nil
}

// Pid is the program's process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Exited reports whether the program has ended, and how.
func (p *Proc) Exited() (bool, error) {
	select {
	case <-p.done:
		p.mu.Lock()
		defer p.mu.Unlock()
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
