package emulator_test

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// controller is what the control tests drive: both *emulator.Server (in
// process) and *emulator.ControlClient (over the control channel) satisfy it.
type controller interface {
	AttachENI(imds.ENI) error
	DetachENI(mac string) error
	UpdateENI(mac string, update func(*imds.ENI)) error
}

// exerciseControl drives ctl and checks the effect through IMDS itself.
func exerciseControl(t *testing.T, ctl controller, c *client, instance func() emulator.Instance) {
	t.Helper()
	const mac = "02:00:00:00:ee:01"
	if err := ctl.AttachENI(newENI(mac, 5, "192.0.2.20")); err != nil {
		t.Fatal(err)
	}
	if got := c.mustGet(macPath(mac, "device-number")); got != "5" {
		t.Errorf("attached ENI device-number = %q", got)
	}
	if err := ctl.AttachENI(newENI(mac, 5)); err == nil || !strings.Contains(err.Error(), "already attached") {
		t.Errorf("attaching twice: %v, want the emulator's error", err)
	}
	err := ctl.UpdateENI(mac, func(e *imds.ENI) {
		e.LocalIPv4s = append(e.LocalIPv4s, netip.MustParseAddr("192.0.2.21"))
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.mustGet(macPath(mac, "local-ipv4s")); got != "192.0.2.20\n192.0.2.21" {
		t.Errorf("after update local-ipv4s = %q", got)
	}
	if inst := instance(); len(inst.ENIs) != 3 || inst.ENIs[2].LocalIPv4s[1] != netip.MustParseAddr("192.0.2.21") {
		t.Errorf("Instance() = %+v", inst)
	}
	taken := instance().ENIs[0].MAC
	if err := ctl.UpdateENI(mac, func(e *imds.ENI) { e.MAC = taken }); err == nil {
		t.Error("renaming an ENI onto an attached MAC succeeded")
	}
	if err := ctl.DetachENI(mac); err != nil {
		t.Fatal(err)
	}
	if status, _ := c.get(macPath(mac, "device-number")); status != 404 {
		t.Errorf("detached ENI's key: status %d, want 404", status)
	}
	if err := ctl.DetachENI(mac); err == nil {
		t.Error("detaching twice succeeded")
	}
}

func TestControlInProcess(t *testing.T) {
	srv, c := start(t, emulator.ExampleInstance(2, 1, 0, 0, 1))
	addr, err := srv.StartControl("unix:" + filepath.Join(t.TempDir(), "ctl.sock"))
	if err != nil {
		t.Fatal(err)
	}
	ctl := emulator.DialControl(addr)
	defer ctl.Close()
	if err := ctl.Ping(); err != nil {
		t.Fatal(err)
	}
	mustInstance := func() emulator.Instance {
		inst, err := ctl.Instance()
		if err != nil {
			t.Fatal(err)
		}
		return inst
	}
	exerciseControl(t, ctl, c, mustInstance)

	// The same checks against the Server directly keep both APIs in step.
	srv2, c2 := start(t, emulator.ExampleInstance(2, 1, 0, 0, 1))
	exerciseControl(t, srv2, c2, srv2.Instance)

	inst := emulator.ExampleInstance(4, 2, 2, 1, 2)
	if err := ctl.SetInstance(inst); err != nil {
		t.Fatal(err)
	}
	if back := mustInstance(); len(back.ENIs) != 4 || back.ENIs[3].IPv6Prefixes[0] != inst.ENIs[3].IPv6Prefixes[0] || !back.MultiCard {
		t.Errorf("SetInstance/Instance round trip lost data: %+v", back)
	}
	inst.ENIs[1].MAC = inst.ENIs[0].MAC
	if err := ctl.SetInstance(inst); err == nil || !strings.Contains(err.Error(), "duplicate MAC") {
		t.Errorf("SetInstance with duplicate MACs: %v, want the emulator's error", err)
	}
}

func TestControlTCPAndBadRequests(t *testing.T) {
	srv, _ := start(t, emulator.ExampleInstance(1, 1, 0, 0, 1))
	addr, err := srv.StartControl("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.StartControl("127.0.0.1:0"); err == nil {
		t.Error("second StartControl succeeded")
	}
	for _, tc := range []struct {
		method, path, body string
		status             int
	}{
		{http.MethodPut, "/instance", `not json`, 400},
		{http.MethodPut, "/instance", `{"Bogus":1}`, 400},
		{http.MethodPut, "/instance", `{"ENIs":[{"MAC":""}]}`, 400},
		{http.MethodPost, "/instance", `{}`, 405},
		{http.MethodGet, "/v1/Stats", ``, 404},
	} {
		req, _ := http.NewRequest(tc.method, "http://"+addr+tc.path, strings.NewReader(tc.body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Errorf("%s %s %s: %s, want %d", tc.method, tc.path, tc.body, resp.Status, tc.status)
		}
	}
	if len(srv.Instance().ENIs) != 1 {
		t.Errorf("a rejected PUT changed the instance: %+v", srv.Instance())
	}
	if err := emulator.DialControl("unix:" + filepath.Join(t.TempDir(), "none.sock")).Ping(); err == nil {
		t.Error("Ping to nothing succeeded")
	}
}

// TestProcess builds cmd/imds-emulator, runs it, drives it through the
// control channel and stops it with SIGTERM.
func TestProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the emulator process")
	}
	dir := t.TempDir()
	bin := buildEmulator(t)

	instFile := filepath.Join(dir, "inst.json")
	data := `{
  "InstanceID": "i-0fedcba9876543210",
  "PrimaryMAC": "02:00:00:00:00:0a",
  "ENIs": [
    {"MAC": "02:00:00:00:00:0a", "DeviceNumber": 0, "LocalIPv4s": ["192.0.2.10"], "VPCIPv4CIDRs": ["192.0.2.0/24"]},
    {"MAC": "02:00:00:00:00:0b", "DeviceNumber": 1, "IPv6s": ["2001:db8::b"], "SubnetIPv4CIDR": ""}
  ]
}`
	if err := os.WriteFile(instFile, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "ctl.sock")
	cmd := exec.Command(bin, "--listen", "127.0.0.1:0", "--control", "unix:"+sock, "--instance", instFile)
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
	var base, ctlAddr string
	_, err = fmt.Fscanf(stdout, "ready listen=%s control=%s\n", &base, &ctlAddr)
	go func() { io.Copy(io.Discard, stdout); exited <- cmd.Wait() }()
	if err != nil {
		t.Fatalf("reading the ready line: %v", err)
	}
	if ctlAddr != "unix:"+sock {
		t.Errorf("control address %q, want unix:%s", ctlAddr, sock)
	}

	c := &client{t: t, base: base}
	c.token = c.newToken()
	if got := c.mustGet("/latest/meta-data/instance-id"); got != "i-0fedcba9876543210" {
		t.Errorf("instance-id from --instance = %q", got)
	}
	if got := c.mustGet(macPath("02:00:00:00:00:0b", "ipv6s")); got != "2001:db8::b" {
		t.Errorf("ipv6s from --instance = %q", got)
	}

	ctl := emulator.DialControl(ctlAddr)
	defer ctl.Close()
	exerciseControl(t, ctl, c, func() emulator.Instance {
		inst, err := ctl.Instance()
		if err != nil {
			t.Fatal(err)
		}
		return inst
	})

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
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("control socket left behind: %v", err)
	}
}

func TestProcessBadInstance(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the emulator process")
	}
	dir := t.TempDir()
	bin := buildEmulator(t)
	instFile := filepath.Join(dir, "bad.json")
	os.WriteFile(instFile, []byte("{\n  \"PrimaryMAC\": \"x\",\n  \"ENIs\": [{\"MAC\": \"m\", \"LocalIPv4s\": [\"10.0.0.300\"]}]\n}\n"), 0o644)
	for _, args := range [][]string{
		{"--instance", instFile},
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
		if args[0] == "--instance" && !strings.Contains(string(out), "bad.json:3:") {
			t.Errorf("bad instance error does not name file:line: %s", out)
		}
	}
}
