package netcfg

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// altNames reads the altnames of link name from the kernel, as `ip link show`
// does, sorted.
func (w *ktWorld) altNames(t *testing.T, name string) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(w.ns.Run(t, "ip", "-o", "link", "show", "dev", name), "\\") {
		if n, ok := strings.CutPrefix(strings.TrimSpace(l), "altname "); ok {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// Altnames carry no owner mark: dualhomed owns exactly the ones it recorded
// adding. A name another tool gave the same link is left there and never
// claimed; a name another link holds is reported, not fought over; cleanup
// removes ours only.
func TestAltNamesOwnership(t *testing.T) {
	w := newKTWorld(t)
	w.ip(t, "link", "property", "add", "dev", "eth1", "altname", "eni-1")           // like amazon-ec2-net-utils
	w.ip(t, "link", "property", "add", "dev", "eth3", "altname", "device-number-2") // another link holds eth2's name
	res, _ := w.pipeline(t, ktSnapshot())
	if !slices.ContainsFunc(res.Warnings, func(x Warning) bool { return strings.Contains(x.Message, "altname device-number-2 is taken") }) {
		t.Errorf("no warning about device-number-2 held by eth3: %v", res.Warnings)
	}
	for link, want := range map[string][]string{
		"eth0": {"device-number-0", "eni-0"},
		"eth1": {"device-number-1", "eni-1"},
		"eth2": {"eni-2"},
		"eth3": {"device-number-1.1", "device-number-2", "eni-3"},
	} {
		if got := w.altNames(t, link); !slices.Equal(got, want) {
			t.Errorf("%s altnames %v, want %v", link, got, want)
		}
	}
	for _, a := range w.owned(t).AltNames {
		if a.Name == "eni-1" || a.Name == "device-number-2" {
			t.Errorf("claims %s, which another tool added", a.Name)
		}
	}
	if _, n := w.pipeline(t, ktSnapshot()); n != 0 {
		t.Errorf("second reconcile made %d writes", n)
	}

	// A name that another link took between Observe and Apply: EEXIST, not recorded.
	w.ip(t, "link", "property", "add", "dev", "eth0", "altname", "spare")
	if _, err := w.k.Apply(Plan{Ops: []Op{{AltName: &AltName{LinkIndex: w.idx["eth1"], Name: "spare"}}}}); err != nil {
		t.Errorf("adding a name another link holds: %v", err)
	}
	if slices.Contains(w.owned(t).AltNames, AltName{LinkIndex: w.idx["eth1"], Name: "spare"}) || slices.Contains(w.altNames(t, "eth1"), "spare") {
		t.Error("a name another link holds was recorded or moved")
	}

	if _, err := w.k.Cleanup(); err != nil {
		t.Fatal(err)
	}
	for link, want := range map[string][]string{"eth0": {"spare"}, "eth1": {"eni-1"}, "eth2": nil, "eth3": {"device-number-2"}} {
		if got := w.altNames(t, link); !slices.Equal(got, want) {
			t.Errorf("after cleanup %s altnames %v, want %v (the others' only)", link, got, want)
		}
	}
}

// Altnames survive a rename (they belong to the link, and the record names
// it by index), and records of names gone with their link are forgotten.
func TestAltNamesRenameAndLinkGone(t *testing.T) {
	w := newKTWorld(t)
	w.pipeline(t, ktSnapshot())
	w.ip(t, "link", "set", "eth3", "down")
	w.ip(t, "link", "set", "eth3", "name", "data3")
	w.ip(t, "link", "set", "data3", "up")
	if got := w.altNames(t, "eni-3"); !slices.Equal(got, []string{"device-number-1.1", "eni-3"}) {
		t.Errorf("renamed link's altnames %v", got)
	}
	obs, err := w.k.Observe()
	if err != nil {
		t.Fatal(err)
	}
	if plan := Diff(obs.Owned, Desired(ktSnapshot(), obs, DefaultConfig()).State); slices.ContainsFunc(plan.Ops, func(op Op) bool { return op.AltName != nil }) {
		t.Errorf("after the rename the plan changes altnames:\n%s", plan)
	}

	w.ip(t, "link", "del", "eth2")
	snap := ktSnapshot()
	snap.ENIs = snap.ENIs[:2] // eth2 and eth3 detached
	w.pipeline(t, snap)
	var recs []AltName
	b, err := os.ReadFile(filepath.Join(w.stateDir, altNameRecords.name))
	if err == nil {
		err = json.Unmarshal(b, &recs)
	}
	if err != nil || slices.ContainsFunc(recs, func(a AltName) bool { return a.LinkIndex == w.idx["eth2"] || a.LinkIndex == w.idx["eth3"] }) {
		t.Errorf("records after the detach: %v (%v); want none of eth2 (gone) or data3", recs, err)
	}
	if got := w.altNames(t, "data3"); len(got) != 0 {
		t.Errorf("altnames left on the detached ENI's link: %v", got)
	}
}
