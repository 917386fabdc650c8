package e2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// altNames returns the altnames of the link that name (a link name or an
// altname) designates in the instance, sorted, as `ip link show` prints them.
func altNames(t *testing.T, w *simworld.World, name string) []string {
	t.Helper()
	out, err := w.Instance.IP("-o", "link", "show", "dev", name)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range strings.Split(out, "\\") {
		if n, ok := strings.CutPrefix(strings.TrimSpace(f), "altname "); ok {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	return names
}

// Scenario: an instance with 4 network cards and an ENI at device 0 and 1
// on each, every ENI in a VPC of its own (device 0 on cards 1 to 3 was
// never configured before: issue 15). Every VPC's client gets its ICMP and
// TCP replies through its ENI; each ENI has the table of its card and
// device, and its link the altnames eni-... and device-number-D (card 0) or
// device-number-D.C. A link renamed by the operator keeps them, and the
// daemon neither renames it back nor touches them.
func TestEveryNetworkCard(t *testing.T) {
	inst := emulator.ExampleInstance(8, 1, 0, 0, 4) // eth<i>: card i%4, device i/4
	w := simworld.ForTestWith(t, simworld.Options{DualhomedBin: dualhomedBin, Instance: &inst})
	needBinaries(t)
	if err := w.StartIMDS(); err != nil {
		t.Fatal(err)
	}
	d, err := w.StartDaemon(simworld.DaemonOptions{PollInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	var links []string
	for _, e := range w.ENIs {
		links = append(links, e.Link)
	}
	waitConfigured(t, w, d, links[1:]...)
	expectAllWork(t, clientProbes(w, links...))
	// The altnames come last in the Apply that configured the ENIs.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = simworld.WaitFor(ctx, func() error {
		if len(altNames(t, w, links[len(links)-1])) < 2 {
			return fmt.Errorf("no altnames yet")
		}
		return nil
	})

	for _, e := range w.ENIs {
		dev := fmt.Sprintf("device-number-%d", e.Device)
		if e.Card != 0 {
			dev += fmt.Sprintf(".%d", e.Card)
		}
		if got, want := altNames(t, w, e.Link), []string{dev, e.ID}; !slices.Equal(got, want) {
			t.Errorf("%s (card %d, device %d): altnames %v, want %v", e.Link, e.Card, e.Device, got, want)
		}
		if e.IsPrimary() {
			continue
		}
		rule, err := w.Instance.IP("rule", "show", "from", e.Primary4().String())
		if err != nil {
			t.Fatal(err)
		}
		if got, want := lookupTable(t, rule), fmt.Sprint(20000+100*e.Card+e.Device); got != want {
			t.Errorf("%s (card %d, device %d): table %s, want %s", e.Link, e.Card, e.Device, got, want)
		}
	}
	expectInSync(t, w)

	// The operator renames card 1's device 0 link; the kernel flushes its
	// routes (it must be down to be renamed) and dualhomed puts them back.
	e := w.ENIs[1]
	before := altNames(t, w, e.Link)
	for _, args := range [][]string{{"link", "set", e.Link, "down"}, {"link", "set", e.Link, "name", "data1"}, {"link", "set", "data1", "up"}} {
		if _, err := w.Instance.IP(args...); err != nil {
			t.Fatal(err)
		}
	}
	waitWorks(t, clientProbes(w, e.Link)[0], 10*time.Second)
	expectInSync(t, w)
	if got := altNames(t, w, e.ID); !slices.Equal(got, before) {
		t.Errorf("after the rename to data1: altnames %v, want %v", got, before)
	}
	if _, err := w.Instance.IP("link", "show", "dev", "data1"); err != nil {
		t.Errorf("the renamed link is not data1 any more: %v", err)
	}
}
