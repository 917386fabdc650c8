package matrix

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// The world of one configuration, outside its container; every namespace
// name starts with the configuration's prefix (mx<pid>c<n>-):
//
//	VPC  CIDR         client (cliX)   router (rtrX): ENI link, gateway   ENI in the container
//	A    10.0.0.0/16  10.0.100.50     eni0 10.0.1.1/24, IMDS, dnsmasq   eth0 10.0.1.10 (primary)
//	B    10.1.0.0/16  10.1.100.50     eni1 10.1.1.1/24, dnsmasq         eth1 10.1.1.10
//	C    10.0.0.0/16  10.0.100.50     eni2 10.0.2.1/24, dnsmasq         eth2 10.0.2.10
//	D    10.3.0.0/16  10.3.100.50     eni3 10.3.1.1/24, dnsmasq         eth3 10.3.1.10 (hot attach)
//
// VPC C reuses VPC A's CIDR and client address. The container's network
// namespace (inst) is made by the harness and systemd-nspawn runs inside it
// (see container.boot), so the harness holds it and reads it directly. A
// reboot makes a new one (as a new kernel would: no addresses, routes or
// rules survive) and moves the ENIs into it.
// Each router's dnsmasq hands out its ENI's primary address, the router and
// MTU 9001 by DHCP with 2-minute leases renewed every 20 s.
// IMDS (the emulator, in this process) answers on 169.254.169.254:80 in
// every router, with IMDS's dated API versions mapped onto the emulator's
// /latest (cloud-init asks for /2021-03-23/...); the container reaches it
// through a DHCP default route, as on EC2.

const (
	imdsAddr = "169.254.169.254"
	echoPort = 7007
	// leaseTime is dnsmasq's shortest; renewAfter (DHCP option 58, T1)
	// makes every ENI renew three times in each 60 s quiet window.
	leaseTime  = "2m"
	renewAfter = 20 * time.Second
	ownerID    = "123456789012"
)

type vpc struct {
	name    string
	id      string
	cidr    netip.Prefix
	client4 netip.Addr
	router  *simworld.NS
	client  *simworld.NS
}

type eni struct {
	link    string // name in the container
	mac     string
	id      string
	dev     int
	vpc     *vpc
	subnet  netip.Prefix
	primary netip.Addr
	extra   []netip.Addr // secondary IPv4s in IMDS
	// offerDelay delays the DHCP server's offers (dnsmasq --dhcp-reply-delay).
	offerDelay time.Duration
	rlink      string // the router's end
	// attached is true while the link is in the container's namespace.
	attached bool
}

func (e *eni) gateway() netip.Addr { return e.subnet.Masked().Addr().Next() }

// world is one configuration's namespaces and the processes serving them.
type world struct {
	prefix string
	dir    string
	vpcs   map[string]*vpc
	enis   []*eni
	inst   *simworld.NS
	echo   *simworld.EchoServer
	imds   *emulator.Server
	logf   func(string, ...any)

	mu     sync.Mutex
	nss    []*simworld.NS
	procs  []*exec.Cmd
	proxy  *http.Server
	closed bool
}

