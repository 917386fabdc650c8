package e2e

import (
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
	"github.com/dualhomed/dualhomed/imds"
)

// The world is fair: the textbook source routing, typed by hand with ip(8),
// makes every client work. So a failing scenario with dualhomed running is
// dualhomed's fault, not the world's.
func TestWorldIsSolvableByHand(t *testing.T) {
	w := newWorld(t)
	for _, cmd := range [][]string{
		{"route", "add", "default", "via", "10.1.1.1", "dev", "eth1", "table", "101"},
		{"-6", "route", "add", "default", "via", "fe80:ec2::1", "dev", "eth1", "table", "101"},
		{"rule", "add", "from", "10.1.1.10", "lookup", "101", "priority", "101"},
		{"-6", "rule", "add", "from", "fd00:b:0:1::10", "lookup", "101", "priority", "101"},
		{"route", "add", "default", "via", "10.0.2.1", "dev", "eth2", "table", "102"},
		{"rule", "add", "from", "10.0.2.10", "lookup", "102", "priority", "102"},
		{"link", "set", "eth1", "up"},
	} {
		if _, err := w.Instance.IP(cmd...); err != nil {
			t.Fatal(err)
		}
	}
	for _, l := range []string{"eth1", "eth2"} {
		if err := w.Instance.SetSysctl("net/ipv4/conf/"+l+"/rp_filter", "2"); err != nil {
			t.Fatal(err)
		}
	}
	ps := clientProbes(w, "eth0", "eth1", "eth2")
	results := runAll(ps, 2*time.Second)
	for _, p := range ps {
		if errs := results[p.name]; errs[0] != nil || errs[1] != nil {
			t.Errorf("%s: ping: %v, tcp: %v", p, errs[0], errs[1])
		}
	}
}

// The emulator inside the instance describes the world: every ENI IMDS lists
// has a link with its MAC in the instance, with IMDS's primary IP on it.
func TestEmulatorDescribesTheWorld(t *testing.T) {
	w := newWorld(t)
	if err := w.StartIMDS(); err != nil {
		t.Fatal(err)
	}
	// Dial from inside the instance: the emulator listens on its loopback.
	tr := &http.Transport{DialContext: w.Instance.DialContext}
	defer tr.CloseIdleConnections()
	cl, err := imds.New(imds.Options{Endpoint: simworld.IMDSEndpoint, Transport: tr, MaxRequestsPerSecond: -1})
	if err != nil {
		t.Fatal(err)
	}
	snap, err := cl.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if snap.PrimaryMAC != w.ENI("eth0").MAC || len(snap.ENIs) != 3 {
		t.Fatalf("snapshot: primary %s, %d ENIs; want %s and 3", snap.PrimaryMAC, len(snap.ENIs), w.ENI("eth0").MAC)
	}
	for _, l := range []string{"eth0", "eth1", "eth2"} {
		e := w.ENI(l)
		got, ok := snap.ENI(e.MAC)
		if !ok || !got.Ready || got.DeviceNumber != e.Device || got.LocalIPv4s[0] != e.Primary4() {
			t.Errorf("%s: IMDS says %+v", l, got)
		}
		link, err := w.Instance.NL.LinkByName(l)
		if err != nil || link.Attrs().HardwareAddr.String() != e.MAC {
			t.Errorf("%s: link %v, err %v; want MAC %s", l, link, err, e.MAC)
		}
	}
}

// Tearing a world down leaves nothing: no namespace, no process, no link in
// the host; and the sweeper removes what a crashed run left behind.
func TestTeardownLeavesNothing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create network namespaces (run `sudo make test`)")
	}
	needBinaries(t)
	hostLinks := func() []string {
		out, err := exec.Command("ip", "-o", "link", "show").Output()
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			names = append(names, strings.Fields(l)[1])
		}
		return names
	}
	linksBefore := hostLinks()
	w, err := simworld.New(simworld.Options{DualhomedBin: dualhomedBin})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.StartIMDS(); err != nil {
		w.Close()
		t.Fatal(err)
	}
	_, err = w.StartDaemon(simworld.DaemonOptions{PollInterval: time.Second})
	if err != nil {
		w.Close()
		t.Fatal(err)
	}
	names, dir := w.Namespaces(), w.Dir
	var pids []int
	for _, p := range w.Procs() {
		pids = append(pids, p.Pid())
	}
	if err := w.Close(); err != nil {
		t.Errorf("closing: %v", err)
	}
	for _, n := range names {
		if _, err := os.Stat(filepath.Join("/run/netns", n)); err == nil {
			t.Errorf("namespace %s left behind", n)
		}
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); err == nil {
			t.Errorf("process %d left running", pid)
		}
	}
	if _, err := os.Stat(dir); err == nil {
		t.Errorf("directory %s left behind", dir)
	}
	// Only links with the world's names count: other tests may run meanwhile.
	for _, l := range hostLinks() {
		name := strings.TrimSuffix(strings.SplitN(l, "@", 2)[0], ":")
		if !slices.Contains(linksBefore, l) && (strings.HasPrefix(name, "eni") || strings.HasPrefix(name, "eth") || name == "cli") {
			t.Errorf("link %s appeared in the host", l)
		}
	}

	// A leftover of a crashed run: its pid (beyond pid_max) cannot be alive.
	leftover := "dh99999999w1-inst"
	if out, err := exec.Command("ip", "netns", "add", leftover).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "delete", leftover).Run() })
	removed, err := simworld.Sweep()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(removed, leftover) {
		t.Errorf("sweep removed %v, want %s among them", removed, leftover)
	}
	if _, err := os.Stat(filepath.Join("/run/netns", leftover)); err == nil {
		t.Errorf("sweep left %s", leftover)
	}
}
