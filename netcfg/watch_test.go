package netcfg

import (
	"context"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Watch must report every kind of change a quiet poll would otherwise miss,
// each as what it means: if it missed one, the daemon would keep a stale
// observation and never repair or report that change.
func TestWatchSeesEveryKindOfChange(t *testing.T) {
	w := newKTWorld(t)
	desired := w.state(ktEth1, ktEth2)
	w.reconcile(t, desired)
	var mu sync.Mutex
	var seen []KernelChange
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w.k.Watch(ctx, func(c KernelChange) { mu.Lock(); seen = append(seen, c); mu.Unlock() },
		func(err error, _ time.Duration) { t.Errorf("feed lost: %v", err) })
	time.Sleep(100 * time.Millisecond) // the feed subscribes
	r := desired.Rules[0]
	for _, c := range []struct {
		name   string
		change func()
		want   KernelChange
	}{
		{"foreign rule added", func() { w.ip(t, "rule", "add", "priority", "50", "from", "10.9.0.1", "lookup", "101") }, OtherChanged},
		{"foreign rule deleted", func() { w.ip(t, "rule", "del", "priority", "50", "from", "10.9.0.1", "lookup", "101") }, ForeignDeleted},
		{"one of our rules deleted", func() {
			w.ip(t, "rule", "del", "priority", strconv.Itoa(r.Priority), "from", r.Src.String(), "lookup", strconv.Itoa(r.Table))
		}, OwnedDeleted},
		{"route added in main", func() { w.ip(t, "route", "add", "192.0.2.0/24", "dev", "eth1") }, OtherChanged},
		{"route deleted in main", func() { w.ip(t, "route", "del", "192.0.2.0/24", "dev", "eth1") }, ForeignDeleted},
		{"route added in our band", func() { w.ip(t, "route", "add", "198.51.100.0/24", "dev", "eth2", "table", "20077") }, OtherChanged},
		{"one of our routes deleted", func() { w.ip(t, "route", "flush", "table", "20001", "proto", "210") }, OwnedDeleted},
		{"address added", func() { w.ip(t, "addr", "add", "192.0.2.77/32", "dev", "eth2") }, AddrChanged},
		{"link changed", func() { w.ip(t, "link", "set", "eth2", "mtu", "1400") }, LinkChanged},
		{"rp_filter changed", func() { w.ns.Sysctl(t, "net/ipv4/conf/eth1/rp_filter", "1") }, OtherChanged},
	} {
		mu.Lock()
		seen = nil
		mu.Unlock()
		c.change()
		deadline := time.Now().Add(5 * time.Second)
		for {
			mu.Lock()
			got := slices.Contains(seen, c.want)
			mu.Unlock()
			if got {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s: not reported as %d (seen %v)", c.name, c.want, seen)
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// The local table's routes (one per address) are not news; the others are
// classified by who owns them.
func TestChangeClassifiesRoutes(t *testing.T) {
	cfg := DefaultConfig()
	local := nl.RtMsg{RtMsg: unix.RtMsg{Family: unix.AF_INET, Table: unix.RT_TABLE_LOCAL}}
	if got := cfg.change(25 /* RTM_DELROUTE */, local.Serialize()); got != 0 {
		t.Errorf("a local-table route deletion is reported as %d", got)
	}
	main := nl.RtMsg{RtMsg: unix.RtMsg{Family: unix.AF_INET, Table: MainTable, Protocol: DefaultProtocol}}
	if got := cfg.change(25, main.Serialize()); got != OwnedDeleted {
		t.Errorf("deleting our main-table route is reported as %d, want OwnedDeleted", got)
	}
	main.Protocol = 4
	if got := cfg.change(24 /* RTM_NEWROUTE */, main.Serialize()); got != OtherChanged {
		t.Errorf("a foreign route added is reported as %d, want OtherChanged", got)
	}
}

// Of nftables, the feed hears our table only: a change to it is drift, to
// be repaired at once; another program's tables are none of its business.
func TestWatchHearsOurNFTableOnly(t *testing.T) {
	requireNFT(t)
	w := newKTWorld(t)
	var mu sync.Mutex
	var seen []KernelChange
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w.k.Watch(ctx, func(c KernelChange) { mu.Lock(); seen = append(seen, c); mu.Unlock() },
		func(err error, _ time.Duration) { t.Errorf("feed lost: %v", err) })
	time.Sleep(100 * time.Millisecond) // the feed subscribes
	heard := func() []KernelChange {
		mu.Lock()
		defer mu.Unlock()
		out := seen
		seen = nil
		return out
	}
	w.ns.Run(t, "nft", "add table inet other\nadd chain inet other c\nadd rule inet other c accept\nflush table inet other\nadd table ip dualhomed")
	time.Sleep(300 * time.Millisecond)
	if got := heard(); len(got) != 0 {
		t.Errorf("other tables' changes reported: %v", got)
	}
	for _, script := range []string{"add table inet dualhomed\nadd chain inet dualhomed c\nadd rule inet dualhomed c accept", "flush chain inet dualhomed c"} {
		w.ns.Run(t, "nft", script)
		deadline := time.Now().Add(5 * time.Second)
		for !slices.Contains(heard(), OwnedDeleted) {
			if time.Now().After(deadline) {
				t.Fatalf("%q: not reported as drift", script)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}
