package simworld

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
)

// Protocol is the rtnetlink protocol byte dualhomed marks its objects with
// (netcfg.DefaultProtocol; the world runs dualhomed with the defaults).
const Protocol = 210

// DaemonOptions configure the dualhomed daemon of the world.
type DaemonOptions struct {
	// PollInterval is the IMDS poll timer (config key poll_interval; >= 1s).
	PollInterval time.Duration
	// ExtraConfig is appended to the YAML configuration file.
	ExtraConfig string
}

// ConfigPath and StateDir are the files the world gives dualhomed.
func (w *World) ConfigPath() string { return filepath.Join(w.Dir, "dualhomed.yaml") }
func (w *World) StateDir() string   { return filepath.Join(w.Dir, "state") }

// WriteConfig writes dualhomed's configuration file.
func (w *World) WriteConfig(o DaemonOptions) error {
	var b strings.Builder
	if o.PollInterval > 0 {
		fmt.Fprintf(&b, "poll_interval: %s\n", o.PollInterval)
	}
	b.WriteString(o.ExtraConfig)
	if err := os.WriteFile(w.ConfigPath(), []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("writing dualhomed configuration: %w", err)
	}
	return nil
}

// globalFlags point dualhomed at the world's emulator, config and state.
func (w *World) globalFlags() []string {
	return []string{"--config", w.ConfigPath(), "--imds-endpoint", IMDSEndpoint, "--state-dir", w.StateDir()}
}

// StartDaemon writes the configuration and runs `dualhomed daemon` inside the
// instance, logging as under systemd (JSON). Use WaitConfigured to know when
// it has done its work.
func (w *World) StartDaemon(o DaemonOptions) (*Proc, error) {
	if err := w.WriteConfig(o); err != nil {
		return nil, err
	}
	return w.start(w.Instance, "dualhomed", w.opts.DualhomedBin, append([]string{"daemon"}, w.globalFlags()...)...)
}

// Dualhomed runs `dualhomed <args>` inside the instance (with the world's
// global flags) and returns its standard output; the error includes stderr
// and the exit status.
func (w *World) Dualhomed(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := w.Instance.Command(ctx, w.opts.DualhomedBin, append(args, append(w.globalFlags(), "--log-format", "console")...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("dualhomed %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// ExitCode returns the exit status inside an error of Dualhomed (-1 if none).
func ExitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// Signal sends sig to the program.
func (p *Proc) Signal(sig syscall.Signal) error { return p.cmd.Process.Signal(sig) }

// ConfiguredCheck returns nil when every address of every attached secondary
// ENI has one of our source rules (protocol 210) pointing at a table that
// holds a default route through that ENI, and is on the ENI's link: what a
// VPC client needs to get its replies back. It is the kernel's view, not
// the daemon's word.
func (w *World) ConfiguredCheck(enis ...*ENI) error {
	s, err := ReadState(w.Instance)
	if err != nil {
		return err
	}
	for _, e := range enis {
		for _, a := range append(e.IPv4s(), e.IPv6s()...) {
			if err := s.configured(e.Link, a); err != nil {
				return fmt.Errorf("%s %s: %w", e.Link, a, err)
			}
		}
	}
	return nil
}

// configured is ConfiguredCheck for one address a of link.
func (s State) configured(link string, a netip.Addr) error {
	table := 0
	for _, r := range s.Rules {
		if p, err := netip.ParsePrefix(r.Src.String()); err == nil && r.Protocol == Protocol && p.Bits() > 0 && p.Contains(a) {
			table = r.Table
			break
		}
	}
	if table == 0 {
		return errors.New("no source rule of ours")
	}
	if !slices.ContainsFunc(slices.Collect(maps.Values(s.Routes)), func(r netlink.Route) bool {
		dst, _ := netip.ParsePrefix(r.Dst.String()) // invalid (-1 bits) for no destination
		return r.Table == table && dst.Bits() <= 0 && s.linkName(r.LinkIndex) == link
	}) {
		return fmt.Errorf("table %d has no default route via %s", table, link)
	}
	if !slices.ContainsFunc(slices.Collect(maps.Values(s.Addrs)), func(x Addr) bool {
		return x.Prefix.Addr() == a && s.linkName(x.LinkIndex) == link
	}) {
		return errors.New("address not on the link")
	}
	return nil
}

// WaitConfigured waits until ConfiguredCheck passes for the ENIs, or the
// daemon exits, or ctx ends.
func (w *World) WaitConfigured(ctx context.Context, daemon *Proc, enis ...*ENI) error {
	return WaitFor(ctx, func() error {
		if daemon != nil {
			if done, err := daemon.Exited(); done {
				return errors.Join(ErrExited, err)
			}
		}
		return w.ConfiguredCheck(enis...)
	})
}

// OurRules lists the instance's policy rules that carry our protocol.
func (w *World) OurRules() ([]netlink.Rule, error) {
	rules, err := w.Instance.NL.RuleList(netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("listing rules: %w", err)
	}
	var ours []netlink.Rule
	for _, r := range rules {
		if r.Protocol == Protocol {
			ours = append(ours, r)
		}
	}
	return ours, nil
}
