package main

import (
	"errors"
	"fmt"

	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// stateDiff lists what differs between two kernel states.
type stateDiff struct {
	OnlyA, OnlyB []string // canonical keys, with the kind in front
}

func (d stateDiff) Empty() bool { return len(d.OnlyA) == 0 && len(d.OnlyB) == 0 }

// Summary says how many objects differ and shows a few of them.
func (d stateDiff) Summary(nameA, nameB string) string {
	if d.Empty() {
		return "identical"
	}
	show := func(keys []string) string {
		if len(keys) > 4 {
			return strings.Join(keys[:4], "; ") + fmt.Sprintf("; … (%d more)", len(keys)-4)
		}
		return strings.Join(keys, "; ")
	}
	var parts []string
	if len(d.OnlyA) > 0 {
		parts = append(parts, fmt.Sprintf("%d only in %s: %s", len(d.OnlyA), nameA, show(d.OnlyA)))
	}
	if len(d.OnlyB) > 0 {
		parts = append(parts, fmt.Sprintf("%d only in %s: %s", len(d.OnlyB), nameB, show(d.OnlyB)))
	}
	return strings.Join(parts, "; ")
}

// compareStates compares two states, line by line of their dumps.
func compareStates(a, b simworld.State) stateDiff {
	onlyA, onlyB := a.Dump().Diff(b.Dump())
	return stateDiff{onlyA, onlyB}
}

// resetKernel deletes every rule, route, address and altname of the namespace that
// pristine does not have and restores the rp_filter values, so that the next
// run starts from the same empty kernel. It returns an error if the result
// differs.
func resetKernel(ns *simworld.NS, pristine simworld.State) error {
	h := ns.NL
	// dualhomed's altnames, which State does not list: the pristine links have none.
	links, err := h.LinkList()
	if err != nil {
		return fmt.Errorf("listing links: %w", err)
	}
	for _, l := range links {
		for _, n := range l.Attrs().AltNames {
			if err := h.LinkDelAltName(l, n); err != nil {
				return fmt.Errorf("deleting altname %s of %s: %w", n, l.Attrs().Name, err)
			}
		}
	}
	for attempt := 0; ; attempt++ {
		cur, err := simworld.ReadState(ns)
		if err != nil {
			return err
		}
		d := compareStates(pristine, cur)
		if d.Empty() {
			return nil
		}
		if attempt == 3 {
			return fmt.Errorf("kernel state differs from the pristine one after reset: %s", d.Summary("pristine", "now"))
		}
		for k, r := range cur.Rules {
			if _, ok := pristine.Rules[k]; !ok {
				if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
					return fmt.Errorf("deleting rule %s: %w", k, err)
				}
			}
		}
		for k, r := range cur.Routes {
			if _, ok := pristine.Routes[k]; !ok && r.Protocol != unix.RTPROT_KERNEL {
				if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
					return fmt.Errorf("deleting route %s: %w", k, err)
				}
			}
		}
		for k, a := range cur.Addrs {
			if _, ok := pristine.Addrs[k]; ok {
				continue
			}
			link, err := h.LinkByIndex(a.LinkIndex)
			if err != nil {
				continue // the link went away, and the address with it
			}
			na, _ := netlink.ParseAddr(a.Prefix.String())
			if err := h.AddrDel(link, na); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("deleting address %s: %w", k, err)
			}
		}
		for k, v := range pristine.Sysctls {
			if cur.Sysctls[k] != v {
				if err := ns.SetSysctl(strings.ReplaceAll(k, ".", "/"), v); err != nil {
					return err
				}
			}
		}
	}
}
