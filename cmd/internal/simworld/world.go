// Package simworld builds a simulated dual-homed EC2 instance out of network
// namespaces and veth pairs, for the end-to-end and chaos tests
// (cmd/internal/e2e, cmd/internal/chaos), `make demo` (cmd/dualhomed-demo)
// and `make bench` (cmd/dualhomed-bench).
//
// The world; every namespace name starts with a per-run prefix (dh<pid>w<n>-):
//
//	VPC  CIDRs                    client (cliX)                  router (rtrX)           instance (inst) link
//	A    10.0.0.0/16              10.0.100.50                    10.0.1.1, fe80:ec2::1   eth0 10.0.1.10 (primary ENI)
//	B    10.1.0.0/16, fd00:b::/56 10.1.100.50, fd00:b:0:64::50   10.1.1.1, fe80:ec2::1   eth1 10.1.1.10, fd00:b:0:1::10
//	C    10.0.0.0/16 (= A's)      10.0.100.50 (= A's client)     10.0.2.1, fe80:ec2::1   eth2 10.0.2.10
//	D    10.3.0.0/16, fd00:d::/56 10.3.100.50, fd00:d:0:64::50   10.3.1.1, fe80:ec2::1   eth3 10.3.1.10, fd00:d:0:1::10 (hot attach)
//
// The router holds .1 of its client subnet (10.x.100.0/24, fd00:x:0:64::/64)
// and the gateway of the ENI's subnet (10.x.y.1/24 and fe80:ec2::1) on the
// veth whose other end is the instance's ethN. VPC B's router also reaches an
// "on-premises" client, onpB 198.18.0.50, outside every VPC CIDR.
//
// VPC C deliberately reuses VPC A's CIDR, and its client has the same address
// as VPC A's client (10.0.100.50): only source-based routing on the instance can
// tell their replies apart. The ENI subnets differ (10.0.1.0/24 in A, 10.0.2.0/24
// in C) because one instance cannot hold the same address twice; the overlap is
// the VPC CIDR and the client address. VPC D's ENI (eth3) starts detached,
// ready for HotAttach.
//
// Each router forwards only between its ENI link and its client subnet: routers
// live in separate namespaces, so nothing is ever forwarded between VPCs.
//
// The instance starts as a real one after boot: each attached ENI has its
// "DHCP" primary address with its prefix route, the main table's default route
// goes through eth0 (proto dhcp), and nothing else. IPv6 forwarding, router
// advertisements and DAD are off everywhere so the world is deterministic.
//
// Options.NAT adds the shared NAT's world (docs/nat.md): VPCs B and C get a
// second CIDR, the same 100.64.0.0/16 in both, each with a client at the
// same address 100.64.1.5 (natB, natC: VPC.NATClient), and their routers
// send their default route to the instance's ENI in their VPC; an
// "internet" host (inet, 203.0.113.5) sits behind VPC A's router; a
// container (ctr, 172.17.0.2) sits behind the instance's Docker-style
// bridge link docker0 (172.17.0.1).
//
// Options.Instance replaces the four VPCs with any emulator.Instance (the
// benchmarks' 15 ENIs): ENI i is the instance's eth<i>, every VPC (by VPC ID)
// gets a router and a client at .50 of the last /24 of its first IPv4 CIDR,
// and IMDS serves the instance exactly as given.
package simworld

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// Names of the world's fixed objects.
const (
	// IMDSListen is where the emulator listens inside the instance namespace.
	IMDSListen = "127.0.0.1:8111"
	// IMDSEndpoint is the URL dualhomed is given (--imds-endpoint).
	IMDSEndpoint = "http://" + IMDSListen
	// RouterIPv6 is the VPC router's fixed link-local address on every subnet.
	RouterIPv6 = "fe80:ec2::1"
	// EchoPort is the TCP echo port the instance serves on every address.
	EchoPort = 7007
	// OwnerID is the account of every ENI.
	OwnerID = "123456789012"
)

// VPC is one simulated VPC: a router namespace and a client namespace.
type VPC struct {
	Name    string // A, B, C, D
	ID      string // vpc-...
	CIDR4   netip.Prefix
	CIDR6   netip.Prefix // invalid when the VPC has no IPv6
	Router  *NS
	Client  *NS
	Client4 netip.Addr // the client's address
	Client6 netip.Addr // invalid without IPv6
	// OnPrem is a client beyond the VPC's CIDR that the VPC routes to (an
	// on-premises network behind a VPN, say): no main-table VPC route can
	// bring its replies back, only the ENI's source rule. Nil when absent.
	OnPrem  *NS
	OnPrem4 netip.Addr
	// NATClient is the VPC's client at NATClientAddr, in its second CIDR
	// NATCIDR, that reaches the internet through the instance's NAT
	// (Options.NAT). Nil when absent.
	NATClient *NS
}

