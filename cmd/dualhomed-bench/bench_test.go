package main

import (
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

func ms(v ...float64) series {
	var s series
	for _, x := range v {
		s = append(s, time.Duration(x*float64(time.Millisecond)))
	}
	return s
}

func TestSeriesStatistics(t *testing.T) {
	tests := []struct {
		name                string
		s                   series
		median, p50, p95    time.Duration
		minimum, maximum    time.Duration
		wantRange, wantPcts string
	}{
		{
			name: "odd", s: ms(5, 1, 3),
			median: 3 * time.Millisecond, p50: 3 * time.Millisecond, p95: 5 * time.Millisecond,
			minimum: time.Millisecond, maximum: 5 * time.Millisecond,
			wantRange: "3.00 ms (1.00 ms–5.00 ms)",
		},
		{
			name: "even median is the mean of the middle two", s: ms(4, 1, 2, 3),
			median: 2500 * time.Microsecond, p50: 2 * time.Millisecond, p95: 4 * time.Millisecond,
			minimum: time.Millisecond, maximum: 4 * time.Millisecond,
		},
		{
			name: "p95 of 20 is the 19th", s: ms(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 200),
			median: 10500 * time.Microsecond, p50: 10 * time.Millisecond, p95: 19 * time.Millisecond,
			minimum: time.Millisecond, maximum: 200 * time.Millisecond,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.s.median(); got != tt.median {
				t.Errorf("median = %v, want %v", got, tt.median)
			}
			if got := tt.s.quantile(0.5); got != tt.p50 {
				t.Errorf("p50 = %v, want %v", got, tt.p50)
			}
			if got := tt.s.quantile(0.95); got != tt.p95 {
				t.Errorf("p95 = %v, want %v", got, tt.p95)
			}
			if tt.s.min() != tt.minimum || tt.s.max() != tt.maximum {
				t.Errorf("min, max = %v, %v, want %v, %v", tt.s.min(), tt.s.max(), tt.minimum, tt.maximum)
			}
			if tt.wantRange != "" && tt.s.medianRange() != tt.wantRange {
				t.Errorf("medianRange = %q, want %q", tt.s.medianRange(), tt.wantRange)
			}
		})
	}
	if got := series(nil).medianRange(); got != "—" {
		t.Errorf("empty medianRange = %q", got)
	}
}

func TestFmtDurAndRatio(t *testing.T) {
	for d, want := range map[time.Duration]string{
		840 * time.Microsecond:  "0.840 ms",
		4500 * time.Microsecond: "4.50 ms",
		123 * time.Millisecond:  "123.0 ms",
		7830 * time.Millisecond: "7.83 s",
	} {
		if got := fmtDur(d); got != want {
			t.Errorf("fmtDur(%v) = %q, want %q", d, got, want)
		}
	}
	if got := ratio(7830*time.Millisecond, 150*time.Millisecond); got != "52.20×" {
		t.Errorf("ratio = %q", got)
	}
	if got := ratio(0, time.Second); got != "—" {
		t.Errorf("ratio with a missing figure = %q", got)
	}
}

// The bound must allow what the daemon's documented backoff allows, and no
// more than a few requests per second.
func TestFaultBound(t *testing.T) {
	// 10 s: reads at 0 (under way), 0 (reload), 1, 3, 7 s: 5 snapshots of 3 attempts.
	if got := faultBound(10 * time.Second); got != 15 {
		t.Errorf("faultBound(10s) = %v, want 15", got)
	}
	if got := faultBound(60 * time.Second); got/60 > 1 {
		t.Errorf("faultBound(60s) = %v: more than 1 request/s on average", got)
	}
}

