package netcfg

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
)

// Short constructors keep the test tables readable.

func desPfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func desIP(s string) netip.Addr    { return netip.MustParseAddr(s) }

func desPfxs(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, desPfx(s))
	}
	return out
}

// cfgPfxs are CIDRs as the configuration gives them, each placed at
// "test.yaml:<n>".
func cfgPfxs(ss ...string) []ConfigPrefix {
	var out []ConfigPrefix
	for i, p := range desPfxs(ss...) {
		out = append(out, ConfigPrefix{Prefix: p, At: fmt.Sprintf("test.yaml:%d", i+1)})
	}
	return out
}

func desIPs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, desIP(s))
	}
	return out
}

func desInt(i int) *int { return &i }

// macN is the MAC of test ENI n; link n+1 carries it (see linksFor).
func desMAC(n int) string { return fmt.Sprintf("0a:00:00:00:00:%02x", n) }

// linkNames names link n+1 "eth<n>".
func desNames(n int) map[int]string {
	m := map[int]string{}
	for i := range n {
		m[i+1] = fmt.Sprintf("eth%d", i)
	}
	return m
}

// linksFor returns links eth<n> (index n+1) for the given ENI numbers.
func desLinks(ns ...int) []Link {
	var out []Link
	for _, n := range ns {
		out = append(out, Link{Index: n + 1, Name: fmt.Sprintf("eth%d", n), MAC: desMAC(n)})
	}
	return out
}

// primaryENI is ENI 0 in vpc-a 10.0.0.0/16, subnet 10.0.0.0/24.
func desPrimary() imds.ENI {
	return imds.ENI{
		MAC: desMAC(0), Ready: true, InterfaceID: "eni-0", VPCID: "vpc-a", SubnetID: "subnet-a",
		SubnetIPv4CIDR: desPfx("10.0.0.0/24"), VPCIPv4CIDRs: desPfxs("10.0.0.0/16"),
		LocalIPv4s: desIPs("10.0.0.10"),
	}
}

// secondaryENI is ENI n (device n) in vpc-b 10.1.0.0/16, subnet 10.1.<n>.0/24,
// addresses 10.1.<n>.10 and 10.1.<n>.11.
func desSecondary(n int) imds.ENI {
	return imds.ENI{
		MAC: desMAC(n), Ready: true, DeviceNumber: n, InterfaceID: fmt.Sprintf("eni-%d", n),
		VPCID: "vpc-b", SubnetID: fmt.Sprintf("subnet-b%d", n),
		SubnetIPv4CIDR: desPfx(fmt.Sprintf("10.1.%d.0/24", n)), VPCIPv4CIDRs: desPfxs("10.1.0.0/16"),
		LocalIPv4s: desIPs(fmt.Sprintf("10.1.%d.10", n), fmt.Sprintf("10.1.%d.11", n)),
	}
}

// stateLines renders every object of st on one line, sorted, for comparison
// with the expectations of the table tests.
func desLines(st State, names map[int]string) []string {
	var out []string
	for _, r := range st.Routes {
		out = append(out, "route "+r.Format(names))
	}
	for _, r := range st.Rules {
		out = append(out, "rule "+r.String())
	}
	for _, a := range st.Addrs {
		out = append(out, "addr "+a.Format(names))
	}
	for _, f := range st.RPFilters {
		out = append(out, "sysctl "+f.String())
	}
	slices.Sort(out)
	return out
}

// diffLines reports the lines only in got and only in want.
func desDiff(t *testing.T, got, want []string) {
	t.Helper()
	want = slices.Clone(want)
	slices.Sort(want)
	if slices.Equal(got, want) {
		return
	}
	var b strings.Builder
	for _, g := range got {
		if !slices.Contains(want, g) {
			b.WriteString("\n  unexpected: " + g)
		}
	}
	for _, w := range want {
		if !slices.Contains(got, w) {
			b.WriteString("\n  missing:    " + w)
		}
	}
	if b.Len() == 0 {
		b.WriteString(fmt.Sprintf("\n  duplicates? got %q", got))
	}
	t.Errorf("state differs:%s", b.String())
}