// The addresses of Options.NAT's world.
var (
	NATCIDR       = netip.MustParsePrefix("100.64.0.0/16")
	NATClientAddr = netip.MustParseAddr("100.64.1.5")
	InternetAddr  = netip.MustParseAddr("203.0.113.5")
	ContainerAddr = netip.MustParseAddr("172.17.0.2")
)

// ENI is one simulated elastic network interface: a veth whose instance end
// carries the ENI's MAC and whose peer (RouterLink, in the VPC's router)
// plays the subnet's VPC router.
type ENI struct {
	Link       string // name inside the instance: eth0, eth1, ...
	MAC        string
	ID         string
	Card       int // network card
	Device     int
	VPC        *VPC
	SubnetID   string
	Subnet4    netip.Prefix
	Subnet6    netip.Prefix // invalid when the subnet has no IPv6
	Gateway4   netip.Addr
	RouterLink string // the veth peer's name in the router namespace

	mu       sync.Mutex
	desc     imds.ENI // what IMDS says; LocalIPv4s[0] is the primary private IP ("DHCP")
	attached bool
}

// IPv4s returns the ENI's private IPv4 addresses, primary first.
func (e *ENI) IPv4s() []netip.Addr {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.desc.LocalIPv4s)
}

// IPv6s returns the ENI's IPv6 addresses.
func (e *ENI) IPv6s() []netip.Addr {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.desc.IPv6s)
}

// IsPrimary says whether the ENI is the instance's primary: card 0, device 0.
func (e *ENI) IsPrimary() bool { return e.Card == 0 && e.Device == 0 }

// Primary4 is the ENI's primary private IPv4 address.
func (e *ENI) Primary4() netip.Addr { return e.IPv4s()[0] }

// Attached says whether the ENI is currently attached to the instance.
func (e *ENI) Attached() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.attached
}

// Options configure New.
type Options struct {
	// DualhomedBin is the dualhomed program StartDaemon runs.
	DualhomedBin string
	// Instance, when set, is the instance to simulate instead of the four
	// VPCs of the package comment.
	Instance *emulator.Instance
	// NAT adds the shared NAT's hosts of the package comment to the four
	// VPCs.
	NAT bool
	// MinimalBoot boots the instance as a minimal image does, the benchmarks'
	// starting point: DHCPv4 configures only the primary ENI (at boot; a
	// hot-attached ENI gets nothing), and rp_filter keeps the kernel's
	// default (0). dualhomed then configures every secondary ENI itself.
	MinimalBoot bool
}

// World is the simulated instance with its VPCs.
type World struct {
	Prefix   string
	Dir      string // the world's files (configuration, logs, state), removed by Close
	Instance *NS
	VPCs     map[string]*VPC // by name: A, B, C, D
	ENIs     []*ENI          // eth0..eth3 (eth3 starts detached)
	// Internet and Container are the internet host and the container of
	// Options.NAT; nil without it.
	Internet, Container *NS
	// IMDS is the emulator once StartIMDS has run.
	IMDS *emulator.Server

	base    emulator.Instance // what IMDS serves besides the attached ENIs
	opts    Options
	mu      sync.Mutex
	all     []*NS // every namespace, in creation order
	procs   []*Proc
	closers []func() error
	closed  bool
}

var worldSeq atomic.Int64

// prefixPattern matches every namespace name a world creates; the pid lets
// the sweeper tell a live run from a crashed one.
var prefixPattern = regexp.MustCompile(`^dh([0-9]+)w[0-9]+-`)

