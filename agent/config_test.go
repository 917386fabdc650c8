package agent

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/netcfg"
)

func TestParseConfigErrors(t *testing.T) {
	const file = "/etc/dualhomed/dualhomed.yaml"
	tests := []struct {
		name, yaml, want string
	}{
		{"unknown top key", "protocl: 210\n", file + ":1: protocl: unknown key"},
		{"bad enum nested", "enis:\n  - match: {interface_id: eni-1}\n  - match:\n      mac: 0a:00:00:00:00:01\n    vpc_routes: maybe\n",
			file + `:5: enis[1].vpc_routes: "maybe" is not one of auto, off`},
		{"protocol range", "\n\nprotocol: 2\n", file + ":3: protocol: 2 is reserved for the kernel (0..4)"},
		{"protocol not number", "protocol: abc\n", file + `:1: protocol: "abc" is not a whole number`},
		{"bad duration", "poll_interval: 15\n", file + `:1: poll_interval: "15" is not a duration`},
		{"duration too short", "poll_interval: 10ms\n", file + ":1: poll_interval: 10ms is shorter than the minimum 1s"},
		{"negative grace", "dhcp_grace: -1s\n", file + ":1: dhcp_grace: -1s is shorter than the minimum 0s"},
		{"bad bool", "manage_addresses: yes\n", file + `:1: manage_addresses: "yes" is not one of true, false`},
		{"rp_filter", "rp_filter: medium\n", file + `:1: rp_filter: "medium" is not one of loose, strict, keep`},
		{"bad cidr", "enis:\n  - match: {vpc_id: vpc-1}\n    routes: [10.0.0.0/8, 300.1.0.0/16]\n", file + `:3: enis[0].routes[1]: "300.1.0.0/16" is not a CIDR`},
		{"host bits", "enis:\n  - match: {vpc_id: vpc-1}\n    routes:\n      - 10.0.0.0/8\n      - 10.0.0.1/8\n", file + `:5: enis[0].routes[1]: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?`},
		{"default route", "enis:\n  - match: {vpc_id: vpc-1}\n    routes: [0.0.0.0/0]\n", file + `:3: enis[0].routes[0]: 0.0.0.0/0 is the default route`},
		{"one CIDR through two ENIs", "enis:\n  - match: {vpc_id: vpc-1}\n    routes: [192.168.0.0/16]\n  - match: {vpc_id: vpc-2}\n    routes:\n      - 192.168.0.0/16\n",
			file + `:6: enis[1].routes[0]: 192.168.0.0/16 is routed by enis[0].routes[0] too`},
		{"nat_sources without nat", "enis:\n  - match: {vpc_id: vpc-1}\n    nat_sources: [10.1.0.0/16]\n", file + `:3: enis[0].nat_sources: given without nat: true`},
		{"IPv6 nat_sources", "enis:\n  - match: {vpc_id: vpc-1}\n    nat: true\n    nat_sources: [10.1.0.0/16, \"fd00::/8\"]\n", file + `:4: enis[0].nat_sources[1]: fd00::/8 is not an IPv4 CIDR`},
		{"nat_sources host bits", "enis:\n  - match: {vpc_id: vpc-1}\n    nat: true\n    nat_sources:\n      - 10.1.2.3/16\n", file + `:5: enis[0].nat_sources[0]: 10.1.2.3/16 has host bits set`},
		{"nat and exclude", "enis:\n  - match: {vpc_id: vpc-1}\n    exclude: true\n    nat: true\n", file + `:2: enis[0]: exclude contradicts routes and nat`},
		{"extra_routes removed", "enis:\n  - match: {vpc_id: vpc-1}\n    extra_routes: [10.0.0.0/8]\n", file + `:3: enis[0].extra_routes: removed: its routes in the ENI's own table changed nothing; use routes`},
		{"bad mac", "enis:\n  - match: {mac: zz}\n", file + `:2: enis[0].match.mac: "zz" is not a MAC address`},
		{"bad eni id", "enis:\n  - match: {interface_id: foo}\n", file + `:2: enis[0].match.interface_id: "foo" is not an ENI id`},
		{"entry-wide problem on the entry's line", "enis:\n  - match: {vpc_id: vpc-1}\n    exclude: true\n    routes: [10.9.0.0/16]\n",
			file + ":2: enis[0]: exclude contradicts routes and nat"},
		{"empty match", "enis:\n  - exclude: true\n", file + ":2: enis[0].match: empty selector would match every ENI"},
		{"unknown selector key", "enis:\n  - match: {subnet_id: subnet-1}\n", file + ":2: enis[0].match.subnet_id: unknown key"},
		{"duplicate key", "protocol: 210\nprotocol: 211\n", file + ":2: protocol: key given twice"},
		{"not a mapping", "- a\n- b\n", file + ":1: expected a mapping"},
		{"enis not list", "enis: {a: 1}\n", file + ":1: enis: expected a list"},
		{"syntax", "protocol: 210\n  table_base: [\n", file + ":2: invalid YAML"},
		{"log level", "log:\n  level: chatty\n", file + `:2: log.level: "chatty" is not one of debug, info, warn, error`},
		{"metrics public", "metrics:\n  listen: 0.0.0.0:9810\n", file + `:2: metrics.listen: "0.0.0.0:9810" is not a loopback address`},
		{"imds endpoint", "imds:\n  endpoint: 169.254.169.254\n", file + `:2: imds.endpoint: "169.254.169.254" is not a usable IMDS endpoint`},
		{"state dir relative", "state_dir: run\n", file + `:1: state_dir: "run" is not an absolute path`},
		{"netcfg validation on its line", "protocol: 210\npriority_base: 32000\n", file + ":2: priority_base: priorities 32000..35199"},
		{"two documents", "protocol: 210\n---\nprotocol: 211\n", file + ":2: only one YAML document"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseConfig(file, []byte(tt.yaml))
			if err == nil {
				t.Fatalf("no error, want %q", tt.want)
			}
			if !strings.HasPrefix(err.Error(), tt.want) {
				t.Fatalf("error\n  %q\nwant prefix\n  %q", err, tt.want)
			}
		})
	}
}