// newNamedNS is `ip netns add name` with lo up and deterministic sysctls.
func newNamedNS(name string) (*simworld.NS, error) {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("adding namespace %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	h, err := netns.GetFromName(name)
	if err != nil {
		return nil, fmt.Errorf("opening namespace %s: %w", name, err)
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("netlink handle in %s: %w", name, err)
	}
	n := &simworld.NS{Name: name, NS: nstest.NS{Handle: h, NL: nl}}
	lo, err := nl.LinkByName("lo")
	if err == nil {
		err = nl.LinkSetUp(lo)
	}
	if err != nil {
		return n, fmt.Errorf("bringing up lo in %s: %w", name, err)
	}
	for _, s := range [][2]string{
		{"net/ipv6/conf/all/accept_dad", "0"}, {"net/ipv6/conf/default/accept_dad", "0"},
		{"net/ipv6/conf/all/accept_ra", "0"}, {"net/ipv6/conf/default/accept_ra", "0"},
		{"net/ipv4/conf/all/rp_filter", "0"}, {"net/ipv4/conf/default/rp_filter", "0"},
	} {
		if err := n.SetSysctl(s[0], s[1]); err != nil {
			return n, err
		}
	}
	return n, nil
}

// deleteNS kills what runs in the namespace (a container's systemd among
// them), then removes it.
func deleteNS(n *simworld.NS) {
	if n.NL != nil {
		n.NL.Close()
	}
	n.Handle.Close()
	killNSProcesses(n.Name)
	_ = exec.Command("ip", "netns", "delete", n.Name).Run()
}

func killNSProcesses(name string) {
	out, _ := exec.Command("ip", "netns", "pids", name).Output()
	for _, f := range strings.Fields(string(out)) {
		var pid int
		if _, err := fmt.Sscan(f, &pid); err == nil && pid != os.Getpid() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

func (w *world) ns(name string) (*simworld.NS, error) {
	n, err := newNamedNS(w.prefix + name)
	if n != nil {
		w.mu.Lock()
		w.nss = append(w.nss, n)
		w.mu.Unlock()
	}
	return n, err
}

func defaultVPCs() []*vpc {
	return []*vpc{
		{name: "A", id: "vpc-0aaaaaaaaaaaaaaaa", cidr: netip.MustParsePrefix("10.0.0.0/16"), client4: netip.MustParseAddr("10.0.100.50")},
		{name: "B", id: "vpc-0bbbbbbbbbbbbbbbb", cidr: netip.MustParsePrefix("10.1.0.0/16"), client4: netip.MustParseAddr("10.1.100.50")},
		{name: "C", id: "vpc-0cccccccccccccccc", cidr: netip.MustParsePrefix("10.0.0.0/16"), client4: netip.MustParseAddr("10.0.100.50")},
		{name: "D", id: "vpc-0dddddddddddddddd", cidr: netip.MustParsePrefix("10.3.0.0/16"), client4: netip.MustParseAddr("10.3.100.50")},
	}
}

// newWorld builds the VPCs, the ENIs (eth0..eth2 parked, ready for the
// first boot; eth3 parked for hot attach), dnsmasq in every router and IMDS.
// eth3's DHCP server delays its offers by eth3OfferDelay (whole seconds).
func newWorld(prefix, dir string, eth3OfferDelay time.Duration, logf func(string, ...any)) (w *world, err error) {
	w = &world{prefix: prefix, dir: dir, vpcs: map[string]*vpc{}, logf: logf}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	registerWorld(w)
	defer func() {
		if err != nil {
			w.close()
		}
	}()
	for _, v := range defaultVPCs() {
		if v.router, err = w.ns("rtr" + v.name); err != nil {
			return w, err
		}
		if v.client, err = w.ns("cli" + v.name); err != nil {
			return w, err
		}
		if err = v.router.SetSysctl("net/ipv4/ip_forward", "1"); err != nil {
			return w, err
		}
		if err = veth(v.router, "cli", v.client, "eth0", "", 1500); err != nil {
			return w, err
		}
		gw := netip.PrefixFrom(netip.AddrFrom4([4]byte{v.client4.As4()[0], v.client4.As4()[1], 100, 1}), 24)
		if _, err = v.router.IP("addr", "add", gw.String(), "dev", "cli"); err != nil {
			return w, err
		}
		if _, err = v.client.IP("addr", "add", netip.PrefixFrom(v.client4, 24).String(), "dev", "eth0"); err != nil {
			return w, err
		}
		if _, err = v.client.IP("route", "add", "default", "via", gw.Addr().String()); err != nil {
			return w, err
		}
		w.vpcs[v.name] = v
	}
	for i, name := range []string{"A", "B", "C", "D"} {
		v := w.vpcs[name]
		subnet := netip.MustParsePrefix([]string{"10.0.1.0/24", "10.1.1.0/24", "10.0.2.0/24", "10.3.1.0/24"}[i])
		a := subnet.Addr().As4()
		a[3] = 10
		e := &eni{
			link:    fmt.Sprintf("eth%d", i),
			mac:     fmt.Sprintf("02:00:00:00:0%s:%02x", strings.ToLower(name), i),
			id:      fmt.Sprintf("eni-0%s%015d", strings.Repeat(strings.ToLower(name), 2), i),
			dev:     i,
			vpc:     v,
			subnet:  subnet,
			primary: netip.AddrFrom4(a),
			rlink:   fmt.Sprintf("eni%d", i),
		}
		if i == 3 {
			e.offerDelay = eth3OfferDelay
		}
		// The ENI's container end is parked in its router's namespace
		// until a boot or a hot attach moves it in.
		if err = veth(v.router, e.rlink, v.router, e.link, e.mac, 9001); err != nil {
			return w, err
		}
		if _, err = v.router.IP("addr", "add", netip.PrefixFrom(e.gateway(), 24).String(), "dev", e.rlink); err != nil {
			return w, err
		}
		if err = w.startDnsmasq(v.router, e); err != nil {
			return w, err
		}
		w.enis = append(w.enis, e)
	}
	if err = w.startIMDS(); err != nil {
		return w, err
	}
	return w, nil
}

// veth is `ip link add name type veth peer peerName` inside ns (the peer in
// peerNS), both ends up, with an optional peer MAC and an MTU.
func veth(ns *simworld.NS, name string, peerNS *simworld.NS, peerName, peerMAC string, mtu int) error {
	la := netlink.NewLinkAttrs()
	la.Name = name
	la.MTU = mtu
	v := &netlink.Veth{LinkAttrs: la, PeerName: peerName}
	if peerMAC != "" {
		mac, err := net.ParseMAC(peerMAC)
		if err != nil {
			return err
		}
		v.PeerHardwareAddr = mac
	}
	if peerNS != ns {
		v.PeerNamespace = netlink.NsFd(peerNS.Handle)
	}
	if err := ns.NL.LinkAdd(v); err != nil {
		return fmt.Errorf("adding veth %s/%s in %s: %w", name, peerName, ns.Name, err)
	}
	for _, x := range []struct {
		ns   *simworld.NS
		name string
	}{{ns, name}, {peerNS, peerName}} {
		l, err := x.ns.NL.LinkByName(x.name)
		if err != nil {
			return fmt.Errorf("finding %s in %s: %w", x.name, x.ns.Name, err)
		}
		if err := x.ns.NL.LinkSetMTU(l, mtu); err != nil {
			return fmt.Errorf("setting MTU of %s: %w", x.name, err)
		}
		if x.name == name || peerNS != ns {
			if err := x.ns.NL.LinkSetUp(l); err != nil {
				return fmt.Errorf("setting %s up in %s: %w", x.name, x.ns.Name, err)
			}
		}
	}
	return nil
}

// start runs a program in ns with its output in dir/<name>.log; it is
// killed when the world closes.
func (w *world) start(ns *simworld.NS, name string, args ...string) (*exec.Cmd, error) {
	f, err := os.OpenFile(filepath.Join(w.dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name}, args...)...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s in %s: %w", name, ns.Name, err)
	}
	go func() { _ = cmd.Wait(); f.Close() }()
	w.mu.Lock()
	w.procs = append(w.procs, cmd)
	w.mu.Unlock()
	return cmd, nil
}

// startDnsmasq serves the ENI's subnet: its primary address to its MAC
// only, the router, MTU 9001, 2-minute leases renewed after 20 s; no DNS.
func (w *world) startDnsmasq(r *simworld.NS, e *eni) error {
	args := []string{"dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
		"--port=0", "--no-resolv", "--no-hosts", "--user=root", "--group=root", "--pid-file=",
		"--bind-interfaces", "--interface=" + e.rlink, "--except-interface=lo", "--dhcp-authoritative",
		fmt.Sprintf("--dhcp-range=%s,static,255.255.255.0,%s", e.primary, leaseTime),
		fmt.Sprintf("--dhcp-host=%s,%s", e.mac, e.primary),
		"--dhcp-option=option:router," + e.gateway().String(),
		"--dhcp-option=option:mtu,9001",
		fmt.Sprintf("--dhcp-option=option:T1,%d", int(renewAfter.Seconds())),
		"--dhcp-leasefile=" + filepath.Join(w.dir, "leases-"+e.link),
		"--log-dhcp", "--log-facility=" + w.dhcpLog(e)}
	if e.offerDelay > 0 {
		args = append(args, fmt.Sprintf("--dhcp-reply-delay=%d", int(e.offerDelay.Seconds())))
	}
	_, err := w.start(r, "dnsmasq-"+e.link, args...)
	return err
}

func (w *world) dhcpLog(e *eni) string { return filepath.Join(w.dir, "dhcp-"+e.link+".log") }

// acks counts the DHCPACKs dnsmasq sent to the ENI so far.
func (w *world) acks(e *eni) int {
	b, _ := os.ReadFile(w.dhcpLog(e))
	return len(regexp.MustCompile(`DHCPACK\(`+e.rlink+`\) `).FindAll(b, -1))
}

func (e *eni) imds() imds.ENI {
	return imds.ENI{
		MAC: e.mac, Ready: true, DeviceNumber: e.dev, InterfaceID: e.id,
		SubnetID: "subnet-" + e.id[4:], VPCID: e.vpc.id, OwnerID: ownerID,
		SubnetIPv4CIDR: e.subnet, VPCIPv4CIDRs: []netip.Prefix{e.vpc.cidr},
		LocalIPv4s: append([]netip.Addr{e.primary}, e.extra...),
	}
}

// startIMDS serves the instance (eth0..eth2 attached) from an IMDS emulator
// in this process, on 169.254.169.254:80 in every router, with IMDS's dated
// API versions mapped onto the emulator's /latest.
func (w *world) startIMDS() error {
	inst := emulator.Instance{InstanceID: "i-0d0a1b0c0e0d0e000", InstanceType: "c6in.large", PrimaryMAC: w.enis[0].mac}
	for _, e := range w.enis[:3] {
		inst.ENIs = append(inst.ENIs, e.imds())
	}
	w.imds = emulator.New(inst)
	dated := regexp.MustCompile(`^/[0-9]{4}-[0-9]{2}-[0-9]{2}(/|$)`)
	latest := http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		r.URL.Path = dated.ReplaceAllString(r.URL.Path, "/latest$1")
		// IMDSv1 allowed (HttpTokens=optional): cloud-init 22.4 asks for
		// an IMDSv2 token only once it has identified the platform as AWS
		// from DMI or /sys/hypervisor, which it does not read in a
		// container, and then reads IMDS the IMDSv1 way. A read without a
		// token gets one here; dualhomed always brings its own.
		if r.Method == http.MethodGet && r.Header.Get(emulator.TokenHeader) == "" {
			tr := httptest.NewRecorder()
			req := httptest.NewRequest(http.MethodPut, emulator.TokenPath, nil)
			req.Header.Set(emulator.TokenTTLHeader, "60")
			w.imds.ServeHTTP(tr, req)
			r.Header.Set(emulator.TokenHeader, tr.Body.String())
		}
		w.imds.ServeHTTP(rw, r)
	})
	w.proxy = &http.Server{Handler: latest, ReadHeaderTimeout: 5 * time.Second}
	// IMDS is a link-local service of every ENI on EC2 (its 1024 packets
	// per second limit is per ENI): every VPC router answers for it, so the
	// instance reaches it through whichever DHCP default route main prefers.
	for _, name := range []string{"A", "B", "C", "D"} {
		r := w.vpcs[name].router
		if _, err := r.IP("addr", "add", imdsAddr+"/32", "dev", "lo"); err != nil {
			return err
		}
		var ln net.Listener
		if err := r.Do(func() (err error) { ln, err = net.Listen("tcp", imdsAddr+":80"); return err }); err != nil {
			return fmt.Errorf("listening on %s:80 in %s: %w", imdsAddr, r.Name, err)
		}
		go func() { _ = w.proxy.Serve(ln) }()
	}
	return nil
}