// New builds the world. On error everything already built is removed.
func New(opts Options) (w *World, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("building the simulated instance needs root (network namespaces)")
	}
	w = &World{
		Prefix: fmt.Sprintf("dh%dw%d-", os.Getpid(), worldSeq.Add(1)),
		VPCs:   map[string]*VPC{},
		opts:   opts,
	}
	defer func() {
		if err != nil {
			w.Close()
			w = nil
		}
	}()
	if w.Dir, err = os.MkdirTemp("", w.Prefix); err != nil {
		return w, fmt.Errorf("creating world directory: %w", err)
	}
	if err = os.Mkdir(w.StateDir(), 0o755); err != nil {
		return w, fmt.Errorf("creating state directory: %w", err)
	}
	if w.Instance, err = w.newNS("inst"); err != nil {
		return w, err
	}
	// Like the sysctl defaults of systemd and Ubuntu: loose reverse path
	// filtering on every link, so a request on eth1 is accepted and its reply
	// is lost on the way back, as on a real instance.
	for _, conf := range []string{"default", "all"} {
		if !opts.MinimalBoot {
			if err = w.Instance.SetSysctl("net/ipv4/conf/"+conf+"/rp_filter", "2"); err != nil {
				return w, err
			}
		}
	}
	vpcs, enis := defaultWorld()
	if opts.Instance != nil {
		vpcs, enis = instanceWorld(*opts.Instance)
		w.base = opts.Instance.Clone()
	} else {
		w.base = emulator.Instance{InstanceID: "i-0d0a1b0c0e0d0e000", InstanceType: "c6in.large", Region: "us-east-1", PrimaryMAC: enis[0].MAC}
	}
	for _, v := range vpcs {
		if err = w.addVPC(v); err != nil {
			return w, err
		}
	}
	for _, e := range enis {
		if err = w.addENI(e); err != nil {
			return w, err
		}
	}
	if opts.NAT && opts.Instance == nil {
		err = w.addNATHosts()
	}
	return w, err
}

// addNATHosts adds the hosts of Options.NAT.
func (w *World) addNATHosts() error {
	var err error
	if w.Internet, err = w.hostBehind(w.VPCs["A"].Router, "inet", "igw", InternetAddr, netip.Addr{}); err != nil {
		return err
	}
	if w.Container, err = w.hostBehind(w.Instance, "ctr", "docker0", ContainerAddr, netip.Addr{}); err != nil {
		return err
	}
	for _, e := range []*ENI{w.ENI("eth1"), w.ENI("eth2")} {
		v := e.VPC
		if v.NATClient, err = w.hostBehind(v.Router, "nat"+v.Name, "nat", NATClientAddr, netip.Addr{}); err != nil {
			return err
		}
		e.desc.VPCIPv4CIDRs = append(e.desc.VPCIPv4CIDRs, NATCIDR)
		if err := addRoute(v.Router.NL, &netlink.Route{Gw: e.Primary4().AsSlice()}); err != nil {
			return fmt.Errorf("sending VPC %s's default route to %s: %w", v.Name, e.Link, err)
		}
	}
	return nil
}

// defaultWorld is the four VPCs of the package comment and their ENIs.
func defaultWorld() ([]*VPC, []*ENI) {
	vpcs := []*VPC{
		{Name: "A", ID: "vpc-0aaaaaaaaaaaaaaaa", CIDR4: netip.MustParsePrefix("10.0.0.0/16"),
			Client4: netip.MustParseAddr("10.0.100.50")},
		{Name: "B", ID: "vpc-0bbbbbbbbbbbbbbbb", CIDR4: netip.MustParsePrefix("10.1.0.0/16"),
			CIDR6:   netip.MustParsePrefix("fd00:b:0::/56"),
			Client4: netip.MustParseAddr("10.1.100.50"), Client6: netip.MustParseAddr("fd00:b:0:64::50"),
			OnPrem4: netip.MustParseAddr("198.18.0.50")},
		{Name: "C", ID: "vpc-0cccccccccccccccc", CIDR4: netip.MustParsePrefix("10.0.0.0/16"),
			Client4: netip.MustParseAddr("10.0.100.50")},
		{Name: "D", ID: "vpc-0dddddddddddddddd", CIDR4: netip.MustParsePrefix("10.3.0.0/16"),
			CIDR6:   netip.MustParsePrefix("fd00:d:0::/56"),
			Client4: netip.MustParseAddr("10.3.100.50"), Client6: netip.MustParseAddr("fd00:d:0:64::50")},
	}
	mk := func(v *VPC, dev int, subnet4, subnet6 string, attached bool, ipv6s ...string) *ENI {
		x := strings.ToLower(v.Name)
		d := imds.ENI{
			MAC:          fmt.Sprintf("02:00:00:00:0%s:%02x", x, dev),
			Ready:        true,
			DeviceNumber: dev,
			InterfaceID:  fmt.Sprintf("eni-0%s%015d", x+x, dev),
			SubnetID:     fmt.Sprintf("subnet-0%s%014d", x+x, dev),
			VPCID:        v.ID,
			OwnerID:      OwnerID,
			VPCIPv4CIDRs: []netip.Prefix{v.CIDR4},
		}
		d.SubnetIPv4CIDR = netip.MustParsePrefix(subnet4)
		d.LocalIPv4s = []netip.Addr{addrIn(d.SubnetIPv4CIDR, 10)}
		if subnet6 != "" {
			d.SubnetIPv6CIDRs = []netip.Prefix{netip.MustParsePrefix(subnet6)}
			d.VPCIPv6CIDRs = []netip.Prefix{v.CIDR6}
		}
		for _, a := range ipv6s {
			d.IPv6s = append(d.IPv6s, netip.MustParseAddr(a))
		}
		e := newENI(fmt.Sprintf("eth%d", dev), fmt.Sprintf("eni%d", dev), v, d)
		e.attached = attached
		return e
	}
	return vpcs, []*ENI{
		mk(vpcs[0], 0, "10.0.1.0/24", "", true),
		mk(vpcs[1], 1, "10.1.1.0/24", "fd00:b:0:1::/64", true, "fd00:b:0:1::10"),
		mk(vpcs[2], 2, "10.0.2.0/24", "", true),
		mk(vpcs[3], 3, "10.3.1.0/24", "fd00:d:0:1::/64", false, "fd00:d:0:1::10"),
	}
}

