package emulator_test

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// The model changes of a running Server show in what it serves, and the
// changes IMDS could never make are refused.
func TestAttachUpdateDetachServed(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(2, 1, 0, 0, 1))
	const mac = "02:00:00:00:ee:01"
	if err := srv.AttachENI(newENI(mac, 5, "192.0.2.20")); err != nil {
		t.Fatal(err)
	}
	if got := c.mustGet(macPath(mac, "device-number")); got != "5" {
		t.Errorf("attached ENI device-number = %q", got)
	}
	if err := srv.AttachENI(newENI(mac, 5)); err == nil || !strings.Contains(err.Error(), "already attached") {
		t.Errorf("attaching twice: %v, want the emulator's error", err)
	}
	err := srv.UpdateENI(mac, func(e *imds.ENI) {
		e.LocalIPv4s = append(e.LocalIPv4s, netip.MustParseAddr("192.0.2.21"))
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.mustGet(macPath(mac, "local-ipv4s")); got != "192.0.2.20\n192.0.2.21" {
		t.Errorf("after update local-ipv4s = %q", got)
	}
	if inst := srv.Instance(); len(inst.ENIs) != 3 || inst.ENIs[2].LocalIPv4s[1] != netip.MustParseAddr("192.0.2.21") {
		t.Errorf("Instance() = %+v", inst)
	}
	taken := srv.Instance().ENIs[0].MAC
	if err := srv.UpdateENI(mac, func(e *imds.ENI) { e.MAC = taken }); err == nil {
		t.Error("renaming an ENI onto an attached MAC succeeded")
	}
	if err := srv.DetachENI(mac); err != nil {
		t.Fatal(err)
	}
	if status, _ := c.get(macPath(mac, "device-number")); status != 404 {
		t.Errorf("detached ENI's key: status %d, want 404", status)
	}
	if err := srv.DetachENI(mac); err == nil {
		t.Error("detaching twice succeeded")
	}
}

// TestProcess builds cmd/imds-emulator, runs it, reads the instance it
// serves and stops it with SIGTERM.
func TestProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the emulator process")
	}
	bin := buildEmulator(t)
	cmd := exec.Command(bin, "--listen", "127.0.0.1:0", "--example", "2,1,1,0,1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	var base string
	_, err = fmt.Fscanf(stdout, "ready listen=%s\n", &base)
	go func() { io.Copy(io.Discard, stdout); exited <- cmd.Wait() }()
	if err != nil {
		t.Fatalf("reading the ready line: %v", err)
	}

	c := &client{t: t, base: base}
	c.token = c.newToken()
	if got := c.mustGet("/latest/meta-data/instance-id"); got != "i-0123456789abcdef0" {
		t.Errorf("instance-id from --example = %q", got)
	}
	if got := c.mustGet(macPath(emulator.ExampleMAC(0, 1), "ipv6s")); got != "2001:db8:0:100::1000" {
		t.Errorf("ipv6s from --example = %q", got)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Errorf("exit after SIGTERM: %v, want status 0", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("emulator did not exit after SIGTERM")
	}
}

func TestProcessBadInstance(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the emulator process")
	}
	bin := buildEmulator(t)
	for _, args := range [][]string{
		{"--example", "1,2,x"},
		{"--example", "1,2,0,0,-1"},
		{"extra-arg"},
		{"--no-such-flag"},
	} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		var ee *exec.ExitError
		if !errorsAs(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("%v: %v, want exit status 2\n%s", args, err, out)
		}
	}
}
