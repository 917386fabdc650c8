package main

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ipCommand is one iproute2 command: `ip -4|-6 <Args...>`. ip rule cannot
// infer the family from the address, so every command carries it.
type ipCommand struct {
	V6   bool
	Args []string
}

func (c ipCommand) familyFlag() string {
	if c.V6 {
		return "-6"
	}
	return "-4"
}

func (c ipCommand) String() string { return "ip " + c.familyFlag() + " " + strings.Join(c.Args, " ") }

// sysctlWrite is one sysctl a baseline sets (rp_filter of a managed link).
type sysctlWrite struct{ Key, Value string }

// baselineScript is what a baseline must do to reach the reference kernel
// state from the pristine one: the same objects dualhomed created, as
// iproute2 commands, in an order the kernel accepts (addresses, then on-link
// routes, then routes via a gateway, then rules).
type baselineScript struct {
	Commands []ipCommand
	Sysctls  []sysctlWrite
	// IMDSPaths are the metadata paths dualhomed's client read for one
	// snapshot: the shell baseline fetches each with its own curl.
	IMDSPaths []string
}

// scriptFor derives the baseline script from two dumps: the objects that
// reference has and pristine has not. Routes the kernel creates by itself
// for addresses (proto kernel) are not commands: adding the address makes them.
// addrProto says whether `ip addr add … proto N` is available.
func scriptFor(pristine, reference kernelState, addrProto bool) (baselineScript, error) {
	var addrs, onLink, viaGW, rules []ipCommand
	for _, k := range sortedKeys(reference.Addrs) {
		if _, ok := pristine.Addrs[k]; ok {
			continue
		}
		addrs = append(addrs, addrCommand(reference, reference.Addrs[k], addrProto))
	}
	for _, k := range sortedKeys(reference.Routes) {
		r := reference.Routes[k]
		if _, ok := pristine.Routes[k]; ok || r.Protocol == unix.RTPROT_KERNEL {
			continue
		}
		c, err := routeCommand(reference, r)
		if err != nil {
			return baselineScript{}, err
		}
		if r.Gw == nil {
			onLink = append(onLink, c)
		} else {
			viaGW = append(viaGW, c)
		}
	}
	for _, k := range sortedKeys(reference.Rules) {
		if _, ok := pristine.Rules[k]; ok {
			continue
		}
		rules = append(rules, ruleCommand(reference.Rules[k]))
	}
	var s baselineScript
	s.Commands = slices.Concat(addrs, onLink, viaGW, rules)
	for _, k := range sortedKeys(reference.Sysctls) {
		if pristine.Sysctls[k] != reference.Sysctls[k] {
			s.Sysctls = append(s.Sysctls, sysctlWrite{k, reference.Sysctls[k]})
		}
	}
	return s, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func addrCommand(s kernelState, a kernelAddr, withProto bool) ipCommand {
	args := []string{"addr", "add", a.Prefix.String(), "dev", s.linkName(a.LinkIndex)}
	if a.Broadcast.IsValid() {
		args = append(args, "broadcast", a.Broadcast.String())
	}
	if a.Scope != unix.RT_SCOPE_UNIVERSE {
		args = append(args, "scope", strconv.Itoa(int(a.Scope)))
	}
	for _, f := range []struct {
		bit  uint32
		word string
	}{
		{unix.IFA_F_NOPREFIXROUTE, "noprefixroute"},
		{unix.IFA_F_NODAD, "nodad"},
		{unix.IFA_F_HOMEADDRESS, "home"},
		{unix.IFA_F_MANAGETEMPADDR, "mngtmpaddr"},
	} {
		if a.Flags&f.bit != 0 {
			args = append(args, f.word)
		}
	}
	if withProto && a.Proto != 0 {
		args = append(args, "proto", strconv.Itoa(int(a.Proto)))
	}
	return ipCommand{V6: a.Prefix.Addr().Is6(), Args: args}
}

var routeTypes = map[int]string{
	unix.RTN_LOCAL: "local", unix.RTN_BROADCAST: "broadcast", unix.RTN_ANYCAST: "anycast",
	unix.RTN_MULTICAST: "multicast", unix.RTN_BLACKHOLE: "blackhole", unix.RTN_UNREACHABLE: "unreachable",
	unix.RTN_PROHIBIT: "prohibit", unix.RTN_THROW: "throw",
}

func routeCommand(s kernelState, r netlink.Route) (ipCommand, error) {
	if len(r.MultiPath) > 0 {
		return ipCommand{}, fmt.Errorf("route %s: multipath routes are not scripted", s.routeKey(r))
	}
	v6 := r.Family == netlink.FAMILY_V6
	args := []string{"route", "add"}
	if t, ok := routeTypes[r.Type]; ok {
		args = append(args, t)
	}
	dst := "default"
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	args = append(args, dst)
	if r.Gw != nil {
		args = append(args, "via", r.Gw.String())
	}
	if r.LinkIndex > 0 {
		args = append(args, "dev", s.linkName(r.LinkIndex))
	}
	if r.Src != nil {
		args = append(args, "src", r.Src.String())
	}
	args = append(args, "table", strconv.Itoa(r.Table), "proto", strconv.Itoa(int(r.Protocol)))
	if !v6 { // IPv6 routes have no scope
		args = append(args, "scope", strconv.Itoa(int(r.Scope)))
	}
	if r.Priority != 0 {
		args = append(args, "metric", strconv.Itoa(r.Priority))
	}
	if r.MTU != 0 {
		args = append(args, "mtu", strconv.Itoa(r.MTU))
	}
	if r.Flags&unix.RTNH_F_ONLINK != 0 {
		args = append(args, "onlink")
	}
	return ipCommand{V6: v6, Args: args}, nil
}

func ruleCommand(r netlink.Rule) ipCommand {
	args := []string{"rule", "add"}
	if r.Invert {
		args = append(args, "not")
	}
	args = append(args, "from", ipnetString(r.Src))
	if r.Dst != nil {
		args = append(args, "to", r.Dst.String())
	}
	if r.IifName != "" {
		args = append(args, "iif", r.IifName)
	}
	if r.OifName != "" {
		args = append(args, "oif", r.OifName)
	}
	if r.Mark != 0 || r.Mask != nil {
		m := fmt.Sprintf("%#x", r.Mark)
		if r.Mask != nil {
			m += fmt.Sprintf("/%#x", *r.Mask)
		}
		args = append(args, "fwmark", m)
	}
	if r.Tos != 0 {
		args = append(args, "tos", strconv.Itoa(int(r.Tos)))
	}
	if r.Goto >= 0 {
		args = append(args, "goto", strconv.Itoa(r.Goto))
	} else {
		args = append(args, "lookup", strconv.Itoa(r.Table))
	}
	if r.SuppressPrefixlen >= 0 {
		args = append(args, "suppress_prefixlength", strconv.Itoa(r.SuppressPrefixlen))
	}
	args = append(args, "pref", strconv.Itoa(r.Priority), "protocol", strconv.Itoa(int(r.Protocol)))
	return ipCommand{V6: r.Family == netlink.FAMILY_V6, Args: args}
}

// baselineRun is what one baseline run cost.
type baselineRun struct {
	Elapsed   time.Duration
	IMDS      time.Duration // part of Elapsed spent in curl
	Processes int
	Writes    int // objects created (commands run) plus sysctls written
}

// runShellBaseline does what shell-based tools do: one curl per IMDS key
// (a token PUT, then each key with the token), then one `ip` process per
// object and one `sysctl` per rp_filter value. Processes are started from
// Go one after the other; a real shell script also pays for its own
// interpreter, which is not counted here (in the baseline's favour).
func runShellBaseline(ctx context.Context, s baselineScript, imdsBase string) (baselineRun, error) {
	var run baselineRun
	start := time.Now()
	token, err := output(ctx, "curl", "-sS", "-f", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 21600", imdsBase+"/latest/api/token")
	if err != nil {
		return run, fmt.Errorf("getting an IMDS token with curl: %w", err)
	}
	run.Processes++
	for _, p := range s.IMDSPaths {
		// No -f: a 404 for an absent optional key is an answer, as for the tools we mimic.
		if _, err := output(ctx, "curl", "-sS", "-H", "X-aws-ec2-metadata-token: "+strings.TrimSpace(token), imdsBase+p); err != nil {
			return run, fmt.Errorf("reading %s with curl: %w", p, err)
		}
		run.Processes++
	}
	run.IMDS = time.Since(start)
	for _, c := range s.Commands {
		if _, err := output(ctx, "ip", append([]string{c.familyFlag()}, c.Args...)...); err != nil {
			return run, fmt.Errorf("running %s: %w", c, err)
		}
		run.Processes++
		run.Writes++
	}
	for _, w := range s.Sysctls {
		if _, err := output(ctx, "sysctl", "-q", "-w", w.Key+"="+w.Value); err != nil {
			return run, err
		}
		run.Processes++
		run.Writes++
	}
	run.Elapsed = time.Since(start)
	return run, nil
}

// runBatchBaseline is the floor of any tool that drives iproute2: all
// objects through `ip -batch` on standard input, one process per address
// family (ip rule needs -4/-6 and batch lines cannot carry it). The few
// rp_filter values are written directly, as such a tool would.
func runBatchBaseline(ctx context.Context, s baselineScript) (baselineRun, error) {
	var run baselineRun
	var v4, v6 bytes.Buffer
	start := time.Now()
	for _, c := range s.Commands {
		buf := &v4
		if c.V6 {
			buf = &v6
		}
		buf.WriteString(strings.Join(c.Args, " "))
		buf.WriteByte('\n')
		run.Writes++
	}
	for _, b := range []struct {
		flag  string
		input *bytes.Buffer
	}{{"-4", &v4}, {"-6", &v6}} {
		if b.input.Len() == 0 {
			continue
		}
		cmd := exec.CommandContext(ctx, "ip", b.flag, "-batch", "-")
		cmd.Stdin = b.input
		if out, err := cmd.CombinedOutput(); err != nil {
			return run, fmt.Errorf("running ip %s -batch: %w: %s", b.flag, err, bytes.TrimSpace(out))
		}
		run.Processes++
	}
	for _, w := range s.Sysctls {
		if err := writeSysctl(w.Key, w.Value); err != nil {
			return run, err
		}
		run.Writes++
	}
	run.Elapsed = time.Since(start)
	return run, nil
}

func output(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%w: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	return string(out), nil
}

// iproute2AddrProto reports whether this iproute2 can set an address's
// protocol (`ip addr add … proto N`), by trying it on a throwaway address of
// lo that is deleted again.
func iproute2AddrProto(ctx context.Context) bool {
	probe := netip.MustParsePrefix("127.255.255.254/32")
	if _, err := output(ctx, "ip", "addr", "add", probe.String(), "dev", "lo", "proto", "210"); err != nil {
		return false
	}
	_, _ = output(ctx, "ip", "addr", "del", probe.String(), "dev", "lo")
	return true
}