// instanceWorld is a VPC for each VPC ID of inst and an attached ENI for
// each of its ENIs; a VPC's client is .50 of the last /24 of its first IPv4
// CIDR, outside the ENIs' subnets where those sit low in the VPC.
func instanceWorld(inst emulator.Instance) ([]*VPC, []*ENI) {
	var vpcs []*VPC
	var enis []*ENI
	for i, d := range inst.ENIs {
		k := slices.IndexFunc(vpcs, func(v *VPC) bool { return v.ID == d.VPCID })
		if k < 0 {
			v := &VPC{Name: strconv.Itoa(len(vpcs)), ID: d.VPCID, CIDR4: d.VPCIPv4CIDRs[0].Masked()}
			a := v.CIDR4.Addr().As4()
			last := binary.BigEndian.Uint32(a[:]) | (1<<(32-v.CIDR4.Bits()) - 1)
			binary.BigEndian.PutUint32(a[:], last&^0xff|50)
			v.Client4 = netip.AddrFrom4(a)
			if len(d.VPCIPv6CIDRs) > 0 {
				v.CIDR6 = d.VPCIPv6CIDRs[0]
			}
			k, vpcs = len(vpcs), append(vpcs, v)
		}
		e := newENI(fmt.Sprintf("eth%d", i), fmt.Sprintf("eni%d", i), vpcs[k], d)
		e.attached = true
		enis = append(enis, e)
	}
	return vpcs, enis
}

// newENI is the ENI that IMDS describes as d, its link called link in the
// instance and routerLink in its VPC's router.
func newENI(link, routerLink string, v *VPC, d imds.ENI) *ENI {
	e := &ENI{
		Link: link, MAC: d.MAC, ID: d.InterfaceID, Card: d.NetworkCard, Device: d.DeviceNumber, VPC: v,
		SubnetID: d.SubnetID, Subnet4: d.SubnetIPv4CIDR, Gateway4: d.SubnetIPv4CIDR.Masked().Addr().Next(),
		RouterLink: routerLink, desc: d,
	}
	if len(d.SubnetIPv6CIDRs) > 0 {
		e.Subnet6 = d.SubnetIPv6CIDRs[0]
	}
	return e
}

// addrIn returns the host'th address of p (IPv4).
func addrIn(p netip.Prefix, host int) netip.Addr {
	a := p.Masked().Addr().As4()
	a[3] += byte(host)
	return netip.AddrFrom4(a)
}

func (w *World) newNS(name string) (*NS, error) {
	n, err := newNS(w.Prefix + name)
	if err != nil {
		return nil, err
	}
	w.mu.Lock()
	w.all = append(w.all, n)
	w.mu.Unlock()
	return n, nil
}

// addVPC builds the VPC's router and client namespaces and the client
// subnet, and the on-premises client if the VPC has one.
func (w *World) addVPC(v *VPC) error {
	var err error
	if v.Router, err = w.newNS("rtr" + v.Name); err != nil {
		return err
	}
	if err := v.Router.SetSysctl("net/ipv4/ip_forward", "1"); err != nil {
		return err
	}
	if v.CIDR6.IsValid() {
		if err := v.Router.SetSysctl("net/ipv6/conf/all/forwarding", "1"); err != nil {
			return err
		}
	}
	if v.Client, err = w.hostBehind(v.Router, "cli"+v.Name, "cli", v.Client4, v.Client6); err != nil {
		return err
	}
	if v.OnPrem4.IsValid() {
		if v.OnPrem, err = w.hostBehind(v.Router, "onp"+v.Name, "onprem", v.OnPrem4, netip.Addr{}); err != nil {
			return err
		}
	}
	w.VPCs[v.Name] = v
	return nil
}

