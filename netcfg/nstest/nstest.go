// Package nstest builds throwaway network namespaces for tests that talk to the
// real kernel. Fake ENIs are veth pairs: dummy links are not available on every
// machine we test on, and a veth peer can also carry real packets.
package nstest

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/dualhomed/dualhomed/netcfg/nsthread"
)

// RequireRoot skips the test with a clear message unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create network namespaces (run `sudo make test`)")
	}
}

// NS is a fresh, empty network namespace that is removed when the test ends.
type NS struct {
	Handle netns.NsHandle
	NL     *netlink.Handle
}

// New creates an anonymous network namespace without moving the calling thread
// into it, and returns it with a netlink handle bound to it. Both are closed
// by t.Cleanup; the namespace disappears with its last reference.
func New(t testing.TB) *NS {
	t.Helper()
	RequireRoot(t)
	ns, err := newNamespace()
	if err != nil {
		t.Fatalf("creating network namespace: %v", err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		t.Fatalf("opening netlink handle in namespace: %v", err)
	}
	t.Cleanup(func() {
		h.Close()
		ns.Close()
	})
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("bringing up lo: %v", err)
	}
	return &NS{Handle: ns, NL: h}
}

// newNamespace creates an anonymous network namespace from a thread that
// nsthread returns to this one, so no goroutine ever runs in the wrong
// namespace. It lives as long as the handle (or a process in it).
func newNamespace() (netns.NsHandle, error) {
	self, err := netns.Get()
	if err != nil {
		return netns.None(), fmt.Errorf("getting current namespace: %w", err)
	}
	defer self.Close()
	ns := netns.None()
	err = nsthread.Do(self, func() (err error) {
		ns, err = netns.New()
		return err
	})
	if err != nil && ns.IsOpen() {
		ns.Close()
	}
	return ns, err
}

// Do runs fn on a thread inside the namespace (for sysctls under /proc/sys, or
// sockets that must be created inside it). The thread returns to its original
// namespace afterwards.
func (n *NS) Do(fn func() error) error { return nsthread.Do(n.Handle, fn) }

// Veth creates a veth pair whose end `name` (MAC mac, up) lives in n and whose
// peer (up) lives in peerNS (or in n when peerNS is nil). It returns the end in n.
// Use it as a fake ENI: the peer side plays the VPC router.
func (n *NS) Veth(t testing.TB, name, mac string, peerNS *NS, peerName string) netlink.Link {
	t.Helper()
	hw, err := net.ParseMAC(mac)
	if err != nil {
		t.Fatalf("parsing MAC %q: %v", mac, err)
	}
	link, err := n.VethPair(name, hw, peerNS, peerName, nil)
	if err != nil {
		t.Fatal(err)
	}
	return link
}

// VethPair is `ip link add <name> [address mac] type veth peer <peerName>
// [address peerMAC]` made directly inside n, the peer inside peerNS (n when
// nil), so that no link ever appears in the caller's namespace. Both ends
// are set up. It returns the end in n.
func (n *NS) VethPair(name string, mac net.HardwareAddr, peerNS *NS, peerName string, peerMAC net.HardwareAddr) (netlink.Link, error) {
	la := netlink.NewLinkAttrs()
	la.Name, la.HardwareAddr = name, mac
	veth := &netlink.Veth{LinkAttrs: la, PeerName: peerName, PeerHardwareAddr: peerMAC}
	if peerNS == nil {
		peerNS = n
	} else {
		veth.PeerNamespace = netlink.NsFd(peerNS.Handle)
	}
	if err := n.NL.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("adding veth %s (peer %s): %w", name, peerName, err)
	}
	var link netlink.Link
	for _, end := range []struct {
		ns   *NS
		name string
	}{{n, name}, {peerNS, peerName}} {
		l, err := end.ns.NL.LinkByName(end.name)
		if err == nil {
			err = end.ns.NL.LinkSetUp(l)
		}
		if err != nil {
			return nil, fmt.Errorf("setting veth %s up: %w", end.name, err)
		}
		if link == nil {
			link = l
		}
	}
	return link, nil
}

// Run runs a command (for example `ip -d rule show`) inside the namespace
// and returns its standard output. The test fails if the command fails.
func (n *NS) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := n.Output(name, args...)
	if err != nil {
		t.Fatalf("running %s %v in namespace: %v", name, args, err)
	}
	return out
}

// Output is Run without a test: it returns the command's standard output, or
// an error carrying its standard error. The command is forked by a thread
// inside the namespace, so it runs there from its start.
func (n *NS) Output(name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := n.Do(cmd.Run); err != nil {
		return "", fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Sysctl writes value to /proc/sys/<key> inside the namespace, key written
// with slashes (net/ipv6/conf/default/accept_dad).
func (n *NS) Sysctl(t testing.TB, key, value string) {
	t.Helper()
	if err := n.SetSysctl(key, value); err != nil {
		t.Fatal(err)
	}
}

// SetSysctl is Sysctl without a test.
func (n *NS) SetSysctl(key, value string) error {
	return n.Do(func() error {
		if err := os.WriteFile("/proc/sys/"+key, []byte(value), 0o644); err != nil {
			return fmt.Errorf("setting %s=%s: %w", key, value, err)
		}
		return nil
	})
}

// ReadSysctl reads /proc/sys/<key> inside the namespace.
func (n *NS) ReadSysctl(t testing.TB, key string) string {
	t.Helper()
	var v string
	err := n.Do(func() error {
		b, err := os.ReadFile("/proc/sys/" + key)
		v = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		t.Fatalf("reading %s: %v", key, err)
	}
	return v
}