// newInstance makes a fresh container namespace (closing the old one, as a
// power cycle would) and moves the ENIs that are attached into it, links
// down as after a boot. The echo server listens on every address there.
func (w *world) newInstance(attached ...string) error {
	if w.inst != nil {
		if err := w.parkAll(); err != nil {
			return err
		}
		if w.echo != nil {
			w.echo.Close()
		}
		deleteNS(w.inst)
		w.mu.Lock()
		w.nss = slices.DeleteFunc(w.nss, func(n *simworld.NS) bool { return n == w.inst })
		w.mu.Unlock()
	}
	n, err := w.ns(fmt.Sprintf("inst%d", time.Now().UnixNano()%1e6))
	if err != nil {
		return err
	}
	w.inst = n
	for _, name := range attached {
		if err := w.moveIn(w.eni(name), false); err != nil {
			return err
		}
	}
	w.echo, err = simworld.ListenEcho(n, echoPort)
	return err
}

func (w *world) eni(link string) *eni {
	for _, e := range w.enis {
		if e.link == link {
			return e
		}
	}
	panic("matrix: no ENI " + link)
}

// moveIn moves the ENI's parked end into the container's namespace, and
// returns when it is there (up only if asked: a hot-attached link arrives down).
func (w *world) moveIn(e *eni, up bool) error {
	r := e.vpc.router
	l, err := r.NL.LinkByName(e.link)
	if err != nil {
		return fmt.Errorf("finding parked %s in %s: %w", e.link, r.Name, err)
	}
	if err := r.NL.LinkSetNsFd(l, int(w.inst.Handle)); err != nil {
		return fmt.Errorf("moving %s into the container: %w", e.link, err)
	}
	e.attached = true
	if up {
		l, err = w.inst.NL.LinkByName(e.link)
		if err == nil {
			err = w.inst.NL.LinkSetUp(l)
		}
	}
	return err
}

