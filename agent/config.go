// Package agent wires the daemon's triggers (netlink events, the IMDS poll
// timer, SIGHUP) to the imds -> netcfg pipeline, and reports what it did through
// logs, systemd notifications, Prometheus metrics and a status file.
package agent

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/netcfg"
)

// DefaultConfigPath is where the packages install the configuration file.
const DefaultConfigPath = "/etc/dualhomed/dualhomed.yaml"

// Defaults of the daemon's own settings (the routing numbers are netcfg's).
const (
	// DefaultPollInterval is how often IMDS is read when nothing else happens.
	// One snapshot costs a few requests per ENI, far below the 1024 packets per
	// second that link-local services share per ENI.
	DefaultPollInterval = 15 * time.Second
	// DefaultIMDSTimeout bounds each IMDS request.
	DefaultIMDSTimeout = 2 * time.Second
	// DefaultStartTimeout: after this long without a successful reconcile the
	// daemon tells systemd it is ready anyway (degraded), so boot is never
	// blocked forever by an unreachable IMDS. Below the unit's TimeoutStartSec.
	DefaultStartTimeout = 20 * time.Second
	// DefaultDHCPGrace is how long a new link's primary IPv4 is left to a
	// DHCP client before dualhomed adds it itself (with manage_addresses):
	// the coexistence matrix saw DHCP clients add it milliseconds to a
	// second after the link appeared. Where none runs, the ENI's IPv4
	// routing waits this long once, unless dhcp_grace is 0.
	DefaultDHCPGrace = 3 * time.Second
	// DefaultStateDir holds status.json and netcfg's records (tmpfs: a reboot
	// starts from the kernel's state, which is where ownership lives anyway).
	DefaultStateDir = "/run/dualhomed"
	// DefaultMetricsPort is used when metrics.listen gives no port.
	DefaultMetricsPort = "9810"
)

// Config is the whole daemon configuration, as read from the YAML file.
type Config struct {
	// Netcfg is the routing model's configuration, including per-ENI
	// settings and the top-level vpc_routes.
	Netcfg       netcfg.Config
	PollInterval time.Duration
	StartTimeout time.Duration
	// DHCPGrace: see DefaultDHCPGrace; 0 adds a primary IPv4 at once.
	DHCPGrace time.Duration
	IMDS      IMDSConfig
	Log       LogConfig
	Metrics   MetricsConfig
	StateDir  string
}

// IMDSConfig says how to reach the instance metadata service.
type IMDSConfig struct {
	// Endpoint overrides the default http://169.254.169.254 ("" = default).
	Endpoint string
	Timeout  time.Duration
}

// LogConfig selects the log level and encoding.
type LogConfig struct {
	Level  string // debug, info, warn, error
	Format string // auto, json, console
}

// MetricsConfig configures the optional Prometheus endpoint.
type MetricsConfig struct {
	// Listen is host:port; "" turns the endpoint off (the default).
	Listen string
	// AllowNonLoopback permits a non-loopback listen address. Off by default:
	// the metrics name the instance's VPCs and addresses.
	AllowNonLoopback bool
}

// DefaultConfig returns the configuration used when no file exists.
func DefaultConfig() Config {
	return Config{
		Netcfg:       netcfg.DefaultConfig(),
		PollInterval: DefaultPollInterval,
		StartTimeout: DefaultStartTimeout,
		DHCPGrace:    DefaultDHCPGrace,
		IMDS:         IMDSConfig{Timeout: DefaultIMDSTimeout},
		Log:          LogConfig{Level: "info", Format: "auto"},
		StateDir:     DefaultStateDir,
	}
}

// LoadConfig reads the YAML file at path. A missing file yields the defaults
// (the daemon works without any configuration); so does a file that is empty or
// holds only comments. Every other problem is an error naming the file, and
// for bad content the line and the key.
func LoadConfig(path string) (Config, error) {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return DefaultConfig(), nil
	case err != nil:
		return Config{}, fmt.Errorf("reading configuration: %w", err)
	case fi.IsDir():
		return Config{}, fmt.Errorf("%s: is a directory, not a configuration file", path)
	case !fi.Mode().IsRegular():
		// A FIFO or a device would block or never end.
		return Config{}, fmt.Errorf("%s: not a regular file (%s)", path, fi.Mode().Type())
	case fi.Size() > maxConfigSize:
		return Config{}, fmt.Errorf("%s: larger than any configuration (limit %d bytes)", path, maxConfigSize)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("reading configuration: %w", err)
	}
	return ParseConfig(path, data)
}

