package agent

import (
	"bufio"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vishvananda/netns"

	"github.com/dualhomed/dualhomed/netcfg"
)

// systemd-networkd's configuration, relative to the root directory: the
// main files, lowest precedence first, and the directories of *.conf
// drop-ins, highest precedence first (a drop-in in an earlier directory
// hides one of the same name in a later one).
var (
	networkdConfs      = []string{"usr/lib/systemd/networkd.conf", "etc/systemd/networkd.conf"}
	networkdDropinDirs = []string{"etc/systemd/networkd.conf.d", "run/systemd/networkd.conf.d",
		"usr/local/lib/systemd/networkd.conf.d", "usr/lib/systemd/networkd.conf.d"}
	// systemdFalse are the spellings of a false boolean in systemd's files.
	systemdFalse = []string{"no", "false", "0", "off"}
)

// hostWarnings warns when systemd-networkd runs in the network namespace ns
// (its file, see namespaceOf) with settings that make it delete foreign
// rules or routes: dualhomed's included. It reads /proc and systemd's files
// under root. The daemon checks at start and on reload.
func hostWarnings(root string, ns os.FileInfo) []netcfg.Warning {
	if !networkdRunning(root, ns) {
		return nil
	}
	settings := networkdSettings(root)
	var warns []netcfg.Warning
	for _, c := range []struct{ key, what string }{
		{"ManageForeignRoutingPolicyRules", "routing policy rules"},
		{"ManageForeignRoutes", "routes"},
	} {
		if slices.Contains(systemdFalse, strings.ToLower(settings[c.key])) {
			continue
		}
		warns = append(warns, netcfg.Warning{
			Message: fmt.Sprintf("systemd-networkd is running without %s=no: it deletes %s it did not create, dualhomed's included", c.key, c.what),
			Hint:    fmt.Sprintf("create /etc/systemd/networkd.conf.d/dualhomed.conf containing `[Network]` and `%s=no`, then `systemctl restart systemd-networkd`", c.key),
		})
	}
	return warns
}

// networkdRunning reports whether a systemd-networkd process runs in the
// network namespace ns: one that runs elsewhere (the host's, when dualhomed
// manages a namespace of its own) never touches ns's routes.
func networkdRunning(root string, ns os.FileInfo) bool {
	comms, _ := filepath.Glob(filepath.Join(root, "proc", "[0-9]*", "comm"))
	for _, c := range comms {
		b, err := os.ReadFile(c)
		// comm is cut to 15 bytes: "systemd-network".
		if name := strings.TrimSpace(string(b)); err != nil || (name != "systemd-network" && name != "systemd-networkd") {
			continue
		}
		if fi, err := os.Stat(filepath.Join(filepath.Dir(c), "ns", "net")); err == nil && os.SameFile(fi, ns) {
			return true
		}
	}
	return false
}

// namespaceOf returns the file that identifies the network namespace ns (the
// caller's own when ns is not open): /proc/<pid>/ns/net of every process in
// one namespace is the same file (os.SameFile).
func namespaceOf(ns netns.NsHandle) (os.FileInfo, error) {
	if !ns.IsOpen() {
		return os.Stat("/proc/self/ns/net")
	}
	return os.Stat(fmt.Sprintf("/proc/self/fd/%d", int(ns)))
}

// HostWarnings runs the host check for the network namespace ns with
// systemd's real paths. A namespace it cannot identify is checked as the
// caller's own.
func HostWarnings(ns netns.NsHandle) []netcfg.Warning {
	id, err := namespaceOf(ns)
	if err != nil {
		id, _ = namespaceOf(netns.None())
	}
	return hostWarnings("/", id)
}

// networkdSettings returns the [Network] keys as systemd-networkd would see
// them: main files in order, then drop-ins sorted by file name, later values
// overriding earlier ones.
func networkdSettings(root string) map[string]string {
	settings := map[string]string{}
	for _, f := range networkdConfs {
		readNetworkSection(filepath.Join(root, f), settings)
	}
	dropins := map[string]string{} // base name -> path of highest precedence
	for i := len(networkdDropinDirs) - 1; i >= 0; i-- {
		files, _ := filepath.Glob(filepath.Join(root, networkdDropinDirs[i], "*.conf"))
		for _, f := range files {
			dropins[filepath.Base(f)] = f
		}
	}
	for _, n := range slices.Sorted(maps.Keys(dropins)) {
		readNetworkSection(dropins[n], settings)
	}
	return settings
}

// readNetworkSection adds the key=value lines of path's [Network] section to
// settings. A missing file adds nothing.
func readNetworkSection(path string, settings map[string]string) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && strings.HasSuffix(line, "]"):
			section = strings.TrimSpace(line[1 : len(line)-1])
		case section == "Network":
			if k, v, ok := strings.Cut(line, "="); ok {
				settings[strings.TrimSpace(k)] = strings.TrimSpace(v)
			}
		}
	}
}
