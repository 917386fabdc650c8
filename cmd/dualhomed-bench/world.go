package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
	"github.com/dualhomed/dualhomed/netcfg/nstest"
	"github.com/dualhomed/dualhomed/netcfg/nsthread"
)

// world is the simulated instance. The process itself runs in the instance
// namespace (see main.go), so h, /proc/sys, the emulator's listener, curl, ip
// and the daemon all act there. The ENIs are veth pairs whose peers live in
// a second namespace playing the VPCs' routers.
type world struct {
	h        *netlink.Handle // the instance namespace
	self     netns.NsHandle  // the instance namespace, to move links into it
	vpc      netns.NsHandle
	vpcH     *netlink.Handle
	srv      *emulator.Server
	url      string // IMDS endpoint
	inst     emulator.Instance
	pristine kernelState // after boot: links up, the primary ENI's DHCP address and default route
}

// RPROT_DHCP marks the primary ENI's boot-time default route, as dhclient
// and systemd-networkd do.
const rtprotDHCP = 16

func eniLink(i int) string  { return fmt.Sprintf("eth%d", i) }
func peerLink(i int) string { return fmt.Sprintf("p%d", i) }

// newWorld prepares the two namespaces and starts the emulator on the
// instance namespace's loopback.
func newWorld() (*world, error) {
	w := &world{}
	var err error
	if w.self, err = netns.Get(); err != nil {
		return nil, fmt.Errorf("getting the instance namespace: %w", err)
	}
	if w.h, err = netlink.NewHandle(); err != nil {
		return nil, fmt.Errorf("opening netlink handle: %w", err)
	}
	if w.vpc, err = nstest.NewNamespace(); err != nil {
		w.Close()
		return nil, err
	}
	if w.vpcH, err = netlink.NewHandleAt(w.vpc); err != nil {
		w.Close()
		return nil, fmt.Errorf("opening netlink handle in the VPC namespace: %w", err)
	}
	for _, h := range []*netlink.Handle{w.h, w.vpcH} {
		lo, err := h.LinkByName("lo")
		if err == nil {
			err = h.LinkSetUp(lo)
		}
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("bringing lo up: %w", err)
		}
	}
	// Deterministic IPv6: no DAD delay and no router advertisements, so the
	// addresses every tool adds are usable at once and look the same.
	for _, k := range []string{
		"net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad",
		"net.ipv6.conf.all.accept_ra", "net.ipv6.conf.default.accept_ra",
	} {
		if err := writeSysctl(k, "0"); err != nil {
			w.Close()
			return nil, err
		}
	}
	w.srv = emulator.New(emulator.Instance{})
	if w.url, err = w.srv.Start("127.0.0.1:0"); err != nil {
		w.Close()
		return nil, err
	}
	return w, nil
}

func (w *world) Close() {
	if w.srv != nil {
		w.srv.Close()
	}
	if w.vpcH != nil {
		w.vpcH.Close()
	}
	if w.vpc.IsOpen() {
		w.vpc.Close()
	}
	if w.h != nil {
		w.h.Close()
	}
	if w.self.IsOpen() {
		w.self.Close()
	}
}

// build replaces the links with one veth per ENI of inst, configures the
// primary ENI as DHCP would at boot, serves inst from IMDS, and records the
// pristine state that every run starts from.
func (w *world) build(inst emulator.Instance) error {
	links, err := w.h.LinkList()
	for attempt := 0; errors.Is(err, netlink.ErrDumpInterrupted) && attempt < 5; attempt++ {
		time.Sleep(10 * time.Millisecond) // links changed during the dump: again
		links, err = w.h.LinkList()
	}
	if err != nil {
		return fmt.Errorf("listing links: %w", err)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, "eth") {
			if err := w.h.LinkDel(l); err != nil {
				return fmt.Errorf("deleting link %s: %w", l.Attrs().Name, err)
			}
		}
	}
	for i, e := range inst.ENIs {
		if err := w.addENI(i, e.MAC, false); err != nil {
			return err
		}
	}
	if err := w.configurePrimary(inst); err != nil {
		return err
	}
	if err := w.srv.SetInstance(inst); err != nil {
		return fmt.Errorf("serving the instance: %w", err)
	}
	w.inst = inst
	w.pristine, err = w.settle()
	return err
}

