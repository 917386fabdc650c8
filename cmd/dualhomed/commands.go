package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
	"github.com/vishvananda/netns"

	"github.com/dualhomed/dualhomed/agent"
	"github.com/dualhomed/dualhomed/netcfg"
)

func daemonCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "daemon",
		Short: "Run the service: reconcile on netlink events, IMDS polls and SIGHUP",
		Long: `Run until SIGTERM. Reconciles on link, address, route and rule changes
(deletions of ours are repaired), on an IMDS poll timer and on SIGHUP (reload
the configuration; a bad file is rejected and the old one stays in force).
Talks to systemd (Type=notify: READY, STATUS, WATCHDOG, STOPPING). Stopping
leaves routes and rules in place.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := g.loadConfig()
			if err != nil {
				return err
			}
			log, level, err := agent.NewLogger(cfg.Log.Level, cfg.Log.Format)
			if err != nil {
				return err
			}
			defer func() { _ = log.Sync() }()
			d, err := agent.NewDaemon(agent.Options{
				ConfigPath:    g.configPath,
				Config:        cfg,
				Override:      g.override,
				NS:            netns.None(),
				Logger:        log,
				Level:         &level,
				NewSource:     agent.IMDSSource,
				Version:       version,
				HandleSignals: true,
			})
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return d.Run(ctx)
		},
	}
}

func applyCmd(g *globals) *cobra.Command {
	var wait time.Duration
	c := &cobra.Command{
		Use:   "apply",
		Short: "Reconcile once and exit (for cloud-init and image builds)",
		Long: `Read IMDS, bring the kernel in line once, and exit. With --wait, repeat
until every ENI listed in IMDS has a link and is configured, or the duration
passes: then exit 3 naming what is missing.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if wait < 0 {
				return usageError{errors.New("--wait must not be negative")}
			}
			return g.oneShot(func(cfg agent.Config, rec *agent.Reconciler) error {
				log, _, err := agent.NewLogger(cfg.Log.Level, cfg.Log.Format)
				if err != nil {
					return err
				}
				defer func() { _ = log.Sync() }()
				ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
				defer stop()
				rep, missing, err := agent.Apply(ctx, rec, wait, log)
				if err != nil {
					return err
				}
				if len(missing) > 0 {
					return exitCodeError{exitWaiting, fmt.Errorf("after %s, not configured: %s", wait, strings.Join(missing, "; "))}
				}
				fmt.Fprintln(cmd.OutOrStdout(), rep.Summary())
				return nil
			})
		},
	}
	c.Flags().DurationVar(&wait, "wait", 0, "wait up to this long (e.g. 2m) until every ENI in IMDS is configured")
	return c
}

func planCmd(g *globals) *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "plan",
		Short: "Show what a reconcile would change, and every warning; change nothing",
		Long: `Read IMDS and the kernel, and print the changes a reconcile would make in
ip(8) syntax ("+" add, "~" replace, "-" delete) with every warning.
Exit 0 when in sync, 2 when changes are pending, 1 on error.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.oneShot(func(_ agent.Config, rec *agent.Reconciler) error {
				rep, err := agent.Plan(cmd.Context(), rec)
				switch {
				case err != nil:
					return err
				case asJSON:
					err = agent.WritePlanJSON(cmd.OutOrStdout(), rep)
				default:
					agent.WritePlan(cmd.OutOrStdout(), rep)
				}
				if err == nil && len(rep.Changes) > 0 {
					return exitCodeError{code: exitPending}
				}
				return err
			})
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func statusCmd(g *globals) *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "status",
		Short: "Show every ENI: link, addresses, table, rule priority, state, warnings",
		Long: `Compute the status live from IMDS and the kernel (like plan), and add the
running daemon's health from <state-dir>/status.json when present. When IMDS
cannot be read live, show the daemon's last report from status.json instead,
say so and how old it is, and exit 4. States:
configured, drift (changes pending), waiting for link, waiting for IMDS,
excluded, primary, invalid.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.oneShot(func(cfg agent.Config, rec *agent.Reconciler) error {
				stale, err := agent.Status(cmd.Context(), cmd.OutOrStdout(), rec, cfg.StateDir, asJSON)
				if err == nil && stale {
					return exitCodeError{code: exitStale}
				}
				return err
			})
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func cleanupCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "cleanup",
		Short: "Remove everything dualhomed owns and restore what it changed",
		Long: `Delete every route, rule and address carrying dualhomed's protocol in its
bands and the NAT's nftables table (inet dualhomed), and restore the
rp_filter and ip_forward values it changed. Touches nothing else and does
not need IMDS. Stop the daemon first, or it puts everything back.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := g.loadConfig()
			if err != nil {
				return err
			}
			kernel, err := netcfg.NewKernel(netns.None(), cfg.StateDir, cfg.Netcfg)
			if err != nil {
				return err
			}
			defer kernel.Close()
			writes, err := kernel.Cleanup()
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed dualhomed's state (%d changes)\n", writes)
			return nil
		},
	}
}

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(cmd.OutOrStdout(), "dualhomed %s\n", version)
			return nil
		},
	}
}

// genManCmd writes man pages for every command (used by packaging).
func genManCmd(root *cobra.Command) *cobra.Command {
	return &cobra.Command{
		Use:    "gen-man DIR",
		Short:  "Write man pages into DIR",
		Hidden: true,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageError{errors.New("gen-man takes exactly one directory")}
			}
			return nil
		},
		RunE: func(_ *cobra.Command, args []string) error {
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return err
			}
			root.DisableAutoGenTag = true
			hdr := &doc.GenManHeader{Title: "DUALHOMED", Section: "1", Source: "dualhomed " + version, Manual: "dualhomed manual"}
			return doc.GenManTree(root, hdr, args[0])
		},
	}
}