func TestParseConfigValues(t *testing.T) {
	y := `
protocol: 211
table_base: 30000
priority_base: 25000
card_stride: 50
rp_filter: strict
manage_addresses: false
primary_table: true
vpc_routes: off
enis:
  - match: {interface_id: eni-0abc}
    exclude: true
  - match:
      mac: 0A:1B:2C:3D:4E:5F
      device_number: 2
    vpc_routes: auto
    routes: [10.50.0.0/16, "2001:db8::/32"]
poll_interval: 30s
start_timeout: 2m
dhcp_grace: 0s
imds:
  endpoint: http://127.0.0.1:1338
  timeout: 500ms
log: {level: debug, format: json}
metrics:
  listen: 127.0.0.1
state_dir: /var/run/dh/
`
	cfg, err := ParseConfig("x.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	n := cfg.Netcfg
	if n.Protocol != 211 || n.TableBase != 30000 || n.PriorityBase != 25000 || n.CardStride != 50 ||
		n.RPFilter != netcfg.RPFilterStrict || n.ManageAddresses || !n.PrimaryTable {
		t.Errorf("numbers: %+v", n)
	}
	if len(n.ENIs) != 2 || n.VPCRoutes != netcfg.VPCRoutesOff {
		t.Fatalf("ENIs = %+v, vpc_routes %q", n.ENIs, n.VPCRoutes)
	}
	if !n.ENIs[0].Exclude || n.ENIs[0].Match.InterfaceID != "eni-0abc" || n.ENIs[0].VPCRoutes != "" {
		t.Errorf("ENIs[0] = %+v", n.ENIs[0])
	}
	e1 := n.ENIs[1]
	if e1.Match.MAC != "0a:1b:2c:3d:4e:5f" || e1.Match.DeviceNumber == nil || *e1.Match.DeviceNumber != 2 ||
		e1.VPCRoutes != netcfg.VPCRoutesAuto || len(e1.Routes) != 2 || e1.Routes[1].String() != "2001:db8::/32" ||
		e1.Routes[1].At != "x.yaml:17: enis[1].routes[1]" {
		t.Errorf("ENIs[1] = %+v", e1)
	}
	if cfg.PollInterval != 30*time.Second || cfg.StartTimeout != 2*time.Minute || cfg.DHCPGrace != 0 || cfg.IMDS.Timeout != 500*time.Millisecond ||
		cfg.IMDS.Endpoint != "http://127.0.0.1:1338" || cfg.Log.Level != "debug" || cfg.Log.Format != "json" ||
		cfg.Metrics.Listen != "127.0.0.1:9810" || cfg.StateDir != "/var/run/dh" {
		t.Errorf("daemon settings: %+v", cfg)
	}
}

func TestParseConfigNAT(t *testing.T) {
	cfg, err := ParseConfig("x.yaml", []byte("enis:\n  - match: {device_number: 1}\n    nat: true\n    nat_sources: [10.50.1.0/24]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if e := cfg.Netcfg.ENIs[0]; !e.NAT || len(e.NATSources) != 1 || e.NATSources[0].String() != "10.50.1.0/24" ||
		e.NATSources[0].At != "x.yaml:4: enis[0].nat_sources[0]" {
		t.Errorf("ENIs[0] = %+v", e)
	}
}

func TestLoadConfigFiles(t *testing.T) {
	dir := t.TempDir()
	def := DefaultConfig()

	cfg, err := LoadConfig(filepath.Join(dir, "missing.yaml"))
	if err != nil || cfg.PollInterval != def.PollInterval || cfg.Netcfg.Protocol != netcfg.DefaultProtocol {
		t.Errorf("missing file: %+v, %v; want defaults", cfg, err)
	}
	for name, content := range map[string]string{"empty.yaml": "", "comments.yaml": "# all commented out\n#protocol: 210\n"} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		cfg, err := LoadConfig(p)
		if err != nil || cfg.Netcfg.TableBase != netcfg.DefaultTableBase {
			t.Errorf("%s: %+v, %v; want defaults", name, cfg, err)
		}
	}
	if _, err := LoadConfig(dir); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("directory: err = %v", err)
	}
	fifo := filepath.Join(dir, "config.fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadConfig(fifo); err == nil || !strings.Contains(err.Error(), fifo+": not a regular file") {
		t.Errorf("FIFO: err = %v", err)
	}
	if _, err := LoadConfig(filepath.Join(dir, "empty.yaml", "dualhomed.yaml")); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("path through a file: err = %v", err)
	}
	big := filepath.Join(dir, "big.yaml")
	if err := os.WriteFile(big, make([]byte, maxConfigSize+1), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadConfig(big); err == nil || !strings.Contains(err.Error(), "larger than any configuration") {
		t.Errorf("huge file: err = %v", err)
	}
	junk := filepath.Join(dir, "junk.yaml")
	if err := os.WriteFile(junk, []byte("\x00\x01\xfe\xff\x7fjunk"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadConfig(junk); err == nil || !strings.HasPrefix(err.Error(), junk+":") {
		t.Errorf("binary junk: err = %v", err)
	}
	if os.Geteuid() != 0 {
		p := filepath.Join(dir, "unreadable.yaml")
		if err := os.WriteFile(p, []byte("protocol: 210\n"), 0o000); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadConfig(p); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Errorf("unreadable: err = %v", err)
		}
	}
}

func TestExampleConfigParses(t *testing.T) {
	p := filepath.Join("..", "packaging", "dualhomed.yaml")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("the annotated example config is missing: %v", err)
	}
	cfg, err := ParseConfig(p, data)
	if err != nil {
		t.Fatalf("the shipped example config must parse: %v", err)
	}
	if def := DefaultConfig(); cfg.PollInterval != def.PollInterval || cfg.Netcfg.TableBase != def.Netcfg.TableBase {
		t.Errorf("the example (all commented out) must mean the defaults: %+v", cfg)
	}
	// Uncommenting every setting ("#key", "#  nested") must parse as well,
	// and give the documented defaults for the top-level numbers.
	var lines []string
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "#") && len(l) > 1 && (l[1] != ' ' || strings.HasPrefix(l, "#  ")) {
			l = l[1:]
		}
		lines = append(lines, l)
	}
	cfg, err = ParseConfig(p+" (uncommented)", []byte(strings.Join(lines, "\n")))
	if err != nil {
		t.Fatalf("the example with every setting uncommented must parse: %v", err)
	}
	if cfg.Netcfg.Protocol != netcfg.DefaultProtocol || cfg.PollInterval != DefaultPollInterval ||
		cfg.StartTimeout != DefaultStartTimeout || len(cfg.Netcfg.ENIs) != 4 || cfg.Metrics.Listen != "127.0.0.1:9810" {
		t.Errorf("uncommented example: %+v", cfg)
	}
}
