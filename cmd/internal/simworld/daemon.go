package simworld

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
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
	if err := os.MkdirAll(w.StateDir(), 0o755); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	return w.start(w.Instance, "dualhomed", w.opts.DualhomedBin, append([]string{"daemon"}, w.globalFlags()...)...)
}

// Dualhomed runs `dualhomed <args>` inside the instance (with the world's
// global flags) and returns its standard output; the error includes stderr
// and the exit status.
func (w *World) Dualhomed(ctx context.Context, args ...string) (string, error) {
	if err := os.MkdirAll(w.StateDir(), 0o755); err != nil {
		return "", fmt.Errorf("creating state directory: %w", err)
	}
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
// holds a default route through that ENI: what a VPC client needs to get its
// replies back. It is the kernel's view, not the daemon's word.
func (w *World) ConfiguredCheck(enis ...*ENI) error {
	h := w.Instance.NL
	for _, e := range enis {
		l, err := h.LinkByName(e.Link)
		if err != nil {
			return fmt.Errorf("%s: %w", e.Link, err)
		}
		addrs := append(e.IPv4s(), e.IPv6s()...)
		for _, a := range addrs {
			family := netlink.FAMILY_V4
			if a.Is6() {
				family = netlink.FAMILY_V6
			}
			rules, err := h.RuleList(family)
			if err != nil {
				return fmt.Errorf("listing rules: %w", err)
			}
			table := 0
			for _, r := range rules {
				if r.Src == nil || r.Protocol != Protocol {
					continue
				}
				p, ok := netipPrefix(r.Src)
				if ok && p.Contains(a) && p.Bits() > 0 {
					table = r.Table
					break
				}
			}
			if table == 0 {
				return fmt.Errorf("%s %s: no source rule of ours: %w", e.Link, a, errNotConfigured)
			}
			routes, err := h.RouteListFiltered(family, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return fmt.Errorf("listing table %d: %w", table, err)
			}
			found := false
			for _, r := range routes {
				if (r.Dst == nil || isDefault(r.Dst)) && r.LinkIndex == l.Attrs().Index {
					found = true
				}
			}
			if !found {
				return fmt.Errorf("%s %s: table %d has no default route via %s: %w", e.Link, a, table, e.Link, errNotConfigured)
			}
			// The address must be on the link too (secondary IPs are added by dualhomed).
			if !hasAddr(h, l, a) {
				return fmt.Errorf("%s %s: address not on the link: %w", e.Link, a, errNotConfigured)
			}
		}
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

func hasAddr(h *netlink.Handle, l netlink.Link, a netip.Addr) bool {
	as, err := h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return false
	}
	for _, x := range as {
		if p, ok := netipPrefix(x.IPNet); ok && p.Addr() == a {
			return true
		}
	}
	return false
}

func isDefault(n interface{ String() string }) bool {
	s := n.String()
	return s == "0.0.0.0/0" || s == "::/0"
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
