package netcfg

import (
	"net/netip"
	"strings"
	"testing"
)

func TestConflictsReportsForeignStateAndChangesNothing(t *testing.T) {
	w := newKTWorld(t)
	w.placeForeign(t) // ec2-net-utils' rule 10001 for 10.1.0.11, foreign routes in tables 20001 and 20077
	for _, args := range [][]string{
		{"rule", "add", "priority", "50", "from", "10.1.0.12", "lookup", "101"},                          // cloud-init/netplan
		{"rule", "add", "priority", "40", "from", "all", "lookup", "main", "suppress_prefixlength", "0"}, // wg-quick: harmless
		{"rule", "add", "priority", "60", "from", "all", "fwmark", "0x1", "lookup", "300"},               // narrowed by a mark
		{"rule", "add", "priority", "70", "from", "10.1.0.0/16", "to", "10.99.0.0/16", "lookup", "300"},  // narrowed by a destination
		{"rule", "add", "priority", "30000", "from", "10.1.0.12", "lookup", "400"},                       // after ours
		{"route", "add", "default", "via", "10.1.0.1", "dev", "eth1", "metric", "50"},                    // main default through a secondary, preferred
		{"route", "add", "default", "via", "172.31.5.1", "dev", "eth3", "metric", "300"},                 // a fallback only: harmless
		{"route", "add", "default", "via", "10.0.0.1", "dev", "eth0", "table", "10001"},
		// Blocks our main-table route to VPC C: same destination, metric 0.
		{"route", "add", "172.31.0.0/16", "via", "10.0.0.1", "dev", "eth0", "proto", "static"},
		// Tailscale-like: a table without a default route, lookups fall through it.
		{"rule", "add", "priority", "5270", "from", "all", "lookup", "52"},
		{"route", "add", "100.64.0.0/10", "dev", "eth0", "table", "52"},
		// A from-all rule to a table with a default route swallows everything.
		{"-6", "rule", "add", "priority", "5300", "from", "all", "lookup", "53"},
		{"-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0", "table", "53"},
	} {
		w.ip(t, args...)
	}
	desired := w.state(ktEth1, ktEth2, ktEth3)
	before := w.dump(t)
	warns := Conflicts(w.observe(t), desired, DefaultConfig())
	ktRequireEqual(t, w.dump(t), before)

	var got []string
	for _, wn := range warns {
		got = append(got, wn.String())
	}
	all := strings.Join(got, "\n")
	t.Logf("warnings:\n%s", all)
	for _, want := range []string{
		"0a:00:00:00:01:01: foreign rule `10001: from 10.1.0.11/32 lookup 10001` (protocol 0) takes precedence over ours (priority 20001) for 10.1.0.11/32",
		"amazon-ec2-net-utils",
		"`systemctl mask policy-routes@.service refresh-policy-routes@.service refresh-policy-routes@.timer`",
		"0a:00:00:00:01:01: foreign rule `50: from 10.1.0.12/32 lookup 101`",
		"cloud-init/netplan",
		"0a:00:00:00:01:01: main table has a default route through secondary ENI",
		"`[Match] MACAddress=0a:00:00:00:01:01` + `[DHCPv4] UseGateway=no`; netplan `dhcp4-overrides: {use-routes: false}`; NetworkManager `nmcli connection modify <its connection> ipv4.never-default yes`",
		"table 20001, in dualhomed's band, holds foreign routes: 192.0.2.0/24 (protocol 4), 2001:db8:1::/64 (protocol 4)",
		"table 20077, in dualhomed's band, holds foreign routes: 0.0.0.0/0 (protocol 3)",
		"foreign rule `5300: from all lookup 53` (protocol 0) takes precedence over ours (priority 20001) for 2600:1f18:b::11/128",
		"`ip -6 rule del priority 5300 lookup 53`",
		"0a:00:00:00:01:03: foreign main-table route to 172.31.0.0/16 (via 10.0.0.1, link #2, protocol 4) has the metric of ours",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("no warning containing %q", want)
		}
	}
	for _, notWant := range []string{"lookup main", "lookup 300", "lookup 400", "lookup 20001`", "lookup 20150", "lookup 52`", "eth0", "systemd-networkd is running", "via 172.31.5.1, metric 300", "dnf remove"} {
		if strings.Contains(all, notWant) {
			t.Errorf("unexpected warning containing %q", notWant)
		}
	}
	if len(warns) != 7 {
		t.Errorf("%d warnings, want 7", len(warns))
	}
	// Only the foreign main-table route holds the place of one of ours.
	var blocked []Route
	for _, wn := range warns {
		blocked = append(blocked, wn.Blocks...)
	}
	if len(blocked) != 1 || blocked[0].Table != MainTable || blocked[0].Dst != netip.MustParsePrefix("172.31.0.0/16") {
		t.Errorf("routes the conflicts block: %v, want only our main-table route to 172.31.0.0/16", blocked)
	}
	for _, wn := range warns {
		if wn.Hint == "" {
			t.Errorf("warning without a hint: %s", wn.Message)
		}
	}
}

func TestConflictsQuietOnACleanInstance(t *testing.T) {
	w := newKTWorld(t)
	desired := w.state(ktEth1, ktEth2, ktEth3)
	w.reconcile(t, desired)
	if warns := Conflicts(w.observe(t), desired, DefaultConfig()); len(warns) != 0 {
		t.Errorf("warnings on an instance with only our state: %v", warns)
	}
}
