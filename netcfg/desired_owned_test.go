package netcfg

import (
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
)

// Desired looks owned addresses up in Observed.Owned.Addrs as Observe sorts
// it, and copes with any other order exactly the same.
func TestDesiredIgnoresTheOrderOfOwnedAddresses(t *testing.T) {
	snap, obs, steady := benchWorld(t)
	rng := rand.New(rand.NewPCG(5, 6))
	for round := range 3 {
		shuffled := obs
		shuffled.Owned.Addrs = slices.Clone(obs.Owned.Addrs)
		rng.Shuffle(len(shuffled.Owned.Addrs), func(i, j int) {
			shuffled.Owned.Addrs[i], shuffled.Owned.Addrs[j] = shuffled.Owned.Addrs[j], shuffled.Owned.Addrs[i]
		})
		if got := Desired(snap, shuffled, DefaultConfig()); !reflect.DeepEqual(got, steady) {
			t.Fatalf("round %d: Desired with shuffled owned addresses differs:\n%s", round, Diff(steady.State, got.State))
		}
	}
}

// Of two owned addresses with one identity (only a hand-made Observed has
// them), the later one counts, as it did when they were kept in a map.
func TestDesiredTakesTheLastOfDuplicateOwnedAddresses(t *testing.T) {
	snap, obs, steady := benchWorld(t)
	// An ENI's first address in its subnet keeps the noprefixroute flag it
	// has in the kernel.
	i := slices.IndexFunc(steady.State.Addrs, func(a Addr) bool { return a.LinkIndex == 2 && a.Prefix.Bits() == 20 })
	if i < 0 {
		t.Fatal("no subnet-length address on link 2: the test lost its point")
	}
	primary := steady.State.Addrs[i]
	flipped := primary
	flipped.NoPrefixRoute = !primary.NoPrefixRoute
	for _, tc := range []struct {
		name  string
		owned []Addr
		want  Addr
	}{
		{"flipped last, unsorted", append(slices.Clone(obs.Owned.Addrs), flipped), flipped},
		{"flipped first, unsorted", append([]Addr{flipped}, obs.Owned.Addrs...), primary},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := obs
			o.Owned.Addrs = tc.owned
			got := Desired(snap, o, DefaultConfig())
			j := slices.IndexFunc(got.State.Addrs, func(a Addr) bool { return a.Key() == primary.Key() })
			if j < 0 {
				t.Fatalf("%v is no longer desired", primary.Prefix)
			}
			if got.State.Addrs[j] != tc.want {
				t.Errorf("desired %v, want %v", got.State.Addrs[j], tc.want)
			}
		})
	}
}
