package netcfg

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// sortRunsInputs builds slices shaped like kernel dumps and worse: sorted,
// reversed, runs of both kinds, duplicates, random, and enough runs to make
// sortRuns fall back to sorting.
func sortRunsInputs(rng *rand.Rand) map[string][]int {
	ascending := func(n, from, step int) []int {
		out := make([]int, n)
		for i := range out {
			out[i] = from + i*step
		}
		return out
	}
	reversed := func(s []int) []int { s = slices.Clone(s); slices.Reverse(s); return s }
	random := func(n, max int) []int {
		out := make([]int, n)
		for i := range out {
			out[i] = rng.IntN(max)
		}
		return out
	}
	runs := func(n int, desc bool) []int {
		var out []int
		for r := range n {
			run := ascending(1+rng.IntN(20), rng.IntN(100)+r, 1+rng.IntN(3))
			if desc && r%2 == 1 {
				run = reversed(run)
			}
			out = append(out, run...)
		}
		return out
	}
	inputs := map[string][]int{
		"empty":                 nil,
		"one":                   {7},
		"two descending":        {2, 1},
		"sorted":                ascending(100, 0, 1),
		"reversed":              reversed(ascending(100, 0, 1)),
		"all equal":             make([]int, 50),
		"equal then descending": {5, 5, 5, 4, 3, 3, 2},
		// Rules: one priority-ordered run per family.
		"two interleaved runs": append(ascending(50, 0, 2), ascending(50, 1, 2)...),
		// Addresses: IPv4 of every link ascending, then each link's IPv6 newest first.
		"ascending then descending blocks": append(ascending(40, 0, 2),
			slices.Concat(reversed(ascending(10, 1, 2)), reversed(ascending(10, 21, 2)), reversed(ascending(10, 41, 2)))...),
		"ascending runs":               runs(10, false),
		"mixed runs":                   runs(10, true),
		"exactly max runs":             runs(maxSortRuns, false),
		"more runs than merged":        runs(maxSortRuns+1, true),
		"random":                       random(300, 1000),
		"random with duplicates":       random(300, 10),
		"sorted with one out of place": append(ascending(100, 0, 1), 50),
	}
	return inputs
}

func TestSortRunsSortsLikeSortFunc(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 20 {
		for name, in := range sortRunsInputs(rng) {
			got, want := slices.Clone(in), slices.Clone(in)
			sortRuns(got, cmp.Compare[int])
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Fatalf("round %d, %s: sortRuns(%v) = %v, want %v", round, name, in, got, want)
			}
		}
	}
}

// State.Sort gives the same order as sorting each slice, on a full-scale
// state shuffled and laid out as the kernel dumps it.
func TestStateSortMatchesSortFunc(t *testing.T) {
	st := Desired(fullScaleSnapshot(), Observed{Links: fullScaleLinks()}, DefaultConfig()).State
	if len(st.Addrs) < 1000 || len(st.Rules) < 1000 {
		t.Fatalf("full-scale state has %d addresses and %d rules: the test lost its point", len(st.Addrs), len(st.Rules))
	}
	rng := rand.New(rand.NewPCG(3, 4))
	layouts := map[string]func(State) State{
		"sorted": func(s State) State { return s },
		// Families one after the other, IPv6 addresses newest first.
		"kernel order": func(s State) State {
			v4 := func(a Addr) bool { return a.Prefix.Addr().Is4() }
			addrs := slices.DeleteFunc(slices.Clone(s.Addrs), func(a Addr) bool { return !v4(a) })
			for start := 0; start < len(s.Addrs); {
				end := start
				for end < len(s.Addrs) && s.Addrs[end].LinkIndex == s.Addrs[start].LinkIndex {
					end++
				}
				six := slices.DeleteFunc(slices.Clone(s.Addrs[start:end]), v4)
				slices.Reverse(six)
				addrs = append(addrs, six...)
				start = end
			}
			s.Addrs = addrs
			is4 := func(r Rule) bool { return r.Src.Addr().Is4() }
			s.Rules = slices.Concat(slices.DeleteFunc(slices.Clone(s.Rules), func(r Rule) bool { return !is4(r) }),
				slices.DeleteFunc(slices.Clone(s.Rules), is4))
			return s
		},
		"shuffled": func(s State) State {
			rng.Shuffle(len(s.Routes), func(i, j int) { s.Routes[i], s.Routes[j] = s.Routes[j], s.Routes[i] })
			rng.Shuffle(len(s.Rules), func(i, j int) { s.Rules[i], s.Rules[j] = s.Rules[j], s.Rules[i] })
			rng.Shuffle(len(s.Addrs), func(i, j int) { s.Addrs[i], s.Addrs[j] = s.Addrs[j], s.Addrs[i] })
			return s
		},
	}
	for name, layout := range layouts {
		t.Run(name, func(t *testing.T) {
			got := layout(st.clone())
			if name != "sorted" && slices.IsSortedFunc(got.Addrs, compareAddrs) {
				t.Fatal("the layout left the addresses sorted: the test lost its point")
			}
			want := got.clone()
			slices.SortFunc(want.Routes, compareRoutes)
			slices.SortFunc(want.Rules, compareRules)
			slices.SortFunc(want.Addrs, compareAddrs)
			slices.SortFunc(want.RPFilters, compareRPFilters)
			got.Sort()
			firstDifference := func(what string, n int, equal func(int) bool) {
				for i := range n {
					if !equal(i) {
						t.Errorf("%s differ from index %d on", what, i)
						return
					}
				}
			}
			firstDifference("routes", len(want.Routes), func(i int) bool { return got.Routes[i] == want.Routes[i] })
			firstDifference("rules", len(want.Rules), func(i int) bool { return got.Rules[i] == want.Rules[i] })
			firstDifference("addresses", len(want.Addrs), func(i int) bool { return got.Addrs[i] == want.Addrs[i] })
			firstDifference("rp_filters", len(want.RPFilters), func(i int) bool { return got.RPFilters[i] == want.RPFilters[i] })
		})
	}
}

// fullScaleLinks are the links of fullScaleSnapshot's ENIs, indexes from 2.
func fullScaleLinks() []Link {
	links := make([]Link, fullScaleENIs)
	for i := range links {
		links[i] = Link{Index: i + 2, Name: fmt.Sprintf("eth%d", i), MAC: ktMAC(i)}
	}
	return links
}
