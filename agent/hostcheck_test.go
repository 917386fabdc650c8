package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/netcfg/nstest"
	"github.com/vishvananda/netns"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// systemd-networkd counts only when it runs in the managed namespace, and
// then with the settings its configuration files give it.
func TestHostWarnings(t *testing.T) {
	dir := t.TempDir()
	var ns os.FileInfo // no namespace yet: nothing matches
	keys := func() []string {
		var out []string
		for _, w := range hostWarnings(dir, ns) {
			for _, k := range []string{"ManageForeignRoutingPolicyRules", "ManageForeignRoutes"} {
				if strings.Contains(w.Message, k+"=no") {
					out = append(out, k)
				}
			}
		}
		return out
	}

	if got := keys(); len(got) != 0 {
		t.Fatalf("networkd not running, yet warnings for %v", got)
	}
	// A networkd in another network namespace (the host's, while dualhomed
	// manages a namespace of its own) never touches ours.
	writeFile(t, filepath.Join(dir, "proc/411/comm"), "systemd-network\n")
	writeFile(t, filepath.Join(dir, "proc/411/ns/net"), "the host's namespace")
	if got := keys(); len(got) != 0 {
		t.Fatalf("networkd in another namespace: warnings for %v", got)
	}
	writeFile(t, filepath.Join(dir, "proc/412/comm"), "systemd-network\n") // the kernel cuts comm to 15 bytes
	writeFile(t, filepath.Join(dir, "proc/412/ns/net"), "our namespace")
	writeFile(t, filepath.Join(dir, "proc/413/comm"), "bash\n")
	id, err := os.Stat(filepath.Join(dir, "proc/412/ns/net"))
	if err != nil {
		t.Fatal(err)
	}
	ns = id
	if got := keys(); !slices.Equal(got, []string{"ManageForeignRoutingPolicyRules", "ManageForeignRoutes"}) {
		t.Fatalf("networkd running with defaults: warnings for %v", got)
	}

	writeFile(t, filepath.Join(dir, "etc/systemd/networkd.conf"), "[Network]\n#ManageForeignRoutes=no\nManageForeignRoutingPolicyRules=no\n[DHCPv4]\nManageForeignRoutes=no\n")
	if got := keys(); !slices.Equal(got, []string{"ManageForeignRoutes"}) {
		t.Errorf("rules off in networkd.conf: warnings for %v", got)
	}
	// A vendor drop-in turns rules back on; the admin's drop-in of the same
	// name in /etc hides it, and a later-sorting one turns routes off.
	writeFile(t, filepath.Join(dir, "usr/lib/systemd/networkd.conf.d/50-vendor.conf"), "[Network]\nManageForeignRoutingPolicyRules=yes\n")
	if got := keys(); !slices.Equal(got, []string{"ManageForeignRoutingPolicyRules", "ManageForeignRoutes"}) {
		t.Errorf("vendor drop-in turns rules on: warnings for %v", got)
	}
	writeFile(t, filepath.Join(dir, "etc/systemd/networkd.conf.d/50-vendor.conf"), "# masked\n")
	writeFile(t, filepath.Join(dir, "etc/systemd/networkd.conf.d/90-dualhomed.conf"), "[Network]\nManageForeignRoutes = false\n")
	if got := keys(); len(got) != 0 {
		t.Errorf("both off: warnings for %v", got)
	}
}

// The managed namespace is told apart from the caller's: a networkd of the
// host never counts for a namespace the daemon manages from outside.
func TestNamespaceOf(t *testing.T) {
	own, err := namespaceOf(netns.None())
	if err != nil {
		t.Fatal(err)
	}
	if self, err := os.Stat(fmt.Sprintf("/proc/%d/ns/net", os.Getpid())); err != nil || !os.SameFile(self, own) {
		t.Fatalf("the caller's namespace %v, /proc/<pid>/ns/net %v (%v)", own, self, err)
	}
	ns := nstest.New(t)
	other, err := namespaceOf(ns.Handle)
	if err != nil || os.SameFile(other, own) {
		t.Errorf("a new namespace is %v (%v), the caller's %v", other, err, own)
	}
}