// hostBehind makes a namespace holding one host at a4 (and a6 if valid) on
// its eth0, on a /24 (/64) whose .1 (::1) is router's link routerLink and
// its default route.
func (w *World) hostBehind(router *NS, name, routerLink string, a4, a6 netip.Addr) (*NS, error) {
	n, err := w.newNS(name)
	if err != nil {
		return nil, err
	}
	rl, err := router.VethPair(routerLink, nil, &n.NS, "eth0", nil)
	if err != nil {
		return nil, err
	}
	l, err := n.NL.LinkByName("eth0")
	if err != nil {
		return nil, fmt.Errorf("finding eth0 in %s: %w", n.Name, err)
	}
	for _, a := range []netip.Prefix{netip.PrefixFrom(a4, 24), netip.PrefixFrom(a6, 64)} {
		if !a.IsValid() {
			continue
		}
		gw := a.Masked().Addr().Next()
		if err := addAddr(router.NL, rl, netip.PrefixFrom(gw, a.Bits())); err != nil {
			return nil, err
		}
		if err := addAddr(n.NL, l, a); err != nil {
			return nil, err
		}
		dflt := &net.IPNet{IP: make(net.IP, a.Addr().BitLen()/8), Mask: make(net.IPMask, a.Addr().BitLen()/8)}
		if err := addRoute(n.NL, &netlink.Route{LinkIndex: l.Attrs().Index, Dst: dflt, Gw: gw.AsSlice()}); err != nil {
			return nil, fmt.Errorf("adding the default route via %s in %s: %w", gw, n.Name, err)
		}
	}
	return n, nil
}

// addENI adds the ENI to the world; an attached one gets its link, in the
// instance from the start, and its boot-time configuration.
func (w *World) addENI(e *ENI) error {
	w.ENIs = append(w.ENIs, e)
	if !e.attached {
		return nil
	}
	if err := w.addLink(e, w.Instance); err != nil {
		return err
	}
	return w.bootENI(e)
}

// addLink creates the ENI's veth pair in its VPC's router, the ENI end
// (named e.Link, with e.MAC) inside ns. The router end holds the subnet's
// gateway and fe80:ec2::1, and re-probes ARP every 10 ms instead of every
// second: a client pinging an ENI address before it exists must not wait a
// whole retransmit interval once it does (a real VPC router answers at once).
func (w *World) addLink(e *ENI, ns *NS) error {
	r := e.VPC.Router
	mac, err := net.ParseMAC(e.MAC)
	if err != nil {
		return fmt.Errorf("parsing MAC %s: %w", e.MAC, err)
	}
	rl, err := r.VethPair(e.RouterLink, nil, &ns.NS, e.Link, mac)
	if err != nil {
		return err
	}
	// Before the addresses: the first probe's timer takes the value in force.
	// Namespaces other than the host's have no neigh "default" entry: per link.
	if err := r.SetSysctl("net/ipv4/neigh/"+e.RouterLink+"/retrans_time_ms", "10"); err != nil {
		return err
	}
	if e.Subnet4.IsValid() {
		if err := addAddr(r.NL, rl, netip.PrefixFrom(e.Gateway4, e.Subnet4.Bits())); err != nil {
			return err
		}
	}
	if err := addAddr(r.NL, rl, netip.MustParsePrefix(RouterIPv6+"/64")); err != nil {
		return err
	}
	if e.Subnet6.IsValid() {
		// The VPC router reaches the subnet on-link, without a global address of its own.
		if err := addRoute(r.NL, &netlink.Route{LinkIndex: rl.Attrs().Index, Dst: prefixIPNet(e.Subnet6), Scope: netlink.SCOPE_LINK}); err != nil {
			return fmt.Errorf("adding route to %s in %s: %w", e.Subnet6, r.Name, err)
		}
	}
	return nil
}