// settle waits until the kernel has finished reacting to new links (IPv6
// link-local addresses and multicast routes appear a moment after a link
// comes up) and returns the settled state.
func (w *world) settle() (kernelState, error) {
	prev, err := dumpKernel(w.h)
	if err != nil {
		return kernelState{}, err
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		time.Sleep(100 * time.Millisecond)
		cur, err := dumpKernel(w.h)
		if err != nil {
			return kernelState{}, err
		}
		if compareStates(prev, cur).Empty() && w.linkLocalsReady(cur) {
			return cur, nil
		}
		if time.Now().After(deadline) {
			return kernelState{}, errors.New("the kernel did not settle within 5 s after creating the links")
		}
		prev = cur
	}
}

// linkLocalsReady reports whether every ENI link has its IPv6 link-local address.
func (w *world) linkLocalsReady(s kernelState) bool {
	have := map[string]bool{}
	for _, a := range s.Addrs {
		if a.Prefix.Addr().IsLinkLocalUnicast() {
			have[s.linkName(a.LinkIndex)] = true
		}
	}
	for name := range s.LinkByNm {
		if strings.HasPrefix(name, "eth") && !have[name] {
			return false
		}
	}
	return true
}

// addENI creates ENI i's veth pair. With viaVPC the pair is created in the
// VPC namespace and the caller moves the ENI end in (see attach); otherwise
// it is created in place, up.
func (w *world) addENI(i int, mac string, viaVPC bool) error {
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return fmt.Errorf("parsing MAC %q: %w", mac, err)
	}
	la := netlink.NewLinkAttrs()
	la.Name = eniLink(i)
	la.HardwareAddr = hw
	veth := &netlink.Veth{LinkAttrs: la, PeerName: peerLink(i)}
	h := w.vpcH
	if !viaVPC {
		h = w.h
		veth.PeerNamespace = netlink.NsFd(w.vpc)
	}
	if err := h.LinkAdd(veth); err != nil {
		return fmt.Errorf("adding veth %s: %w", la.Name, err)
	}
	peer, err := w.vpcH.LinkByName(peerLink(i))
	if err == nil {
		err = w.vpcH.LinkSetUp(peer)
	}
	if err != nil {
		return fmt.Errorf("setting %s up: %w", peerLink(i), err)
	}
	// The router re-probes ARP every 10 ms instead of every second: a
	// client pinging an ENI address before it exists must not wait a whole
	// retransmit interval once it does (a real VPC router answers at once).
	// Non-initial namespaces have no neigh "default" entry: set it per link.
	err = nsthread.Do(w.vpc, func() error {
		return writeSysctl("net.ipv4.neigh."+peerLink(i)+".retrans_time_ms", "10")
	})
	if err != nil {
		return err
	}
	if viaVPC {
		return nil
	}
	l, err := w.h.LinkByName(la.Name)
	if err == nil {
		err = w.h.LinkSetUp(l)
	}
	if err != nil {
		return fmt.Errorf("setting %s up: %w", la.Name, err)
	}
	return nil
}

// configurePrimary gives eth0 its primary address and the main table's
// default route, as the DHCP client does when the instance boots.
func (w *world) configurePrimary(inst emulator.Instance) error {
	p, ok := primaryENI(inst)
	if !ok || len(p.LocalIPv4s) == 0 || !p.SubnetIPv4CIDR.IsValid() {
		return nil
	}
	l, err := w.h.LinkByName(eniLink(0))
	if err != nil {
		return fmt.Errorf("finding the primary ENI's link: %w", err)
	}
	addr := netip.PrefixFrom(p.LocalIPv4s[0], p.SubnetIPv4CIDR.Bits())
	if err := w.h.AddrAdd(l, &netlink.Addr{IPNet: ipNet(addr)}); err != nil {
		return fmt.Errorf("adding the primary address %s: %w", addr, err)
	}
	gw := p.SubnetIPv4CIDR.Masked().Addr().Next()
	r := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: gw.AsSlice(), Protocol: rtprotDHCP, Table: unix.RT_TABLE_MAIN}
	if err := w.h.RouteAdd(r); err != nil {
		return fmt.Errorf("adding the primary default route via %s: %w", gw, err)
	}
	return nil
}

func primaryENI(inst emulator.Instance) (imds.ENI, bool) {
	for _, e := range inst.ENIs {
		if e.MAC == inst.PrimaryMAC {
			return e, true
		}
	}
	return imds.ENI{}, false
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
