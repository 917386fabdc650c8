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
	}
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("reading configuration: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return Config{}, fmt.Errorf("reading configuration %s: %w", path, err)
	}
	if len(data) > maxConfigSize {
		return Config{}, fmt.Errorf("%s: larger than any configuration (limit %d bytes)", path, maxConfigSize)
	}
	return ParseConfig(path, data)
}

// maxConfigSize bounds what LoadConfig reads: a real configuration is a few
// kilobytes.
const maxConfigSize = 1 << 20

// ParseConfig parses the YAML document data; name is used in error messages.
func ParseConfig(name string, data []byte) (Config, error) {
	cfg := DefaultConfig()
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return cfg, nil // empty file: defaults
		}
		return Config{}, yamlSyntaxError(name, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return Config{}, fmt.Errorf("%s:%d: only one YAML document is allowed", name, extra.Line)
	}
	p := parser{file: name, lines: map[string]int{}}
	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return cfg, nil
		}
		root = root.Content[0]
	}
	if isNull(root) {
		return cfg, nil // only comments
	}
	if err := p.top(root, &cfg); err != nil {
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

// fields walks a mapping node, calling set for each key; unknown and
// duplicate keys are errors.
func (p parser) fields(n *yaml.Node, path string, allowed []string, set func(key string, v *yaml.Node) error) error {
	if n.Kind != yaml.MappingNode {
		return p.errorf(n, path, "expected a mapping of keys, got %s", describe(n))
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		key := join(path, k.Value)
		if k.Kind != yaml.ScalarNode {
			return p.errorf(k, path, "keys must be plain names")
		}
		if !slices.Contains(allowed, k.Value) {
			return p.errorf(k, key, "unknown key (known keys here: %s)", strings.Join(allowed, ", "))
		}
		if seen[k.Value] {
			return p.errorf(k, key, "key given twice")
		}
		seen[k.Value] = true
		p.lines[key] = k.Line
		if isNull(v) {
			continue // "key:" without a value keeps the default
		}
		if err := set(k.Value, v); err != nil {
			return err
		}
	}
	return nil
}

func (p parser) top(n *yaml.Node, cfg *Config) error {
	keys := []string{"protocol", "table_base", "priority_base", "card_stride", "rp_filter",
		"manage_addresses", "primary_table", "vpc_routes", "enis", "poll_interval", "imds",
		"start_timeout", "dhcp_grace", "log", "metrics", "state_dir"}
	return p.fields(n, "", keys, func(key string, v *yaml.Node) error {
		var err error
		switch key {
		case "protocol": // a byte; netcfg.Validate refuses the kernel's own values
			var x int
			x, err = p.intIn(v, key, 0, 255)
			cfg.Netcfg.Protocol = uint8(x)
		case "table_base":
			cfg.Netcfg.TableBase, err = p.intIn(v, key, 256, 1<<31-1)
		case "priority_base":
			cfg.Netcfg.PriorityBase, err = p.intIn(v, key, 1, 32765)
		case "card_stride":
			cfg.Netcfg.CardStride, err = p.intIn(v, key, 1, 10000)
		case "rp_filter":
			var s string
			s, err = p.str(v, key)
			cfg.Netcfg.RPFilter = netcfg.RPFilterMode(s)
		case "manage_addresses":
			cfg.Netcfg.ManageAddresses, err = p.boolean(v, key)
		case "primary_table":
			cfg.Netcfg.PrimaryTable, err = p.boolean(v, key)
		case "vpc_routes":
			var s string
			s, err = p.str(v, key)
			cfg.Netcfg.VPCRoutes = netcfg.VPCRoutesMode(s)
		case "enis":
			cfg.Netcfg.ENIs, err = p.enis(v, key)
		case "poll_interval":
			cfg.PollInterval, err = p.duration(v, key, time.Second)
		case "start_timeout":
			cfg.StartTimeout, err = p.duration(v, key, time.Second)
		case "dhcp_grace":
			cfg.DHCPGrace, err = p.duration(v, key, 0)
		case "state_dir":
			cfg.StateDir, err = p.absPath(v, key)
		case "imds":
			err = p.imds(v, key, &cfg.IMDS)
		case "log":
			err = p.log(v, key, &cfg.Log)
		case "metrics":
			err = p.metrics(v, key, &cfg.Metrics)
		}
		return err
	})
}

func (p parser) imds(n *yaml.Node, key string, c *IMDSConfig) error {
	return p.fields(n, key, []string{"endpoint", "timeout"}, func(k string, v *yaml.Node) error {
		var err error
		switch k {
		case "endpoint":
			c.Endpoint, err = p.endpoint(v, join(key, k))
		case "timeout":
			c.Timeout, err = p.duration(v, join(key, k), 100*time.Millisecond)
		}
		return err
	})
}

func (p parser) log(n *yaml.Node, key string, c *LogConfig) error {
	return p.fields(n, key, []string{"level", "format"}, func(k string, v *yaml.Node) error {
		var err error
		switch k {
		case "level":
			c.Level, err = p.oneOf(v, join(key, k), LogLevels...)
		case "format":
			c.Format, err = p.oneOf(v, join(key, k), LogFormats...)
		}
		return err
	})
}

func (p parser) metrics(n *yaml.Node, key string, c *MetricsConfig) error {
	var listenNode *yaml.Node
	err := p.fields(n, key, []string{"listen", "allow_non_loopback"}, func(k string, v *yaml.Node) error {
		var err error
		switch k {
		case "listen":
			listenNode = v
			c.Listen, err = p.str(v, join(key, k))
		case "allow_non_loopback":
			c.AllowNonLoopback, err = p.boolean(v, join(key, k))
		}
		return err
	})
	if err != nil || listenNode == nil || c.Listen == "" {
		return err
	}
	addr, err := CheckMetricsListen(c.Listen, c.AllowNonLoopback)
	if err != nil {
		return p.errorf(listenNode, "metrics.listen", "%v", err)
	}
	c.Listen = addr
	return nil
}

// enis parses the per-ENI entries; netcfg.Validate checks their values.
func (p parser) enis(n *yaml.Node, path string) ([]netcfg.ENIConfig, error) {
	if n.Kind != yaml.SequenceNode {
		return nil, p.errorf(n, path, "expected a list of ENI entries, got %s", describe(n))
	}
	var out []netcfg.ENIConfig
	for i, item := range n.Content {
		ip := fmt.Sprintf("%s[%d]", path, i)
		p.lines[ip] = item.Line
		var e netcfg.ENIConfig
		err := p.fields(item, ip, []string{"match", "exclude", "vpc_routes", "routes", "nat", "nat_sources", "extra_routes"}, func(k string, v *yaml.Node) error {
			var err error
			kp := join(ip, k)
			switch k {
			case "match":
				e.Match, err = p.selector(v, kp)
			case "exclude":
				e.Exclude, err = p.boolean(v, kp)
			case "vpc_routes":
				var s string
				s, err = p.str(v, kp)
				e.VPCRoutes = netcfg.VPCRoutesMode(s)
			case "routes":
				e.Routes, err = p.prefixes(v, kp)
			case "nat":
				e.NAT, err = p.boolean(v, kp)
			case "nat_sources":
				e.NATSources, err = p.prefixes(v, kp)
			case "extra_routes":
				err = p.errorf(v, kp, "removed: its routes in the ENI's own table changed nothing; use routes (main-table routes through the ENI, docs/config.md)")
			}
			return err
		})
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

func (p parser) selector(n *yaml.Node, path string) (netcfg.Selector, error) {
	var s netcfg.Selector
	err := p.fields(n, path, []string{"interface_id", "mac", "device_number", "vpc_id"}, func(k string, v *yaml.Node) error {
		kp := join(path, k)
		if k == "device_number" {
			d, err := p.intIn(v, kp, 0, 1<<16)
			s.DeviceNumber = &d
			return err
		}
		str, err := p.str(v, kp)
		switch k {
		case "interface_id":
			s.InterfaceID = str
		case "vpc_id":
			s.VPCID = str
		case "mac":
			s.MAC = str
			if hw, perr := net.ParseMAC(str); perr == nil && len(hw) == 6 {
				s.MAC = hw.String() // lower case, colon separated, as in IMDS
			}
		}
		return err
	})
	return s, err
}

func (p parser) scalar(n *yaml.Node, key, what string) (string, error) {
	if n.Kind != yaml.ScalarNode {
		return "", p.errorf(n, key, "expected %s, got %s", what, describe(n))
	}
	return n.Value, nil
}

func (p parser) str(n *yaml.Node, key string) (string, error) {
	return p.scalar(n, key, "a string")
}

func (p parser) intIn(n *yaml.Node, key string, lo, hi int) (int, error) {
	s, err := p.scalar(n, key, "a number")
	if err != nil {
		return 0, err
	}
	x, err := strconv.Atoi(s)
	if err != nil {
		return 0, p.errorf(n, key, "%q is not a whole number", s)
	}
	if x < lo || x > hi {
		return 0, p.errorf(n, key, "%d is out of range %d..%d", x, lo, hi)
	}
	return x, nil
}

func (p parser) boolean(n *yaml.Node, key string) (bool, error) {
	s, err := p.scalar(n, key, "true or false")
	if err != nil {
		return false, err
	}
	switch s {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, p.errorf(n, key, "%q is not one of true, false", s)
}

func (p parser) oneOf(n *yaml.Node, key string, allowed ...string) (string, error) {
	s, err := p.scalar(n, key, "one of "+strings.Join(allowed, ", "))
	if err != nil {
		return "", err
	}
	if !slices.Contains(allowed, s) {
		return "", p.errorf(n, key, "%q is not one of %s", s, strings.Join(allowed, ", "))
	}
	return s, nil
}

func (p parser) duration(n *yaml.Node, key string, minimum time.Duration) (time.Duration, error) {
	s, err := p.scalar(n, key, "a duration such as 15s")
	if err != nil {
		return 0, err
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, p.errorf(n, key, "%q is not a duration (use a unit: 500ms, 15s, 2m)", s)
	}
	if d < minimum {
		return 0, p.errorf(n, key, "%s is shorter than the minimum %s", d, minimum)
	}
	return d, nil
}

func (p parser) absPath(n *yaml.Node, key string) (string, error) {
	s, err := p.str(n, key)
	if err != nil {
		return "", err
	}
	if !filepath.IsAbs(s) {
		return "", p.errorf(n, key, "%q is not an absolute path", s)
	}
	return filepath.Clean(s), nil
}

func (p parser) endpoint(n *yaml.Node, key string) (string, error) {
	s, err := p.str(n, key)
	if err != nil {
		return "", err
	}
	if _, err := imds.ValidateEndpoint(s); err != nil {
		return "", p.errorf(n, key, "%q is not a usable IMDS endpoint: %v", s, err)
	}
	return s, nil
}

// prefixes reads a list of CIDRs, each with where it was given; Validate
// checks their values.
func (p parser) prefixes(n *yaml.Node, key string) ([]netcfg.ConfigPrefix, error) {
	if n.Kind != yaml.SequenceNode {
		return nil, p.errorf(n, key, "expected a list of CIDRs, got %s", describe(n))
	}
	var out []netcfg.ConfigPrefix
	for i, item := range n.Content {
		ik := fmt.Sprintf("%s[%d]", key, i)
		p.lines[ik] = item.Line
		s, err := p.scalar(item, ik, "a CIDR such as 10.50.0.0/16")
		if err != nil {
			return nil, err
		}
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, p.errorf(item, ik, "%q is not a CIDR (like 10.50.0.0/16 or 2001:db8::/32)", s)
		}
		out = append(out, netcfg.ConfigPrefix{Prefix: pfx, At: fmt.Sprintf("%s:%d: %s", p.file, item.Line, ik)})
	}
	return out, nil
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

func yamlSyntaxError(name string, err error) error {
	msg := err.Error()
	msg = strings.TrimPrefix(msg, "yaml: ")
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		if i := strings.Index(rest, ":"); i > 0 {
			if _, aerr := strconv.Atoi(rest[:i]); aerr == nil {
				return fmt.Errorf("%s:%s: invalid YAML:%s", name, rest[:i], rest[i+1:])
			}
		}
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

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}
