package agent

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/imds"
)

// FuzzParseConfig feeds the configuration parser arbitrary bytes. Whatever
// the input: no panic; an error names the file on every line of its message
// (users act on file:line); an accepted configuration passes netcfg's
// validation and the parser's own bounds; and parsing is deterministic.
// Seeds: the commented package configuration, the examples below, and
// testdata/fuzz/FuzzParseConfig (aliases, merge keys, deep nesting, junk).
func FuzzParseConfig(f *testing.F) {
	if data, err := os.ReadFile(filepath.Join("..", "packaging", "dualhomed.yaml")); err == nil {
		f.Add(data)
		// The same file with every key uncommented: all the defaults, spelled out.
		f.Add([]byte(strings.ReplaceAll(string(data), "\n#", "\n")))
	}
	for _, s := range []string{
		"",
		"# only a comment\n",
		"poll_interval: 5s\nstart_timeout: 30s\n",
		"protocol: 211\ntable_base: 30000\npriority_base: 30000\ncard_stride: 10\n",
		"rp_filter: strict\nmanage_addresses: false\nprimary_table: true\nvpc_routes: off\n",
		"imds:\n  endpoint: http://127.0.0.1:1338\n  timeout: 500ms\n",
		"log:\n  level: debug\n  format: json\nmetrics:\n  listen: 127.0.0.1:9810\n",
		"state_dir: /run/dualhomed-test\n",
		"enis:\n  - match:\n      mac: 0A:1B:2C:3D:4E:5F\n    exclude: true\n  - match:\n      device_number: 2\n      vpc_id: vpc-0123\n    vpc_routes: off\n    routes: [10.9.0.0/16, 'fd00::/8']\n",
		"enis:\n  - match: {interface_id: eni-0abc}\n    routes:\n      - 192.0.2.0/24\n",
		"enis:\n  - exclude: true\n",
		"protocol: 300\n",
		"protocol: 0x10\n",
		"poll_interval: 1ms\n",
		"poll_interval: 99999999999999999999h\n",
		"poll_interval: 5s\npoll_interval: 6s\n",
		"metrics:\n  listen: 0.0.0.0:9810\n",
		"imds:\n  endpoint: ftp://x\n",
		"a: 1\n---\nb: 2\n",
		"[1, 2, 3]\n",
		"poll_interval: [5s]\n",
		"log: {level: loud}\n",
		"\tpoll_interval: 5s\n",
		"\x00\xff\xfe",
	} {
		f.Add([]byte(s))
	}
	const name = "fuzz.yaml"
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseConfig(name, data)
		cfg2, err2 := ParseConfig(name, data)
		if (err == nil) != (err2 == nil) || (err != nil && err.Error() != err2.Error()) || !reflect.DeepEqual(cfg, cfg2) {
			t.Fatalf("parsing twice differs: %v / %v", err, err2)
		}
		if err != nil {
			for _, line := range strings.Split(err.Error(), "\n") {
				if !strings.HasPrefix(line, name+":") {
					t.Fatalf("error line does not start with the file name: %q (whole error: %q)", line, err)
				}
			}
			return
		}
		if verr := cfg.Netcfg.Validate(); verr != nil {
			t.Fatalf("accepted a configuration that netcfg rejects: %v", verr)
		}
		if cfg.PollInterval < time.Second || cfg.StartTimeout < time.Second {
			t.Fatalf("accepted poll_interval %s, start_timeout %s (minimum 1s)", cfg.PollInterval, cfg.StartTimeout)
		}
		if cfg.IMDS.Timeout < 100*time.Millisecond {
			t.Fatalf("accepted imds.timeout %s", cfg.IMDS.Timeout)
		}
		if !strings.HasPrefix(cfg.StateDir, "/") {
			t.Fatalf("accepted a relative state_dir %q", cfg.StateDir)
		}
		if p := cfg.Netcfg.Protocol; p < 5 {
			t.Fatalf("accepted protocol %d, one of the kernel's own", p)
		}
		switch cfg.Log.Level {
		case "debug", "info", "warn", "error":
		default:
			t.Fatalf("accepted log level %q", cfg.Log.Level)
		}
		if cfg.Metrics.Listen != "" {
			if _, merr := CheckMetricsListen(cfg.Metrics.Listen, cfg.Metrics.AllowNonLoopback); merr != nil {
				t.Fatalf("accepted metrics.listen %q: %v", cfg.Metrics.Listen, merr)
			}
		}
		if cfg.IMDS.Endpoint != "" {
			if _, eerr := imds.ValidateEndpoint(cfg.IMDS.Endpoint); eerr != nil {
				t.Fatalf("accepted imds.endpoint %q: %v", cfg.IMDS.Endpoint, eerr)
			}
		}
	})
}
