package matrix

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// container is one configuration's Debian root, booted with systemd as PID 1
// by systemd-nspawn inside the world's container namespace.
//
// The root is an overlay of the cached root (read-only, shared by every
// configuration) and a per-configuration upper directory on disk. That is
// what --volatile=overlay does with a tmpfs; the harness mounts the overlay
// itself so that the upper directory survives a power-off: the reboot step
// boots the same root again, with what the previous boot wrote to /etc and
// /var (dualhomed's installation, cloud-init's instance state), as an EC2
// reboot does. The cached root is never written.
type container struct {
	name   string
	dir    string // upper, work and the merged root live here
	root   string // the merged root
	w      *world
	boots  int
	mu     sync.Mutex
	nspawn *exec.Cmd
	done   chan struct{}
	leader int
}

func newContainer(name, dir, lower string, w *world) (*container, error) {
	c := &container{name: name, dir: dir, root: filepath.Join(dir, "root"), w: w}
	for _, d := range []string{"upper", "work", "root"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, filepath.Join(dir, "upper"), filepath.Join(dir, "work"))
	if out, err := exec.Command("mount", "-t", "overlay", "overlay", "-o", opts, c.root).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("mounting the overlay root: %v: %s", err, out)
	}
	registerContainer(c)
	return c, nil
}

