// Package netcfg turns an IMDS snapshot into the routing state dualhomed wants
// (Desired, pure), reads back the kernel objects dualhomed owns (Owned), computes
// the difference (Diff, pure) and applies it through netlink (Apply).
//
// Ownership lives in the kernel: every route, rule and address we create carries
// Config.Protocol, our routes live in our tables (or are main-table routes with
// our protocol) and our rules sit in our priority band. Anything else belongs to
// somebody else and is never modified or deleted.
package netcfg

import (
	"net/netip"
)

// Defaults for Config. Every number is configurable.
const (
	// DefaultProtocol marks our routes, rules and addresses (rtnetlink protocol
	// byte, named "dualhomed" in /etc/iproute2/rt_protos.d). Clear of the
	// kernel/boot/static values and of the routing daemons' registered numbers.
	DefaultProtocol = 210
	// DefaultTableBase: ENI tables are TableBase + CardStride*card + device.
	// 20000 stays clear of ec2-net-utils (10000+), cloud-init (100+) and the
	// Kubernetes VPC CNI (device+1), so several managers never share a table.
	DefaultTableBase = 20000
	// DefaultPriorityBase: rule priorities are PriorityBase + CardStride*card + device,
	// after the VPC CNI's 512..1536 band and before main (32766).
	DefaultPriorityBase = 20000
	// DefaultCardStride leaves room for 100 device numbers per network card.
	DefaultCardStride = 100
)

// RPFilterMode is what dualhomed does with net.ipv4.conf.<link>.rp_filter on
// managed secondary ENIs.
type RPFilterMode string

const (
	RPFilterLoose  RPFilterMode = "loose"  // 2: the default, safe with asymmetric multi-homing
	RPFilterStrict RPFilterMode = "strict" // 1: works because our source rules make the reverse lookup succeed
	RPFilterKeep   RPFilterMode = "keep"   // leave the value alone
)

// VPCRoutesMode says whether a multi-VPC ENI gets main-table routes to its VPC's CIDRs.
type VPCRoutesMode string

const (
	VPCRoutesAuto VPCRoutesMode = "auto" // routes for non-overlapping VPC CIDRs of multi-VPC ENIs
	VPCRoutesOff  VPCRoutesMode = "off"
)

// Config holds every number and option of the routing model.
type Config struct {
	Protocol     uint8
	TableBase    int
	PriorityBase int
	CardStride   int
	RPFilter     RPFilterMode
	// ManageAddresses adds the IMDS addresses missing from their links.
	ManageAddresses bool
	// PrimaryTable gives the primary ENI a table and rules too (off by default:
	// rules on the primary broke Docker's published ports for the incumbent tool).
	PrimaryTable bool
	// VPCRoutes is the default for ENIs whose entry does not set its own
	// (and for ENIs no entry matches); "" means auto.
	VPCRoutes VPCRoutesMode
	// ENIs are per-ENI settings; for each ENI the first entry whose selector
	// matches wins.
	ENIs []ENIConfig
}

// DefaultConfig returns the documented defaults.
func DefaultConfig() Config {
	return Config{
		Protocol:        DefaultProtocol,
		TableBase:       DefaultTableBase,
		PriorityBase:    DefaultPriorityBase,
		CardStride:      DefaultCardStride,
		RPFilter:        RPFilterLoose,
		ManageAddresses: true,
		VPCRoutes:       VPCRoutesAuto,
	}
}

// Selector picks ENIs. Empty fields match anything; all set fields must match.
type Selector struct {
	InterfaceID  string // eni-0123...
	MAC          string // lower case
	DeviceNumber *int
	VPCID        string
}