// maxConfigSize bounds the files LoadConfig reads: a real configuration is a
// few kilobytes.
const maxConfigSize = 1 << 20

// ParseConfig parses the YAML document data; name is used in error messages.
func ParseConfig(name string, data []byte) (Config, error) {
	cfg := DefaultConfig()
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return cfg, nil // empty, or only comments: defaults
		}
		return Config{}, yamlSyntaxError(name, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return Config{}, fmt.Errorf("%s:%d: only one YAML document is allowed", name, extra.Line)
	}
	// The decoder returns a document node, holding the document's one value.
	if len(doc.Content) == 0 || isNull(doc.Content[0]) {
		return cfg, nil // a null document ("---", "~"): defaults
	}
	p := parser{file: name, lines: map[string]int{}}
	if err := configFile(&cfg)(p, doc.Content[0], ""); err != nil {
		return Config{}, err
	}
	if err := cfg.Netcfg.Validate(); err != nil {
		return Config{}, p.validationError(err)
	}
	return cfg, nil
}

// validationError places each of netcfg's "key: message" problems on the
// line of its key, or of the nearest enclosing key the file gives.
func (p parser) validationError(err error) error {
	var out []string
	for _, msg := range strings.Split(err.Error(), "\n") {
		where := p.file
		for key, _, _ := strings.Cut(msg, ":"); key != ""; key = key[:max(strings.LastIndexAny(key, ".["), 0)] {
			if line, ok := p.lines[key]; ok {
				where = fmt.Sprintf("%s:%d", p.file, line)
				break
			}
		}
		out = append(out, where+": "+msg)
	}
	return errors.New(strings.Join(out, "\n"))
}

type parser struct {
	file  string
	lines map[string]int // key path ("enis[0].match.mac") -> line, for netcfg's validation errors
}

// errorf returns an error in the `file:line: key: message` form.
func (p parser) errorf(n *yaml.Node, key, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if key == "" {
		return fmt.Errorf("%s:%d: %s", p.file, n.Line, msg)
	}
	return fmt.Errorf("%s:%d: %s: %s", p.file, n.Line, key, msg)
}

// A setter reads the value n of key (its path, "enis[0].match.mac") into its
// place in the configuration.
type setter func(p parser, n *yaml.Node, key string) error

// A field is a key a mapping may hold.
type field struct {
	name string
	set  setter
}

// mapping reads a mapping whose keys are fields; unknown and duplicate keys
// are errors, and a key without a value keeps the default.
func mapping(fields []field) setter {
	var known []string
	for _, f := range fields {
		known = append(known, f.name)
	}
	return func(p parser, n *yaml.Node, path string) error {
		if n.Kind != yaml.MappingNode {
			return p.errorf(n, path, "expected a mapping of keys, got %s", describe(n))
		}
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			key := k.Value
			if path != "" {
				key = path + "." + k.Value
			}
			if k.Kind != yaml.ScalarNode {
				return p.errorf(k, path, "keys must be plain names")
			}
			f := slices.Index(known, k.Value)
			if f < 0 {
				return p.errorf(k, key, "unknown key (known keys here: %s)", strings.Join(known, ", "))
			}
			if seen[k.Value] {
				return p.errorf(k, key, "key given twice")
			}
			seen[k.Value] = true
			p.lines[key] = k.Line
			if isNull(v) {
				continue
			}
			if err := fields[f].set(p, v, key); err != nil {
				return err
			}
		}
		return nil
	}
}

