package main

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
)

// sysctlWrite is one sysctl a baseline sets (rp_filter of a managed link).
type sysctlWrite struct{ Key, Value string }

// baselineScript is what a baseline must do to reach the reference kernel
// state from the pristine one: the same objects dualhomed created, as
// iproute2 commands, in an order the kernel accepts (addresses, then on-link
// routes, then routes via a gateway, then rules).
type baselineScript struct {
	Commands []simworld.Command
	Sysctls  []sysctlWrite
	// IMDSPaths are the metadata paths dualhomed's client read for one
	// snapshot: the shell baseline fetches each with its own curl.
	IMDSPaths []string
}

// scriptFor derives the baseline script from two dumps: the objects that
// reference has and pristine has not. Routes the kernel creates by itself
// for addresses (proto kernel) are not commands: adding the address makes them.
// The addresses carry no protocol (many iproute2 versions cannot set one),
// and a baseline is compared with dualhomed's end state without them.
func scriptFor(pristine, reference simworld.State) baselineScript {
	var addrs, onLink, viaGW, rules []simworld.Command
	for _, k := range slices.Sorted(maps.Keys(reference.Addrs)) {
		if _, ok := pristine.Addrs[k]; ok {
			continue
		}
		addrs = append(addrs, reference.AddrCommand(reference.Addrs[k], false))
	}
	for _, k := range slices.Sorted(maps.Keys(reference.Routes)) {
		r := reference.Routes[k]
		if _, ok := pristine.Routes[k]; ok || r.Protocol == unix.RTPROT_KERNEL {
			continue
		}
		c := reference.RouteCommand(r)
		if r.Gw == nil {
			onLink = append(onLink, c)
		} else {
			viaGW = append(viaGW, c)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(reference.Rules)) {
		if _, ok := pristine.Rules[k]; ok {
			continue
		}
		rules = append(rules, reference.RuleCommand(reference.Rules[k]))
	}
	var s baselineScript
	s.Commands = slices.Concat(addrs, onLink, viaGW, rules)
	for _, k := range slices.Sorted(maps.Keys(reference.Sysctls)) {
		if pristine.Sysctls[k] != reference.Sysctls[k] {
			s.Sysctls = append(s.Sysctls, sysctlWrite{k, reference.Sysctls[k]})
		}
	}
	return s
}

// baselineRun is what one baseline run cost.
type baselineRun struct {
	Elapsed   time.Duration
	IMDS      time.Duration // part of Elapsed spent in curl
	Processes int
	Writes    int // objects created (commands run) plus sysctls written
}

// baselineRuns are the runs of one baseline, and how its end state compares
// with dualhomed's.
type baselineRuns struct {
	Time, IMDS        series
	Processes, Writes int // of one run
	State             string
}

// shellBaseline does what shell-based tools do: one curl per IMDS key (a
// token PUT, then each key with the token), then one `ip` process per
// object and one `sysctl` per rp_filter value. Processes are started from
// Go one after the other; a real shell script also pays for its own
// interpreter, which is not counted here (in the baseline's favour).
func shellBaseline(ctx context.Context, s baselineScript) (baselineRun, error) {
	imdsBase := simworld.IMDSEndpoint
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
		if _, err := output(ctx, "ip", append([]string{c.Family()}, c.Args...)...); err != nil {
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

// batchBaseline is the floor of any tool that drives iproute2: all objects
// through `ip -batch` on standard input, one process per address family
// (ip rule needs -4/-6 and batch lines cannot carry it). The few rp_filter
// values are written directly, as such a tool would.
func batchBaseline(ctx context.Context, s baselineScript) (baselineRun, error) {
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
		if err := os.WriteFile("/proc/sys/"+strings.ReplaceAll(w.Key, ".", "/"), []byte(w.Value), 0o644); err != nil {
			return run, fmt.Errorf("writing %s: %w", w.Key, err)
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
