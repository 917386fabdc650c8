package netcfg

import (
	"strings"
	"testing"

	"github.com/dualhomed/dualhomed/imds"
)

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Config)
		errs   []string // substrings; none means valid
	}{
		{name: "defaults", mutate: func(*Config) {}},
		{name: "unset modes mean the defaults", mutate: func(c *Config) { c.RPFilter = "" }},
		{name: "a full per-ENI section", mutate: func(c *Config) {
			c.ENIs = []ENIConfig{
				{Match: Selector{InterfaceID: "eni-0abc"}, Exclude: true},
				{Match: Selector{MAC: "0A:1B:2C:3D:4E:5F", DeviceNumber: desInt(2)}, VPCRoutes: VPCRoutesOff},
				{Match: Selector{VPCID: "vpc-0abc"}, Routes: cfgPfxs("192.168.0.0/16", "fd00::/8")},
			}
		}},
		{name: "kernel protocol", mutate: func(c *Config) { c.Protocol = 2 }, errs: []string{"protocol: 2 is reserved"}},
		{name: "zero protocol", mutate: func(c *Config) { c.Protocol = 0 }, errs: []string{"protocol: 0"}},
		{name: "zero stride", mutate: func(c *Config) { c.CardStride = 0 }, errs: []string{"card_stride: must be positive"}},
		{name: "tables over main", mutate: func(c *Config) { c.TableBase = 200 }, errs: []string{"table_base: tables 200..3399 include a reserved table"}},
		{name: "table zero", mutate: func(c *Config) { c.TableBase = 0 }, errs: []string{"table_base"}},
		{name: "tables just above local", mutate: func(c *Config) { c.TableBase = 256 }},
		{name: "tables just below default", mutate: func(c *Config) { c.TableBase, c.CardStride = 1, 7 }, errs: nil},
		{name: "priorities past main", mutate: func(c *Config) { c.PriorityBase = 30000 }, errs: []string{"priority_base: priorities 30000..33199"}},
		{name: "priority zero", mutate: func(c *Config) { c.PriorityBase = 0 }, errs: []string{"priority_base"}},
		{name: "rp_filter", mutate: func(c *Config) { c.RPFilter = "medium" }, errs: []string{`rp_filter: "medium"`}},
		{name: "strict rp_filter with a NAT", mutate: func(c *Config) {
			c.RPFilter = RPFilterStrict
			c.ENIs = []ENIConfig{{Match: Selector{VPCID: "vpc-1"}, NAT: true, NATSources: cfgPfxs("10.1.0.0/16")}}
		}, errs: []string{"rp_filter: strict drops the clients of NAT sources"}},
		{name: "everything wrong at once", mutate: func(c *Config) {
			c.Protocol, c.RPFilter = 1, "x"
			c.ENIs = []ENIConfig{
				{},
				{Match: Selector{InterfaceID: "eth1", VPCID: "b", MAC: "zz", DeviceNumber: desInt(-1)}, VPCRoutes: "on"},
				{Match: Selector{VPCID: "vpc-1"}, Exclude: true, Routes: cfgPfxs("10.0.0.0/8")},
				{Match: Selector{VPCID: "vpc-1"}, Routes: []ConfigPrefix{{Prefix: desPfx("0.0.0.0/0")}, {Prefix: desPfx("10.1.2.3/16")}, {}, {Prefix: desPfx("10.0.0.0/8")}}},
			}
		}, errs: []string{
			"protocol: 1", `rp_filter: "x"`,
			"enis[0].match: empty selector",
			`enis[1].match.interface_id: "eth1"`, `enis[1].match.vpc_id: "b"`, `enis[1].match.mac: "zz"`,
			"enis[1].match.device_number: -1", `enis[1].vpc_routes: "on"`,
			"enis[2]: exclude contradicts routes and nat",
			"enis[3].routes[0]: 0.0.0.0/0 is the default route",
			"enis[3].routes[1]: 10.1.2.3/16 has host bits set; did you mean 10.1.0.0/16?",
			"enis[3].routes[2]: invalid prefix",
			"enis[3].routes[3]: 10.0.0.0/8 is routed by enis[2].routes[0] too",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			tt.mutate(&c)
			err := c.Validate()
			if len(tt.errs) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate accepted %+v", c)
			}
			for _, want := range tt.errs {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error lacks %q:\n%v", want, err)
				}
			}
			if got := strings.Count(err.Error(), "\n") + 1; got != len(tt.errs) {
				t.Errorf("%d problems reported, want %d:\n%v", got, len(tt.errs), err)
			}
		})
	}
}

func TestSelectorMatches(t *testing.T) {
	e := imds.ENI{MAC: "0a:1b:2c:3d:4e:5f", InterfaceID: "eni-1", VPCID: "vpc-b", DeviceNumber: 2}
	for _, tt := range []struct {
		s    Selector
		want bool
	}{
		{Selector{}, true},
		{Selector{InterfaceID: "eni-1"}, true},
		{Selector{InterfaceID: "eni-2"}, false},
		{Selector{MAC: "0A:1B:2C:3D:4E:5F"}, true},
		{Selector{DeviceNumber: desInt(2), VPCID: "vpc-b"}, true},
		{Selector{DeviceNumber: desInt(0), VPCID: "vpc-b"}, false},
		{Selector{VPCID: "vpc-a"}, false},
	} {
		if got := tt.s.Matches(e); got != tt.want {
			t.Errorf("%+v.Matches = %v, want %v", tt.s, got, tt.want)
		}
	}
}

// The top-level vpc_routes applies to entries without their own value and
// to ENIs no entry matches; an entry's own value wins.
func TestENIConfigTopLevelVPCRoutes(t *testing.T) {
	two := 2
	cfg := DefaultConfig()
	cfg.VPCRoutes = VPCRoutesOff
	cfg.ENIs = []ENIConfig{
		{Match: Selector{InterfaceID: "eni-0abc"}, Exclude: true},
		{Match: Selector{MAC: "0a:1b:2c:3d:4e:5f", DeviceNumber: &two}, VPCRoutes: VPCRoutesAuto},
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		eni  imds.ENI
		want VPCRoutesMode
	}{
		{imds.ENI{MAC: "0a:00:00:00:00:01", InterfaceID: "eni-0abc"}, VPCRoutesOff},
		{imds.ENI{MAC: "0a:1b:2c:3d:4e:5f", DeviceNumber: 2}, VPCRoutesAuto},
		{imds.ENI{MAC: "0a:00:00:00:00:03", DeviceNumber: 3}, VPCRoutesOff},
	} {
		if got := cfg.eniConfig(c.eni).VPCRoutes; got != c.want {
			t.Errorf("%s: vpc_routes %q, want %q", c.eni.MAC, got, c.want)
		}
	}
	cfg.VPCRoutes = "sometimes"
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), `vpc_routes: "sometimes" is not one of auto, off`) {
		t.Errorf("Validate with a bad top-level vpc_routes: %v", err)
	}
}