// configFile reads the whole file into cfg; netcfg.Validate then checks how
// the routing numbers combine, and refuses the kernel's own protocols.
func configFile(cfg *Config) setter {
	n := &cfg.Netcfg
	return mapping([]field{
		{"protocol", integer(&n.Protocol, 0, 255)},
		{"table_base", integer(&n.TableBase, 256, 1<<31-1)},
		{"priority_base", integer(&n.PriorityBase, 1, 32765)},
		{"card_stride", integer(&n.CardStride, 1, 10000)},
		{"rp_filter", text(&n.RPFilter)},
		{"manage_addresses", boolean(&n.ManageAddresses)},
		{"primary_table", boolean(&n.PrimaryTable)},
		{"vpc_routes", text(&n.VPCRoutes)},
		{"enis", list(&n.ENIs, "ENI entries", eniEntry)},
		{"poll_interval", duration(&cfg.PollInterval, time.Second)},
		{"imds", mapping([]field{
			{"endpoint", scalar(&cfg.IMDS.Endpoint, "a string", usableEndpoint)},
			{"timeout", duration(&cfg.IMDS.Timeout, 100*time.Millisecond)},
		})},
		{"start_timeout", duration(&cfg.StartTimeout, time.Second)},
		{"dhcp_grace", duration(&cfg.DHCPGrace, 0)},
		{"log", mapping([]field{
			{"level", oneOf(&cfg.Log.Level, LogLevels...)},
			{"format", oneOf(&cfg.Log.Format, LogFormats...)},
		})},
		{"metrics", metrics(&cfg.Metrics)},
		{"state_dir", scalar(&cfg.StateDir, "a string", absPath)},
	})
}

// eniEntry reads one per-ENI entry; netcfg.Validate checks its values.
func eniEntry(e *netcfg.ENIConfig) setter {
	return mapping([]field{
		{"match", mapping([]field{
			{"interface_id", text(&e.Match.InterfaceID)},
			{"mac", scalar(&e.Match.MAC, "a string", imdsMAC)},
			{"device_number", func(p parser, n *yaml.Node, key string) error {
				e.Match.DeviceNumber = new(int)
				return integer(e.Match.DeviceNumber, 0, 1<<16)(p, n, key)
			}},
			{"vpc_id", text(&e.Match.VPCID)},
		})},
		{"exclude", boolean(&e.Exclude)},
		{"vpc_routes", text(&e.VPCRoutes)},
		{"routes", list(&e.Routes, "CIDRs", cidr)},
		{"nat", boolean(&e.NAT)},
		{"nat_sources", list(&e.NATSources, "CIDRs", cidr)},
		{"extra_routes", func(p parser, n *yaml.Node, key string) error {
			return p.errorf(n, key, "removed: its routes in the ENI's own table changed nothing; use routes (main-table routes through the ENI, docs/config.md)")
		}},
	})
}

// metrics reads the metrics section and checks listen once
// allow_non_loopback, given before or after it, is known.
func metrics(c *MetricsConfig) setter {
	var listen *yaml.Node
	fields := mapping([]field{
		{"listen", func(p parser, n *yaml.Node, key string) error {
			listen = n
			return text(&c.Listen)(p, n, key)
		}},
		{"allow_non_loopback", boolean(&c.AllowNonLoopback)},
	})
	return func(p parser, n *yaml.Node, key string) error {
		if err := fields(p, n, key); err != nil || c.Listen == "" {
			return err
		}
		addr, err := CheckMetricsListen(c.Listen, c.AllowNonLoopback)
		if err != nil {
			return p.errorf(listen, "metrics.listen", "%v", err)
		}
		c.Listen = addr
		return nil
	}
}

// list reads a list (of what, for errors) into dst, each item with item.
func list[T any](dst *[]T, what string, item func(*T) setter) setter {
	return func(p parser, n *yaml.Node, path string) error {
		if n.Kind != yaml.SequenceNode {
			return p.errorf(n, path, "expected a list of %s, got %s", what, describe(n))
		}
		for i, v := range n.Content {
			key := fmt.Sprintf("%s[%d]", path, i)
			p.lines[key] = v.Line
			var x T
			if err := item(&x)(p, v, key); err != nil {
				return err
			}
			*dst = append(*dst, x)
		}
		return nil
	}
}

// scalar reads a scalar (what it should be, for errors) into dst with parse,
// whose error is reported at the value and key.
func scalar[T any](dst *T, what string, parse func(string) (T, error)) setter {
	return func(p parser, n *yaml.Node, key string) error {
		if n.Kind != yaml.ScalarNode {
			return p.errorf(n, key, "expected %s, got %s", what, describe(n))
		}
		v, err := parse(n.Value)
		if err != nil {
			return p.errorf(n, key, "%v", err)
		}
		*dst = v
		return nil
	}
}

func text[T ~string](dst *T) setter {
	return scalar(dst, "a string", func(s string) (T, error) { return T(s), nil })
}