// park moves the ENI's end back into its router's namespace.
func (w *world) park(e *eni) error {
	l, err := w.inst.NL.LinkByName(e.link)
	if err != nil {
		return fmt.Errorf("finding %s in the container: %w", e.link, err)
	}
	if err := w.inst.NL.LinkSetNsFd(l, int(e.vpc.router.Handle)); err != nil {
		return fmt.Errorf("moving %s out of the container: %w", e.link, err)
	}
	e.attached = false
	if l, err = e.vpc.router.NL.LinkByName(e.link); err == nil {
		_ = e.vpc.router.NL.LinkSetDown(l)
	}
	return nil
}

func (w *world) parkAll() error {
	for _, e := range w.enis {
		if e.attached {
			if err := w.park(e); err != nil {
				return err
			}
		}
	}
	return nil
}

// attach lists the ENI in IMDS, then its link appears in the container (down,
// as a hot-attached ENI does), as EC2 does it. It returns when the link is there.
func (w *world) attach(e *eni) error {
	if err := w.imds.AttachENI(e.imds()); err != nil {
		return fmt.Errorf("attaching %s in IMDS: %w", e.id, err)
	}
	return w.moveIn(e, false)
}

// detach removes the ENI from IMDS and its link from the container.
func (w *world) detach(e *eni) error {
	if err := w.imds.DetachENI(e.mac); err != nil {
		return fmt.Errorf("detaching %s in IMDS: %w", e.id, err)
	}
	return w.park(e)
}

// close stops every process and removes every namespace of the world.
func (w *world) close() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	procs, nss := w.procs, w.nss
	w.mu.Unlock()
	if w.proxy != nil {
		w.proxy.Close()
	}
	if w.echo != nil {
		w.echo.Close()
	}
	if w.imds != nil {
		w.imds.Close()
	}
	for _, p := range procs {
		if p.Process != nil {
			_ = syscall.Kill(-p.Process.Pid, syscall.SIGKILL)
		}
	}
	for i := len(nss) - 1; i >= 0; i-- {
		deleteNS(nss[i])
	}
	unregisterWorld(w)
}

// The open worlds, for the signal handler.
var (
	openMu sync.Mutex
	open   = map[*world]bool{}
)

func registerWorld(w *world) {
	openMu.Lock()
	open[w] = true
	openMu.Unlock()
}

func unregisterWorld(w *world) {
	openMu.Lock()
	delete(open, w)
	openMu.Unlock()
}

func closeAllWorlds() {
	openMu.Lock()
	var ws []*world
	for w := range open {
		ws = append(ws, w)
	}
	openMu.Unlock()
	for _, w := range ws {
		w.close()
	}
}