// The script adds only what the reference has beyond the pristine state,
// addresses before routes before rules, on-link routes before gateway ones,
// and never the routes the kernel makes for addresses.
func TestScriptForOrdersAndFilters(t *testing.T) {
	pristine := simworld.State{LinkNames: map[int]string{3: "eth1"}, Rules: map[string]netlink.Rule{}, Routes: map[string]netlink.Route{},
		Addrs: map[string]simworld.Addr{}, Sysctls: map[string]string{"net.ipv4.conf.eth1.rp_filter": "0"}}
	ref := simworld.State{LinkNames: pristine.LinkNames, Rules: map[string]netlink.Rule{}, Routes: map[string]netlink.Route{},
		Addrs: map[string]simworld.Addr{}, Sysctls: map[string]string{"net.ipv4.conf.eth1.rp_filter": "2"}}
	rule := *netlink.NewRule()
	rule.Family, rule.Priority, rule.Table, rule.Protocol = netlink.FAMILY_V4, 20001, 20001, 210
	rule.Src = &net.IPNet{IP: net.ParseIP("10.1.0.10").To4(), Mask: net.CIDRMask(32, 32)}
	ref.Rules[ref.RuleCommand(rule).String()] = rule
	gwRoute := netlink.Route{Family: netlink.FAMILY_V4, Table: 20001, Type: unix.RTN_UNICAST, Protocol: 210, Gw: net.ParseIP("10.1.0.1").To4(), LinkIndex: 3}
	linkRoute := netlink.Route{Family: netlink.FAMILY_V4, Table: 20001, Type: unix.RTN_UNICAST, Protocol: 210, LinkIndex: 3, Scope: netlink.SCOPE_LINK,
		Dst: &net.IPNet{IP: net.ParseIP("10.1.0.0").To4(), Mask: net.CIDRMask(20, 32)}}
	kernelRoute := netlink.Route{Family: netlink.FAMILY_V4, Table: 255, Type: unix.RTN_LOCAL, Protocol: unix.RTPROT_KERNEL, LinkIndex: 3,
		Dst: &net.IPNet{IP: net.ParseIP("10.1.0.10").To4(), Mask: net.CIDRMask(32, 32)}}
	for _, r := range []netlink.Route{gwRoute, linkRoute, kernelRoute} {
		ref.Routes[ref.RouteCommand(r).String()] = r
	}
	a := simworld.Addr{LinkIndex: 3, Prefix: netip.MustParsePrefix("10.1.0.10/20"), Proto: 210}
	ref.Addrs[ref.AddrCommand(a, true).String()] = a

	script := scriptFor(pristine, ref)
	var got []string
	for _, c := range script.Commands {
		got = append(got, strings.Join(c.Args[:2], " ")+" "+c.Args[2])
	}
	want := []string{"addr add 10.1.0.10/20", "route add 10.1.0.0/20", "route add default", "rule add from"}
	if strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Errorf("commands = %q, want %q", got, want)
	}
	if len(script.Sysctls) != 1 || script.Sysctls[0] != (sysctlWrite{"net.ipv4.conf.eth1.rp_filter", "2"}) {
		t.Errorf("sysctls = %v", script.Sysctls)
	}
}

// newLinkMessage is an RTM_NEWLINK notification of a link with the given
// name and MAC, as the kernel sends it.
func newLinkMessage(name string, mac net.HardwareAddr) syscall.NetlinkMessage {
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	data := msg.Serialize()
	data = append(data, nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(name)).Serialize()...)
	data = append(data, nl.NewRtAttr(unix.IFLA_ADDRESS, mac).Serialize()...)
	return syscall.NetlinkMessage{Header: syscall.NlMsghdr{Type: unix.RTM_NEWLINK}, Data: data}
}

func TestLinkArrivalMatchesTheNewMAC(t *testing.T) {
	w := &watcher{rules: map[string]bool{}, links: map[string]bool{}}
	want, _ := net.ParseMAC("02:00:00:01:00:07")
	old, _ := net.ParseMAC("02:00:00:00:00:0e")
	arrived := w.expectLink(want)

	// The detached ENI's link, same name, old MAC: not the arrival.
	w.handleLocked(newLinkMessage("eth14", old))
	w.wakeLocked(time.Unix(1, 0))
	select {
	case <-arrived:
		t.Fatal("a link with another MAC counted as the arrival")
	default:
	}

	w.handleLocked(newLinkMessage("eth14", want))
	w.wakeLocked(time.Unix(2, 0))
	w.handleLocked(newLinkMessage("eth14", want)) // set up: a second RTM_NEWLINK
	w.wakeLocked(time.Unix(3, 0))
	select {
	case got := <-arrived:
		if !got.Equal(time.Unix(2, 0)) {
			t.Errorf("arrival at %v, want the first notification's time %v", got, time.Unix(2, 0))
		}
	default:
		t.Fatal("the link's RTM_NEWLINK was not seen as its arrival")
	}
	if len(w.waiters) != 0 {
		t.Errorf("%d link waiters left after the arrival", len(w.waiters))
	}
}

// The NAT's rows come from BenchmarkNAT's lines of the Go benchmarks' output.
func TestNATRows(t *testing.T) {
	out := "BenchmarkNAT/conns/dualhomed-2         \t   10000\t    506533 ns/op\t      1974 conns/s\n" +
		"BenchmarkNAT/throughput/dualhomed-2    \t     656\t   5497407 ns/op\t 190.74 MB/s\n" +
		"BenchmarkNAT/conns/hand-written-2      \t    5113\t    685870 ns/op\t      1458 conns/s\n" +
		"BenchmarkNAT/throughput/hand-written-2 \t    1508\t   2774711 ns/op\t 377.90 MB/s\n"
	rows := natRows(out)
	if len(rows) != 2 || rows[0].Dualhomed != "1974 conns/s" || !strings.Contains(rows[0].Ratios, "1458 conns/s; dualhomed/hand-written 1.35") ||
		rows[0].Result != "pass" || rows[1].Dualhomed != "191 MB/s" || rows[1].Result != "**FAIL**" {
		t.Errorf("rows %+v", rows)
	}
	if rows := natRows(""); rows != nil {
		t.Errorf("rows without output: %+v", rows)
	}
}
