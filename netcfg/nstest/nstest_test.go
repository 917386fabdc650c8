package nstest

import (
	"os"
	"strings"
	"testing"
)

func TestNewNamespaceIsIsolated(t *testing.T) {
	a := New(t)
	b := New(t)
	link := a.Veth(t, "eth1", "02:00:00:00:00:01", b, "r1")
	if got := link.Attrs().HardwareAddr.String(); got != "02:00:00:00:00:01" {
		t.Fatalf("veth MAC = %s, want 02:00:00:00:00:01", got)
	}
	if _, err := b.NL.LinkByName("eth1"); err == nil {
		t.Fatal("eth1 visible in the peer namespace: namespaces are not isolated")
	}
	if _, err := b.NL.LinkByName("r1"); err != nil {
		t.Fatalf("peer r1 not in peer namespace: %v", err)
	}
	// /proc/sys/net shows the calling thread's namespace: only a thread inside
	// a sees eth1's sysctls.
	var inside bool
	if err := a.Do(func() error {
		_, err := os.Stat("/proc/sys/net/ipv4/conf/eth1")
		inside = err == nil
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if !inside {
		t.Fatal("Do did not run inside the namespace")
	}
}

func TestRunAndSysctlActInsideTheNamespace(t *testing.T) {
	a := New(t)
	a.Veth(t, "eth7", "02:00:00:00:00:07", nil, "peer7")
	if out := a.Run(t, "ip", "-o", "link", "show", "eth7"); !strings.Contains(out, "eth7@peer7") {
		t.Fatalf("ip link inside the namespace: %q", out)
	}
	if _, err := a.Output("ip", "link", "show", "no-such-link"); err == nil {
		t.Fatal("a failing command returned no error")
	}
	a.Sysctl(t, "net/ipv4/conf/eth7/rp_filter", "2")
	if got := a.ReadSysctl(t, "net/ipv4/conf/eth7/rp_filter"); got != "2" {
		t.Fatalf("rp_filter = %s, want 2", got)
	}
}
