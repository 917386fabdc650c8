package matrix

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// ifaProto is IFA_PROTO (linux/if_addr.h); iproute2 6.1 neither prints nor
// parses it, so addresses are dumped here with raw rtnetlink.
const ifaProto = 11

var volatileFields = regexp.MustCompile(`\s+(valid_lft|preferred_lft|expires|used|age)\s+\S+`)

// dump is a namespace's rules, routes (every table but local) and
// addresses, one object a line, sorted.
type dump []string

// ours reports whether a line is one of dualhomed's objects.
func ours(line string) bool {
	return strings.Contains(line, " proto 210") || strings.Contains(line, " proto dualhomed")
}

func dumpState(ns *simworld.NS) (dump, error) {
	var d dump
	for _, args := range [][]string{
		{"-4", "rule", "show"}, {"-6", "rule", "show"},
		{"-4", "route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"},
	} {
		out, err := ns.IP(args...)
		if err != nil {
			return nil, err
		}
		for _, line := range strings.Split(out, "\n") {
			line = strings.Join(strings.Fields(volatileFields.ReplaceAllString(line, "")), " ")
			if line == "" || strings.Contains(line, "table local") || strings.HasPrefix(line, "multicast ") {
				continue
			}
			d = append(d, args[0]+" "+args[1]+": "+line)
		}
	}
	addrs, err := dumpAddrs(ns)
	if err != nil {
		return nil, err
	}
	d = append(d, addrs...)
	slices.Sort(d)
	return d, nil
}

// dumpAddrs lists addresses as "addr: <link> <prefix> [dynamic] [noprefixroute] proto <n>".
func dumpAddrs(ns *simworld.NS) ([]string, error) {
	links, err := ns.NL.LinkList()
	if err != nil {
		return nil, err
	}
	names := map[uint32]string{}
	for _, l := range links {
		names[uint32(l.Attrs().Index)] = l.Attrs().Name
	}
	var rib []byte
	if err := ns.Do(func() (err error) { rib, err = syscall.NetlinkRIB(syscall.RTM_GETADDR, syscall.AF_UNSPEC); return err }); err != nil {
		return nil, fmt.Errorf("dumping addresses in %s: %w", ns.Name, err)
	}
	msgs, err := syscall.ParseNetlinkMessage(rib)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, m := range msgs {
		if m.Header.Type != syscall.RTM_NEWADDR || len(m.Data) < syscall.SizeofIfAddrmsg {
			continue
		}
		ifa := (*syscall.IfAddrmsg)(unsafePointer(m.Data))
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			continue
		}
		var addr netip.Addr
		var proto uint8
		flags := uint32(ifa.Flags)
		for _, a := range attrs {
			switch a.Attr.Type {
			case syscall.IFA_LOCAL:
				addr, _ = netip.AddrFromSlice(a.Value)
			case syscall.IFA_ADDRESS:
				if !addr.IsValid() {
					addr, _ = netip.AddrFromSlice(a.Value)
				}
			case ifaProto:
				if len(a.Value) > 0 {
					proto = a.Value[0]
				}
			case 8: // IFA_FLAGS
				if len(a.Value) >= 4 {
					flags = binary.NativeEndian.Uint32(a.Value)
				}
			}
		}
		if !addr.IsValid() || addr.IsLoopback() {
			continue
		}
		line := fmt.Sprintf("addr: %s %s", names[ifa.Index], netip.PrefixFrom(addr, int(ifa.Prefixlen)))
		if flags&0x80 == 0 { // IFA_F_PERMANENT
			line += " dynamic"
		}
		if flags&0x200 != 0 { // IFA_F_NOPREFIXROUTE
			line += " noprefixroute"
		}
		if proto != 0 {
			line += " proto " + strconv.Itoa(int(proto))
		}
		out = append(out, line)
	}
	return out, nil
}

// split separates dualhomed's objects from everybody else's.
func (d dump) split() (mine, theirs dump) {
	for _, l := range d {
		if ours(l) {
			mine = append(mine, l)
		} else {
			theirs = append(theirs, l)
		}
	}
	return mine, theirs
}

// without drops the lines that mention any of words (a link not in the
// baseline, say).
func (d dump) without(words ...string) dump {
	var out dump
next:
	for _, l := range d {
		for _, w := range words {
			if strings.Contains(l, w) {
				continue next
			}
		}
		out = append(out, l)
	}
	return out
}

// diff returns the lines only in d and only in other.
func (d dump) diff(other dump) (missing, extra []string) {
	for _, l := range d {
		if !slices.Contains(other, l) {
			missing = append(missing, l)
		}
	}
	for _, l := range other {
		if !slices.Contains(d, l) {
			extra = append(extra, l)
		}
	}
	return missing, extra
}

// addressSwaps takes from a diff the addresses that only changed hands
// between a DHCP client and dualhomed: the same prefix on the same link,
// dualhomed's copy on one side (daemon change #1). It returns them and the
// rest of the diff.
func addressSwaps(missing, extra []string) (swaps, restMissing, restExtra []string) {
	key := func(l string) string {
		if f := strings.Fields(l); len(f) >= 3 && f[0] == "addr:" {
			return f[1] + " " + f[2]
		}
		return ""
	}
	swapped := map[string]bool{}
	for _, m := range missing {
		for _, e := range extra {
			if k := key(m); k != "" && k == key(e) && ours(m) != ours(e) {
				swapped[k] = true
				swaps = append(swaps, m+" -> "+e)
			}
		}
	}
	for _, m := range missing {
		if !swapped[key(m)] {
			restMissing = append(restMissing, m)
		}
	}
	for _, e := range extra {
		if !swapped[key(e)] {
			restExtra = append(restExtra, e)
		}
	}
	return swaps, restMissing, restExtra
}

// metrics scrapes dualhomed's Prometheus endpoint (127.0.0.1:9810 inside the
// container) and returns the named counters; ok is false when it does not answer.
func metrics(ns *simworld.NS) (map[string]float64, bool) {
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return simworld.Dial(ctx, ns, netip.MustParseAddrPort(addr), 2*time.Second)
		},
		DisableKeepAlives: true,
	}}
	resp, err := client.Get("http://127.0.0.1:9810/metrics")
	if err != nil {
		return nil, false
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, false
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 && strings.HasPrefix(f[0], "dualhomed_") {
			v, _ := strconv.ParseFloat(f[1], 64)
			out[f[0]] += v
		}
	}
	return out, true
}

// echo gets one TCP round trip from a client to dst, retrying until timeout.
func echo(client *simworld.NS, dst netip.Addr, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := simworld.EchoOnce(client, netip.AddrPortFrom(dst, echoPort), time.Second)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}
