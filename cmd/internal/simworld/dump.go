package simworld

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// Dump is a normalized snapshot of a namespace's routing state: policy rules,
// routes of every table, addresses, links and the rp_filter sysctls, as
// `ip` prints them, one object a line, sorted, with counters and timers removed.
type Dump []string

// volatile matches the parts of `ip` output that change on their own.
var volatile = regexp.MustCompile(`\s+(valid_lft|preferred_lft|expires|used|age)\s+\S+`)

// DumpState returns the namespace's Dump.
func DumpState(ns *NS) (Dump, error) {
	var d Dump
	for _, args := range [][]string{
		{"-4", "rule", "show"},
		{"-6", "rule", "show"},
		{"-4", "route", "show", "table", "all"},
		{"-6", "route", "show", "table", "all"},
		{"-o", "addr", "show"},
		{"-o", "link", "show"},
	} {
		out, err := ns.IP(args...)
		if err != nil {
			return nil, err
		}
		kind := args[0] + " " + args[1]
		for _, line := range strings.Split(out, "\n") {
			line = strings.TrimSpace(volatile.ReplaceAllString(line, ""))
			// `ip -o` continues an object on the next line with "\".
			line = strings.Join(strings.Fields(strings.ReplaceAll(line, `\`, " ")), " ")
			if line == "" {
				continue
			}
			d = append(d, kind+": "+line)
		}
	}
	links, err := ns.NL.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing links in %s: %w", ns.Name, err)
	}
	names := []string{"all", "default"}
	for _, l := range links {
		names = append(names, l.Attrs().Name)
	}
	for _, n := range names {
		v, err := ns.Sysctl("net/ipv4/conf/" + n + "/rp_filter")
		if err != nil {
			return nil, err
		}
		d = append(d, fmt.Sprintf("sysctl: net.ipv4.conf.%s.rp_filter = %s", n, v))
	}
	slices.Sort(d)
	return d, nil
}

// Diff returns the lines only in d (removed) and only in other (added).
func (d Dump) Diff(other Dump) (removed, added []string) {
	in := func(s []string, x string) bool { _, ok := slices.BinarySearch(s, x); return ok }
	for _, l := range d {
		if !in(other, l) {
			removed = append(removed, l)
		}
	}
	for _, l := range other {
		if !in(d, l) {
			added = append(added, l)
		}
	}
	return removed, added
}

// Grep returns the lines containing every one of words.
func (d Dump) Grep(words ...string) []string {
	var out []string
next:
	for _, l := range d {
		for _, w := range words {
			if !strings.Contains(l, w) {
				continue next
			}
		}
		out = append(out, l)
	}
	return out
}

func (d Dump) String() string { return strings.Join(d, "\n") }
