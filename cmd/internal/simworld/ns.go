package simworld

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// NS is a named network namespace (/run/netns/<Name>), so that `ip -n <Name>`
// and `ip netns exec <Name>` work on it, with a netlink handle bound to it
// and nstest's helpers (Do, VethPair, SetSysctl).
type NS struct {
	Name string
	nstest.NS
}

// newNS is `ip netns add <name>` followed by `ip link set lo up` inside it.
// The IPv6 defaults are set before any link exists: no duplicate address
// detection (addresses are usable at once), and no router advertisements
// (nothing in the world sends them; a real VPC's routes come from DHCP).
func newNS(name string) (*NS, error) {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("adding namespace %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	h, err := netns.GetFromName(name)
	if err != nil {
		deleteNamedNS(name)
		return nil, fmt.Errorf("opening namespace %s: %w", name, err)
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		h.Close()
		deleteNamedNS(name)
		return nil, fmt.Errorf("opening netlink handle in %s: %w", name, err)
	}
	n := &NS{Name: name, NS: nstest.NS{Handle: h, NL: nl}}
	lo, err := nl.LinkByName("lo")
	if err == nil {
		err = nl.LinkSetUp(lo)
	}
	if err != nil {
		n.close()
		return nil, fmt.Errorf("bringing up lo in %s: %w", name, err)
	}
	for _, s := range [][2]string{
		{"net/ipv6/conf/all/accept_dad", "0"},
		{"net/ipv6/conf/default/accept_dad", "0"},
		{"net/ipv6/conf/all/accept_ra", "0"},
		{"net/ipv6/conf/default/accept_ra", "0"},
		// Deterministic: a new namespace inherits these from the host.
		{"net/ipv4/conf/all/rp_filter", "0"},
		{"net/ipv4/conf/default/rp_filter", "0"},
		{"net/ipv4/ip_forward", "0"},
		{"net/ipv6/conf/all/forwarding", "0"},
	} {
		if err := n.SetSysctl(s[0], s[1]); err != nil {
			n.close()
			return nil, err
		}
	}
	return n, nil
}

// close releases the handles and removes the namespace after killing every
// process still running in it (a process would keep it, and its links, alive).
func (n *NS) close() error {
	n.NL.Close()
	n.Handle.Close()
	killNSProcesses(n.Name)
	return deleteNamedNS(n.Name)
}

func deleteNamedNS(name string) error {
	if out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput(); err != nil {
		if _, statErr := os.Stat(filepath.Join("/run/netns", name)); os.IsNotExist(statErr) {
			return nil
		}
		return fmt.Errorf("deleting namespace %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// killNSProcesses SIGKILLs every process in the namespace (`ip netns pids`).
func killNSProcesses(name string) {
	out, err := exec.Command("ip", "netns", "pids", name).Output()
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// DialContext dials from inside the namespace, for an http.Transport that
// reaches a server listening there (the IMDS emulator on its loopback).
func (n *NS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// childAttrs makes the kernel kill a child when this process dies, so that a
// crashed test run never leaves a daemon behind; and puts it in its own
// process group, so that a Ctrl-C on the terminal reaches only us and the
// teardown stops the children in order.
func childAttrs() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}

// Command is `ip netns exec <Name> <name> <args...>`: the program runs in the
// namespace (ip execs it, so the pid is the program's own).
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
	cmd.SysProcAttr = childAttrs()
	return cmd
}

// IP runs `ip -n <Name> <args...>` and returns its standard output.
func (n *NS) IP(args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"-n", n.Name}, args...)...).Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = strings.TrimSpace(string(ee.Stderr))
		}
		return string(out), fmt.Errorf("running ip -n %s %s: %v: %s", n.Name, strings.Join(args, " "), err, stderr)
	}
	return string(out), nil
}
