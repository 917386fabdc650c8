package netcfg

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"

	"github.com/dualhomed/dualhomed/netcfg/nstest"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// inetConf is an IFLA_INET_CONF array of n values with rp_filter at its place.
func inetConf(n, rpFilter int) []byte {
	b := make([]byte, 4*n)
	if n >= ipv4DevconfRPFilter {
		binary.NativeEndian.PutUint32(b[(ipv4DevconfRPFilter-1)*4:], uint32(rpFilter))
	}
	return b
}

// afSpec is an IFLA_AF_SPEC payload holding one nest per family given.
func afSpec(nests map[int][]byte) []byte {
	var b []byte
	for _, family := range []int{unix.AF_INET6, unix.AF_INET} { // the kernel's order varies: AF_INET last here
		conf, ok := nests[family]
		if !ok {
			continue
		}
		nest := nl.NewRtAttr(family, nil)
		nest.AddRtAttr(unix.IFLA_INET_CONF, conf)
		b = append(b, nest.Serialize()...)
	}
	return b
}

func TestRPFilterFromAFSpec(t *testing.T) {
	tests := []struct {
		name   string
		spec   []byte
		want   int
		wantOK bool
	}{
		{"IPv4 configuration", afSpec(map[int][]byte{unix.AF_INET: inetConf(33, 2)}), 2, true},
		{"after IPv6's", afSpec(map[int][]byte{unix.AF_INET6: inetConf(60, 7), unix.AF_INET: inetConf(33, 1)}), 1, true},
		{"zero", afSpec(map[int][]byte{unix.AF_INET: inetConf(33, 0)}), 0, true},
		{"exactly long enough", afSpec(map[int][]byte{unix.AF_INET: inetConf(ipv4DevconfRPFilter, 2)}), 2, true},
		{"no IPv4 configuration", afSpec(map[int][]byte{unix.AF_INET6: inetConf(60, 2)}), 0, false},
		{"array too short", afSpec(map[int][]byte{unix.AF_INET: inetConf(ipv4DevconfRPFilter-1, 2)}), 0, false},
		{"empty", nil, 0, false},
		{"truncated", afSpec(map[int][]byte{unix.AF_INET: inetConf(33, 2)})[:10], 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := rpFilterFromAFSpec(tt.spec)
			if got != tt.want || ok != tt.wantOK {
				t.Errorf("rpFilterFromAFSpec = %d, %v; want %d, %v", got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

// rpFilterKernel is a namespace with eth0..eth2 whose rp_filter are 0, 1, 2.
func rpFilterKernel(t *testing.T) (*Kernel, *nstest.NS) {
	t.Helper()
	router := nstest.New(t)
	ns := nstest.New(t)
	for i := range 3 {
		name := "eth" + strconv.Itoa(i)
		ns.Veth(t, name, ktMAC(i), router, "vpc"+strconv.Itoa(i))
		ns.Sysctl(t, "net/ipv4/conf/"+name+"/rp_filter", strconv.Itoa(i))
	}
	k, err := NewKernel(ns.Handle, t.TempDir(), DefaultConfig())
	if err != nil {
		t.Fatalf("NewKernel: %v", err)
	}
	t.Cleanup(k.Close)
	return k, ns
}

// The link dump's rp_filter values are the ones procfs shows, for every link.
func TestLinkDumpRPFiltersMatchProcfs(t *testing.T) {
	k, ns := rpFilterKernel(t)
	links, values, _, err := k.dump.links()
	if err != nil {
		t.Fatalf("dumping links: %v", err)
	}
	if len(values) != len(links) {
		t.Errorf("rp_filter of %d links for %d links: %v", len(values), len(links), values)
	}
	for _, l := range links {
		want := ns.ReadSysctl(t, "net/ipv4/conf/"+l.Name+"/rp_filter")
		if got, ok := values[l.Name]; !ok || strconv.Itoa(got) != want {
			t.Errorf("rp_filter of %s from the link dump = %d (%v), procfs says %s", l.Name, got, ok, want)
		}
	}
	for i := range 3 { // not all 0: the test can fail
		if got := values["eth"+strconv.Itoa(i)]; got != i {
			t.Errorf("rp_filter of eth%d = %d, want %d", i, got, i)
		}
	}
}

// Owned rp_filter values come from the link dump: every recorded link that
// exists with an IPv4 configuration, sorted, and nothing for the others.
func TestOwnedRPFiltersFromLinkDump(t *testing.T) {
	k, ns := rpFilterKernel(t)
	// An MTU too small for IPv4 removes lo's IPv4 configuration, and with it
	// /proc/sys/net/ipv4/conf/lo: a link that exists but has no rp_filter.
	ns.Run(t, "ip", "link", "set", "lo", "mtu", "60")
	orig := map[string]int{"eth2": 0, "eth0": 1, "gone": 1, "lo": 1}
	if err := WriteStateFile(filepath.Join(k.stateDir, rpFilterStateFile), orig, 0o600); err != nil {
		t.Fatal(err)
	}
	_, values, _, err := k.dump.links()
	if err != nil || len(values) == 0 {
		t.Fatalf("the link dump carried no rp_filter (%v): the test lost its point", err)
	}
	fromLinks, err := k.ownedRPFilters(values)
	if err != nil {
		t.Fatalf("ownedRPFilters from the link dump: %v", err)
	}
	want := []RPFilter{{LinkName: "eth0", Value: 0}, {LinkName: "eth2", Value: 2}}
	if !slices.Equal(fromLinks, want) {
		t.Errorf("from the link dump: %v, want %v", fromLinks, want)
	}
	// Observe reads them the same way.
	obs, err := k.Observe()
	if err != nil {
		t.Fatalf("Observe: %v", err)
	}
	if !slices.Equal(obs.Owned.RPFilters, want) {
		t.Errorf("Observe: %v; want %v", obs.Owned.RPFilters, want)
	}
}

// A recorded name that cannot be a link's is an error: the state file is
// damaged.
func TestOwnedRPFiltersRefusesABadRecord(t *testing.T) {
	k, _ := rpFilterKernel(t)
	if err := os.WriteFile(filepath.Join(k.stateDir, rpFilterStateFile), []byte(`{"../eth0": 1}`), 0o644); err != nil {
		t.Fatal(err)
	}
	_, fromLinks, _, err := k.dump.links()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := k.ownedRPFilters(fromLinks); err == nil {
		t.Errorf("ownedRPFilters = %v, want an error", got)
	}
}

// Cleanup run by root in a state directory of another owner (the unit's
// DynamicUser=, kept over a stop) restores rp_filter from the record and
// leaves the rewritten record that owner's, so that the next daemon can
// read it.
func TestCleanupKeepsTheStateDirectorysOwner(t *testing.T) {
	k, ns := rpFilterKernel(t)
	const nobody = 65534
	if err := os.Chown(k.stateDir, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	// What the daemon leaves: eth1's strict original recorded, loose set.
	if err := WriteStateFile(filepath.Join(k.stateDir, rpFilterStateFile), map[string]int{"eth1": 1}, 0o600); err != nil {
		t.Fatal(err)
	}
	ns.Sysctl(t, "net/ipv4/conf/eth1/rp_filter", "2")
	if _, err := k.Cleanup(); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	if got := ns.ReadSysctl(t, "net/ipv4/conf/eth1/rp_filter"); got != "1" {
		t.Errorf("eth1's rp_filter after cleanup = %s, want its original 1", got)
	}
	entries, err := os.ReadDir(k.stateDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		fi, err := os.Stat(filepath.Join(k.stateDir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != nobody || st.Gid != nobody {
			t.Errorf("%s after cleanup is owned by %d:%d, not the directory's %d:%d", e.Name(), st.Uid, st.Gid, nobody, nobody)
		}
	}
	if len(entries) == 0 {
		t.Error("cleanup left no record file: the ownership check proved nothing")
	}
}