// ENIConfig is the per-ENI configuration.
type ENIConfig struct {
	Match   Selector
	Exclude bool // leave this ENI entirely alone (e.g. VPC CNI ENIs)
	// VPCRoutes "" means Config.VPCRoutes. One ENI per VPC carries the VPC's main-table
	// routes (the lowest card/device); an ENI with off does not, so the next
	// ENI of that VPC does. Select by VPC id to turn a VPC's routes off.
	VPCRoutes VPCRoutesMode
	// Routes are CIDRs the instance's own connections reach through this
	// ENI, an on-premises network behind VPC B's VPN for example: main-table
	// routes via the ENI's gateway with its first address as source.
	Routes []ConfigPrefix
	// NAT makes the ENI a source of the shared NAT (docs/nat.md).
	NAT bool
	// NATSources narrows the IPv4 sources the NAT forwards from the ENI;
	// empty means its VPC's IPv4 CIDRs.
	NATSources []ConfigPrefix
}

// ConfigPrefix is a CIDR of the configuration file with where it was given
// ("dualhomed.yaml:12: enis[0].routes[1]"): some problems show only once
// IMDS describes the ENIs, and their warnings name the place to fix.
type ConfigPrefix struct {
	netip.Prefix
	At string
}

// where names the CIDR for a message: its place in the file, else itself.
func (p ConfigPrefix) where() string {
	if p.At != "" {
		return p.At
	}
	return p.String()
}

// Link is a kernel network interface as seen by dualhomed: ENIs are found by MAC.
type Link struct {
	Index int    `json:"index"`
	Name  string `json:"name"`
	MAC   string `json:"mac"` // lower case, colon separated
}

// Route is a route dualhomed owns: `ip route add <Dst> [via <Gateway>] dev <link>
// [src <Src>] [scope link] table <Table> proto <Config.Protocol>`.
type Route struct {
	Table     int          `json:"table"` // 254 (main) for the multi-VPC CIDR routes
	Dst       netip.Prefix `json:"dst"`
	Gateway   netip.Addr   `json:"gateway,omitzero"` // invalid when on-link
	LinkIndex int          `json:"link_index"`
	Src       netip.Addr   `json:"src,omitzero"` // invalid when unset
	ScopeLink bool         `json:"scope_link,omitempty"`
}

// Rule is a policy rule dualhomed owns, of one of two shapes (ourShape):
// `ip rule add from <Src> lookup <Table> priority <Priority> protocol
// <Config.Protocol>`, or, for the replies of a NAT source's connections
// (docs/nat.md), `ip rule add fwmark <Mark>/<Mask> lookup ...`: IPv4, Src
// 0.0.0.0/0, Mark in NATMarkMask and Mask NATMarkMask.
type Rule struct {
	Priority int          `json:"priority"`
	Src      netip.Prefix `json:"src"` // /32 and /128 for addresses, the prefix for delegated prefixes
	Table    int          `json:"table"`
	Mark     uint32       `json:"fwmark,omitempty"`
	Mask     uint32       `json:"fwmask,omitempty"`
}

// Addr is an interface address dualhomed adds (and so owns): `ip addr add
// <Prefix> dev <link> [noprefixroute] proto <Config.Protocol>`.
type Addr struct {
	LinkIndex     int          `json:"link_index"`
	Prefix        netip.Prefix `json:"prefix"` // the address with its prefix length
	NoPrefixRoute bool         `json:"noprefixroute,omitempty"`
}

// RPFilter is the desired net.ipv4.conf.<LinkName>.rp_filter value.
type RPFilter struct {
	LinkName string `json:"link"`
	Value    int    `json:"value"`
}

// AltName is an alternative name dualhomed gives a link: `ip link property
// add dev <link> altname <Name>`. Names are unique in a namespace, link
// names included.
type AltName struct {
	LinkIndex int    `json:"link_index"`
	Name      string `json:"name"`
}

// State is a set of objects: either the desired state or the owned state.
// Slices are kept sorted (see State.Sort) so that states compare and print
// deterministically.
type State struct {
	Routes    []Route    `json:"routes"`
	Rules     []Rule     `json:"rules"`
	Addrs     []Addr     `json:"addrs"`
	RPFilters []RPFilter `json:"rp_filters"`
	AltNames  []AltName  `json:"altnames"`
	// NAT is the shared NAT's table with ip_forward; nil for none.
	NAT *NFTable `json:"-"`
}