func integer[T int | uint8](dst *T, lo, hi int) setter {
	return scalar(dst, "a number", func(s string) (T, error) {
		x, err := strconv.Atoi(s)
		if err != nil {
			return 0, fmt.Errorf("%q is not a whole number", s)
		}
		if x < lo || x > hi {
			return 0, fmt.Errorf("%d is out of range %d..%d", x, lo, hi)
		}
		return T(x), nil
	})
}

func boolean(dst *bool) setter {
	return scalar(dst, "true or false", func(s string) (bool, error) {
		if s != "true" && s != "false" {
			return false, fmt.Errorf("%q is not one of true, false", s)
		}
		return s == "true", nil
	})
}

func oneOf(dst *string, allowed ...string) setter {
	choices := strings.Join(allowed, ", ")
	return scalar(dst, "one of "+choices, func(s string) (string, error) {
		if !slices.Contains(allowed, s) {
			return "", fmt.Errorf("%q is not one of %s", s, choices)
		}
		return s, nil
	})
}

func duration(dst *time.Duration, minimum time.Duration) setter {
	return scalar(dst, "a duration such as 15s", func(s string) (time.Duration, error) {
		d, err := time.ParseDuration(s)
		if err != nil {
			return 0, fmt.Errorf("%q is not a duration (use a unit: 500ms, 15s, 2m)", s)
		}
		if d < minimum {
			return 0, fmt.Errorf("%s is shorter than the minimum %s", d, minimum)
		}
		return d, nil
	})
}

// absPath accepts an absolute path, cleaned.
func absPath(s string) (string, error) {
	if !filepath.IsAbs(s) {
		return "", fmt.Errorf("%q is not an absolute path", s)
	}
	return filepath.Clean(s), nil
}

func usableEndpoint(s string) (string, error) {
	if _, err := imds.ValidateEndpoint(s); err != nil {
		return "", fmt.Errorf("%q is not a usable IMDS endpoint: %v", s, err)
	}
	return s, nil
}

// imdsMAC writes a MAC address as IMDS does (lower case, colon separated);
// netcfg.Validate reports what is not one.
func imdsMAC(s string) (string, error) {
	if hw, err := net.ParseMAC(s); err == nil && len(hw) == 6 {
		return hw.String(), nil
	}
	return s, nil
}

// cidr reads a CIDR with where it was given; netcfg.Validate checks its value.
func cidr(dst *netcfg.ConfigPrefix) setter {
	return func(p parser, n *yaml.Node, key string) error {
		dst.At = fmt.Sprintf("%s:%d: %s", p.file, n.Line, key)
		return scalar(&dst.Prefix, "a CIDR such as 10.50.0.0/16", func(s string) (netip.Prefix, error) {
			pfx, err := netip.ParsePrefix(s)
			if err != nil {
				return pfx, fmt.Errorf("%q is not a CIDR (like 10.50.0.0/16 or 2001:db8::/32)", s)
			}
			return pfx, nil
		})(p, n, key)
	}
}

// CheckMetricsListen validates a metrics listen address and returns it with
// the default port filled in. Non-loopback addresses are refused unless
// allowNonLoopback is set.
func CheckMetricsListen(listen string, allowNonLoopback bool) (string, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		host, port = listen, DefaultMetricsPort
		if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
			host = host[1 : len(host)-1]
		}
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("%q: port %q is not a number in 1..65535", listen, port)
	}
	loopback := host == "localhost"
	if a, err := netip.ParseAddr(host); err == nil {
		loopback = a.IsLoopback()
	}
	if !loopback && !allowNonLoopback {
		return "", fmt.Errorf("%q is not a loopback address; metrics reveal the instance's VPCs and addresses (set metrics.allow_non_loopback: true to expose them)", listen)
	}
	return net.JoinHostPort(host, port), nil
}

// yamlSyntaxError turns yaml's "yaml: line 3: message" into "name:3: invalid YAML: message".
func yamlSyntaxError(name string, err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	var line int
	if _, serr := fmt.Sscanf(msg, "line %d:", &line); serr == nil {
		_, rest, _ := strings.Cut(msg, ":")
		return fmt.Errorf("%s:%d: invalid YAML:%s", name, line, rest)
	}
	return fmt.Errorf("%s: invalid YAML: %s", name, msg)
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.Tag == "!!null"
}

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	case yaml.ScalarNode:
		return fmt.Sprintf("%q", n.Value)
	}
	return "nothing"
}
