// Command dualhomed keeps source-based policy routing for the secondary
// (multi-VPC) ENIs of an EC2 instance. This package only parses flags and
// builds things; the logic lives in package agent.
package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netns"

	"github.com/dualhomed/dualhomed/agent"
	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/netcfg"
)

// version is set at build time: -ldflags "-X main.version=1.2.3".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// Exit codes, documented in --help and docs/cli.md.
const (
	exitOK      = 0
	exitError   = 1
	exitUsage   = 2 // bad flags or arguments
	exitPending = 2 // plan: changes are pending
	exitWaiting = 3 // apply --wait: some ENIs were still not configured
	exitStale   = 4 // status: IMDS could not be read live; the daemon's last report is shown
)

const exitCodesHelp = `Exit codes:
  0  success (plan: in sync)
  1  error: bad configuration, IMDS unreachable, netlink failure
  2  bad flags or arguments (usage is printed); plan: changes are pending
  3  apply --wait: time ran out with ENIs not configured (they are named)
  4  status: IMDS could not be read live; the daemon's last report is shown`

// globals are the flags every command shares.
type globals struct {
	configPath   string
	imdsEndpoint string
	logLevel     string
	logFormat    string
	stateDir     string
}

// usageError marks errors that print the usage and exit 2.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

// exitCodeError ends the program with code, printing err when set (run
// prints it, never Error).
type exitCodeError struct {
	code int
	err  error
}

func (e exitCodeError) Error() string { return fmt.Sprintf("exit status %d: %v", e.code, e.err) }

// run executes the command line and returns the process exit code.
func run(args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(context.Background())
	if err == nil {
		return exitOK
	}
	var ue usageError
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command") {
		fmt.Fprintf(stderr, "Error: %v\n\n%s", err, cmd.UsageString())
		return exitUsage
	}
	ce := exitCodeError{exitError, err} // unless err is an exitCodeError
	errors.As(err, &ce)
	if ce.err != nil {
		fmt.Fprintf(stderr, "Error: %v\n", ce.err)
	}
	return ce.code
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "dualhomed",
		Short: "Policy routing for secondary (multi-VPC) EC2 network interfaces",
		Long: `dualhomed keeps one routing table and source-based policy rules per
secondary ENI of an EC2 instance, so that replies leave through the ENI
they arrived on (IPv4 and IPv6, secondary IPs, delegated prefixes). It reads
the instance metadata service (IMDSv2) and watches the kernel over netlink.

It owns only objects carrying its protocol number (210 by default) in its
table and priority bands, and never touches anything else.

` + exitCodesHelp,
		Version:       version,
		SilenceErrors: true,
		SilenceUsage:  true,
		Args:          noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return usageError{errors.New("a command is required")}
		},
		PersistentPreRunE: func(*cobra.Command, []string) error { return g.validateFlags() },
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.SetHelpCommand(&cobra.Command{Hidden: true, Use: "no-help"}) // help is --help
	pf := root.PersistentFlags()
	pf.StringVar(&g.configPath, "config", agent.DefaultConfigPath, "configuration file (a missing file means defaults)")
	pf.StringVar(&g.imdsEndpoint, "imds-endpoint", "", "IMDS endpoint URL (default $"+imds.EnvEndpoint+", else "+imds.DefaultIPv4Endpoint+")")
	pf.StringVar(&g.logLevel, "log-level", "", "log level: debug, info, warn, error (default from the configuration: info)")
	pf.StringVar(&g.logFormat, "log-format", "", "log format: json or console (default: console on a terminal, json otherwise)")
	pf.StringVar(&g.stateDir, "state-dir", "", "state directory (default from the configuration: "+agent.DefaultStateDir+")")

	root.AddCommand(daemonCmd(g), applyCmd(g), planCmd(g), statusCmd(g), cleanupCmd(g), versionCmd(), genManCmd(root))
	for _, c := range root.Commands() {
		if c.Args == nil {
			c.Args = noArgs
		}
		if c.Long != "" {
			c.Long += "\n\n" + exitCodesHelp
		}
	}
	return root
}

// noArgs rejects positional arguments as a usage error.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageError{fmt.Errorf("unexpected argument %q for %q", args[0], cmd.CommandPath())}
	}
	return nil
}

// loadConfig reads the configuration file and applies the global flags.
func (g *globals) loadConfig() (agent.Config, error) {
	cfg, err := agent.LoadConfig(g.configPath)
	if err != nil {
		return cfg, err
	}
	g.override(&cfg)
	return cfg, nil
}

// validateFlags checks the global flags before any command runs.
func (g *globals) validateFlags() error {
	if _, err := imds.ValidateEndpoint(g.imdsEndpoint); g.imdsEndpoint != "" && err != nil {
		return usageError{fmt.Errorf("--imds-endpoint: %q is not a usable IMDS endpoint: %w", g.imdsEndpoint, err)}
	}
	if g.logLevel != "" && !slices.Contains(agent.LogLevels, g.logLevel) {
		return usageError{fmt.Errorf("--log-level: %q is not one of %s", g.logLevel, strings.Join(agent.LogLevels, ", "))}
	}
	if g.logFormat != "" && !slices.Contains(agent.LogFormats, g.logFormat) {
		return usageError{fmt.Errorf("--log-format: %q is not one of %s", g.logFormat, strings.Join(agent.LogFormats, ", "))}
	}
	if g.stateDir != "" && !strings.HasPrefix(g.stateDir, "/") {
		return usageError{fmt.Errorf("--state-dir: %q is not an absolute path", g.stateDir)}
	}
	return nil
}

// override applies the flags over a loaded configuration. Precedence for the
// IMDS endpoint: --imds-endpoint, $AWS_EC2_METADATA_SERVICE_ENDPOINT, the
// file's imds.endpoint, the default.
func (g *globals) override(cfg *agent.Config) {
	switch {
	case g.imdsEndpoint != "":
		cfg.IMDS.Endpoint = g.imdsEndpoint
	case os.Getenv(imds.EnvEndpoint) != "":
		cfg.IMDS.Endpoint = "" // the client reads the variable
	}
	cfg.Log.Level = cmp.Or(g.logLevel, cfg.Log.Level)
	cfg.Log.Format = cmp.Or(g.logFormat, cfg.Log.Format)
	cfg.StateDir = cmp.Or(g.stateDir, cfg.StateDir)
}

// oneShotIMDSTimeout bounds the IMDS read of plan, status and apply: on a
// machine that is not EC2 they must fail quickly, never hang.
const oneShotIMDSTimeout = 5 * time.Second

// oneShot runs f, a one-shot command, with the configuration and a
// reconciler over the IMDS client and the current network namespace, whose
// host check it runs.
func (g *globals) oneShot(f func(agent.Config, *agent.Reconciler) error) error {
	cfg, err := g.loadConfig()
	if err != nil {
		return err
	}
	source, err := agent.IMDSSource(cfg.IMDS)
	if err != nil {
		return err
	}
	kernel, err := netcfg.NewKernel(netns.None(), cfg.StateDir, cfg.Netcfg)
	if err != nil {
		return err
	}
	defer kernel.Close()
	rec := agent.NewReconciler(source, kernel, cfg)
	rec.IMDSTimeout = oneShotIMDSTimeout
	rec.HostWarnings = agent.HostWarnings(netns.None())
	return f(cfg, rec)
}
