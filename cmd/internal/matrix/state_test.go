package matrix

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// The container's kernel state is read with simworld's reader: every rule,
// route, address (with its protocol), link and rp_filter value, one `ip`
// command a line ("ip -4 addr add 10.0.1.10/24 dev eth0 ... proto 210 #
// permanent"). The local table is left out: the kernel derives it from the
// addresses.
func dumpState(ns *simworld.NS) (simworld.Dump, error) {
	d, err := simworld.DumpState(ns)
	return slices.DeleteFunc(d, func(l string) bool { return strings.Contains(l, " table 255 ") }), err
}

// ours reports whether a line is one of dualhomed's objects.
func ours(line string) bool { return strings.Contains(line, " proto 210") }

// split separates dualhomed's objects from everybody else's.
func split(d simworld.Dump) (mine, theirs simworld.Dump) {
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
func without(d simworld.Dump, words ...string) simworld.Dump {
	return slices.DeleteFunc(slices.Clone(d), func(l string) bool {
		return slices.ContainsFunc(words, func(w string) bool { return strings.Contains(l, w) })
	})
}

// addrOf parses an address line: its link and prefix.
func addrOf(line string) (link, prefix string, ok bool) {
	f := strings.Fields(line)
	if len(f) >= 7 && f[2] == "addr" && f[3] == "add" && f[5] == "dev" {
		return f[6], f[4], true
	}
	return "", "", false
}

// addrLines returns the lines of ip (any prefix length) on link.
func addrLines(d simworld.Dump, link string, ip netip.Addr) []string {
	var out []string
	for _, l := range d {
		if ln, p, ok := addrOf(l); ok && ln == link && strings.HasPrefix(p, ip.String()+"/") {
			out = append(out, l)
		}
	}
	return out
}

// prefixRouteOf parses the kernel's route to an address's subnet
// ("ip -4 route add 10.0.1.0/24 dev eth0 src 10.0.1.10 table 254 proto 2 ...").
func prefixRouteOf(line string) (link, dst string, ok bool) {
	f := strings.Fields(line)
	if len(f) >= 7 && f[2] == "route" && f[3] == "add" && f[5] == "dev" && strings.Contains(line, " proto 2 ") {
		return f[6], f[4], true
	}
	return "", "", false
}

// addressSwaps takes from a diff the addresses that only changed hands
// between a DHCP client and dualhomed: the same prefix on the same link,
// dualhomed's copy on one side (daemon change #1). It returns them and the
// rest of the diff.
func addressSwaps(missing, extra []string) (swaps, restMissing, restExtra []string) {
	key := func(l string) string {
		if link, prefix, ok := addrOf(l); ok {
			return link + " " + prefix
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
