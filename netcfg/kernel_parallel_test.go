package netcfg

import (
	"errors"
	"sync"
	"testing"
)

// dumpInParallel runs every dump once, on both sockets, and reports an
// error of any of them.
func TestDumpInParallel(t *testing.T) {
	k := &Kernel{dump: &dumpSocket{}, parallelDump: &dumpSocket{}}
	var mu sync.Mutex
	ran := map[int]int{}
	sockets := map[*dumpSocket]bool{}
	release := make(chan struct{})
	dump := func(i int) func(*dumpSocket) error {
		return func(d *dumpSocket) error {
			mu.Lock()
			ran[i]++
			sockets[d] = true
			mu.Unlock()
			if i == 0 {
				<-release // held until another dump ran: both sockets are busy at once
			} else if i == 1 {
				close(release)
			}
			return nil
		}
	}
	var dumps []func(*dumpSocket) error
	for i := range 6 {
		dumps = append(dumps, dump(i))
	}
	if err := k.dumpInParallel(dumps...); err != nil {
		t.Fatalf("dumpInParallel: %v", err)
	}
	for i := range dumps {
		if ran[i] != 1 {
			t.Errorf("dump %d ran %d times, want 1", i, ran[i])
		}
	}
	if !sockets[k.dump] || !sockets[k.parallelDump] {
		t.Errorf("dumps ran on %d of the 2 sockets", len(sockets))
	}

	// A failing dump's error is reported, whichever socket ran it.
	errBoom := errors.New("boom")
	for _, failOn := range []*dumpSocket{k.dump, k.parallelDump} {
		release := make(chan struct{})
		fails := func(d *dumpSocket) error {
			if d == failOn {
				return errBoom
			}
			return nil
		}
		err := k.dumpInParallel(
			// The first two run on different sockets: the first waits for the second.
			func(d *dumpSocket) error { <-release; return fails(d) },
			func(d *dumpSocket) error { close(release); return fails(d) },
		)
		if !errors.Is(err, errBoom) {
			t.Errorf("failing on the %s socket: dumpInParallel = %v, want %v", map[bool]string{true: "first", false: "second"}[failOn == k.dump], err, errBoom)
		}
	}
}