// boot starts systemd in the container and waits until the boot is done
// (`systemctl is-system-running --wait`), or fails after timeout.
func (c *container) boot(ctx context.Context, timeout time.Duration) error {
	c.boots++
	logPath := filepath.Join(c.dir, fmt.Sprintf("console-%d.log", c.boots))
	f, err := os.Create(logPath)
	if err != nil {
		return err
	}
	// nspawn runs inside the container's network namespace (nsenter --net,
	// which leaves the mount namespace alone) and shares it with the
	// container. --network-namespace-path= would join the same namespace,
	// but nspawn mounts the container's /sys before it joins: /sys/class/net
	// would list the host's links, and everything that reads it (cloud-init's
	// NIC discovery, ec2-net-utils' setup-policy-routes) would wait for or
	// configure links that are not there. CAP_NET_ADMIN is granted only with
	// --private-network, which makes a namespace of its own.
	cmd := exec.Command("nsenter", "--net=/run/netns/"+c.w.inst.Name, "--",
		"systemd-nspawn", "-q", "--register=no", "--keep-unit",
		"--capability=CAP_NET_ADMIN",
		// No copy of the host's resolv.conf: its servers are outside the
		// matrix's namespaces (cloud-init waits 15 s on them per lookup).
		"--resolv-conf=off",
		"--machine="+c.name, "-D", c.root, "-b")
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("starting systemd-nspawn: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); f.Close(); close(done) }()
	c.mu.Lock()
	c.nspawn, c.done, c.leader = cmd, done, 0
	c.mu.Unlock()
	// The container's PID 1 is the child of nspawn that has become systemd.
	deadline := time.Now().Add(30 * time.Second)
	for c.leader == 0 {
		out, _ := exec.Command("pgrep", "-P", strconv.Itoa(cmd.Process.Pid)).Output()
		for _, p := range strings.Fields(string(out)) {
			if comm, _ := os.ReadFile("/proc/" + p + "/comm"); strings.TrimSpace(string(comm)) == "systemd" {
				pid, _ := strconv.Atoi(p)
				c.mu.Lock()
				c.leader = pid
				c.mu.Unlock()
			}
		}
		select {
		case <-done:
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("systemd-nspawn exited during boot:\n%s", tail(string(b), 20))
		default:
		}
		if time.Now().After(deadline) {
			return errors.New("no systemd in the container after 30 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// systemctl answers once systemd has set up its private socket (until
	// then it fails to connect) and /run/systemd/system (until then it
	// says "offline").
	var out string
	for {
		out, err = c.exec(ctx, timeout, "systemctl", "is-system-running", "--wait")
		if !strings.Contains(out, "Failed to connect") && strings.TrimSpace(out) != "offline" || time.Now().After(deadline.Add(timeout)) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	state := strings.TrimSpace(out)
	if state != "running" && state != "degraded" {
		jobs, _ := c.exec(ctx, 10*time.Second, "systemctl", "list-jobs", "--no-pager")
		return fmt.Errorf("boot did not finish: is-system-running says %q (%v); jobs:\n%s", state, err, jobs)
	}
	// Without --private-network nspawn leaves /proc/sys read-only: only
	// units with ReadWritePaths=/proc/sys/net (dualhomed's) could write a
	// sysctl, and the package's `dualhomed cleanup`, run by apt, could not
	// restore rp_filter. Root on an instance can: make /proc/sys/net
	// writable, as nspawn does for a container with a network of its own.
	c.mu.Lock()
	leader := c.leader
	c.mu.Unlock()
	if b, err := exec.CommandContext(ctx, "nsenter", "-t", strconv.Itoa(leader), "-m", "--",
		"sh", "-c", "mount --bind /proc/sys/net /proc/sys/net && mount -o remount,bind,rw /proc/sys/net").CombinedOutput(); err != nil {
		return fmt.Errorf("making /proc/sys/net writable in the container: %w: %s", err, b)
	}
	return nil
}

// exec runs a command inside the container (all its namespaces) and returns
// its combined output.
func (c *container) exec(ctx context.Context, timeout time.Duration, args ...string) (string, error) {
	c.mu.Lock()
	leader := c.leader
	c.mu.Unlock()
	if leader == 0 {
		return "", errors.New("the container is not running")
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(leader), "-a", "--", "env",
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// nsenter forks to enter the PID namespace: on timeout, kill its whole
	// process group (the command inside included), and stop waiting for
	// output that something the command started may still hold.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, tail(out.String(), 10))
	}
	return out.String(), nil
}

// sh runs a shell command line inside the container.
func (c *container) sh(ctx context.Context, timeout time.Duration, script string) (string, error) {
	return c.exec(ctx, timeout, "sh", "-c", script)
}

// poweroff shuts the container down cleanly and waits for nspawn to exit
// (it kills the container after timeout).
func (c *container) poweroff(ctx context.Context, timeout time.Duration) error {
	c.mu.Lock()
	done, leader := c.done, c.leader
	c.mu.Unlock()
	if done == nil {
		return nil
	}
	_, _ = c.exec(ctx, 10*time.Second, "systemctl", "poweroff", "--no-block")
	var err error
	select {
	case <-done:
	case <-time.After(timeout):
		err = fmt.Errorf("the container did not power off within %s; killed", timeout)
		_ = syscall.Kill(leader, syscall.SIGKILL)
		<-done
	}
	c.mu.Lock()
	c.leader, c.done, c.nspawn = 0, nil, nil
	c.mu.Unlock()
	return err
}

// kill ends the container at once (SIGKILL to its PID 1 ends the whole PID
// namespace) and unmounts its root.
func (c *container) kill() {
	c.mu.Lock()
	leader, done, nspawn := c.leader, c.done, c.nspawn
	c.mu.Unlock()
	if leader != 0 {
		_ = syscall.Kill(leader, syscall.SIGKILL)
	}
	if nspawn != nil && nspawn.Process != nil {
		_ = syscall.Kill(-nspawn.Process.Pid, syscall.SIGKILL)
	}
	if done != nil {
		select {
		case <-done:
		case <-time.After(10 * time.Second):
		}
	}
	_ = exec.Command("umount", "-l", c.root).Run()
	unregisterContainer(c)
}

// journalEntry is one record of `journalctl -o json`.
type journalEntry struct {
	Monotonic string `json:"__MONOTONIC_TIMESTAMP"`
	Unit      string `json:"_SYSTEMD_UNIT"`
	Ident     string `json:"SYSLOG_IDENTIFIER"`
	Message   any    `json:"MESSAGE"` // a string, or bytes for non-UTF-8
	JobUnit   string `json:"UNIT"`
	JobType   string `json:"JOB_TYPE"`
}

func (e journalEntry) msg() string {
	if s, ok := e.Message.(string); ok {
		return s
	}
	return fmt.Sprint(e.Message)
}

func (e journalEntry) mono() int64 { v, _ := strconv.ParseInt(e.Monotonic, 10, 64); return v }

// journal reads this boot's journal, optionally since a wall-clock time.
func (c *container) journal(ctx context.Context, since time.Time, args ...string) ([]journalEntry, error) {
	a := []string{"journalctl", "-b", "-o", "json", "--no-pager"}
	if !since.IsZero() {
		a = append(a, "--since=@"+strconv.FormatFloat(float64(since.UnixMicro())/1e6, 'f', 6, 64))
	}
	out, err := c.exec(ctx, 30*time.Second, append(a, args...)...)
	if err != nil {
		return nil, err
	}
	var es []journalEntry
	for _, line := range strings.Split(out, "\n") {
		if line = strings.TrimSpace(line); line == "" || line[0] != '{' {
			continue
		}
		var e journalEntry
		if err := json.Unmarshal([]byte(line), &e); err == nil {
			es = append(es, e)
		}
	}
	return es, nil
}

// The running containers, for the signal handler.
var (
	ctrMu sync.Mutex
	ctrs  = map[*container]bool{}
)

func registerContainer(c *container) {
	ctrMu.Lock()
	ctrs[c] = true
	ctrMu.Unlock()
}

func unregisterContainer(c *container) {
	ctrMu.Lock()
	delete(ctrs, c)
	ctrMu.Unlock()
}

func killAllContainers() {
	ctrMu.Lock()
	var cs []*container
	for c := range ctrs {
		cs = append(cs, c)
	}
	ctrMu.Unlock()
	for _, c := range cs {
		c.kill()
	}
}

func tail(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}