// bootENI does what DHCP does on a real instance when the ENI comes up: its
// primary private IPv4 (and IPv6) with the subnet's prefix route, and for
// the primary ENI (card 0, device 0) the main table's default route. With
// MinimalBoot only the primary ENI gets its IPv4 and default route.
func (w *World) bootENI(e *ENI) error {
	if w.opts.MinimalBoot && !e.IsPrimary() {
		return nil
	}
	h := w.Instance.NL
	l, err := h.LinkByName(e.Link)
	if err != nil {
		return fmt.Errorf("finding %s in the instance: %w", e.Link, err)
	}
	if err := addAddr(h, l, netip.PrefixFrom(e.Primary4(), e.Subnet4.Bits())); err != nil {
		return err
	}
	if e.Subnet6.IsValid() && len(e.IPv6s()) > 0 && !w.opts.MinimalBoot {
		if err := addAddr(h, l, netip.PrefixFrom(e.IPv6s()[0], e.Subnet6.Bits())); err != nil {
			return err
		}
	}
	if e.IsPrimary() {
		rt := &netlink.Route{
			LinkIndex: l.Attrs().Index,
			Gw:        e.Gateway4.AsSlice(),
			Src:       e.Primary4().AsSlice(),
			Protocol:  unix.RTPROT_DHCP,
			Priority:  512,
		}
		if err := addRoute(h, rt); err != nil {
			return fmt.Errorf("adding the main default route via %s: %w", e.Link, err)
		}
	}
	return nil
}

// ENI returns the ENI whose instance link is named link (eth0..eth3).
func (w *World) ENI(link string) *ENI {
	for _, e := range w.ENIs {
		if e.Link == link {
			return e
		}
	}
	panic("simworld: no ENI " + link)
}

// Close tears the world down: processes first (they keep namespaces alive),
// then every namespace (their veths go with them), then the directory.
// It is safe to call more than once and after a partial New.
func (w *World) Close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil
	}
	w.closed = true
	procs, all, closers := w.procs, w.all, w.closers
	w.mu.Unlock()
	var errs []error
	for i := len(closers) - 1; i >= 0; i-- {
		if err := closers[i](); err != nil {
			errs = append(errs, err)
		}
	}
	for _, p := range procs {
		_ = p.Stop(2 * time.Second) // SIGTERM, then SIGKILL; its exit status is not our business here
	}
	for i := len(all) - 1; i >= 0; i-- {
		if err := all[i].close(); err != nil {
			errs = append(errs, err)
		}
	}
	if w.Dir != "" {
		if err := os.RemoveAll(w.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// onClose registers fn to run first when the world closes.
func (w *World) onClose(fn func() error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closers = append(w.closers, fn)
}

// Namespaces lists the names of every namespace of the world.
func (w *World) Namespaces() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var names []string
	for _, n := range w.all {
		names = append(names, n.Name)
	}
	return names
}

// Sweep removes namespaces left behind by crashed runs: every /run/netns entry
// with this package's prefix whose creating process is gone. It kills what
// still runs inside them first. It returns the names it removed.
func Sweep() ([]string, error) {
	entries, err := os.ReadDir("/run/netns")
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing /run/netns: %w", err)
	}
	var removed []string
	var errs []error
	for _, e := range entries {
		m := prefixPattern.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		if pid == os.Getpid() || processAlive(pid) {
			continue
		}
		killNSProcesses(e.Name())
		if err := deleteNamedNS(e.Name()); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, e.Name())
	}
	return removed, errors.Join(errs...)
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// addAddr is `ip addr add <p> dev <l> nodad`; an existing address is fine.
func addAddr(h *netlink.Handle, l netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: prefixIPNet(p)}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(l, a); err != nil && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("adding address %s to %s: %w", p, l.Attrs().Name, err)
	}
	return nil
}

func addRoute(h *netlink.Handle, r *netlink.Route) error {
	if err := h.RouteAdd(r); err != nil && !errors.Is(err, syscall.EEXIST) {
		return err
	}
	return nil
}

// prefixIPNet keeps the host bits (an interface address with its prefix length).
func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// WaitFor polls cond every 20ms until it returns nil or ctx ends; it returns
// cond's last error when ctx ends.
func WaitFor(ctx context.Context, cond func() error) error {
	var last error
	for {
		if last = cond(); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ServeEcho starts a TCP echo server on port in ns (every address, IPv4 and
// IPv6), stopped when the world closes.
func (w *World) ServeEcho(ns *NS, port int) error {
	s, err := ListenEcho(ns, port)
	if err != nil {
		return err
	}
	w.onClose(s.Close)
	return nil
}

// Procs lists the programs started in the world.
func (w *World) Procs() []*Proc {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]*Proc(nil), w.procs...)
}
