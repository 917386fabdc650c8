package simworld

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// imdsENI is what IMDS says about the ENI.
func (e *ENI) imdsENI() imds.ENI {
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.desc
	d.LocalIPv4s, d.IPv6s = slices.Clone(d.LocalIPv4s), slices.Clone(d.IPv6s)
	return d
}

// emulatedInstance is the emulator's model of the instance: the attached ENIs.
func (w *World) emulatedInstance() emulator.Instance {
	inst := w.base.Clone()
	inst.ENIs = nil
	for _, e := range w.ENIs {
		if e.Attached() {
			inst.ENIs = append(inst.ENIs, e.imdsENI())
		}
	}
	return inst
}

// StartIMDS serves the world's instance from an IMDS emulator that runs in
// this process and listens on IMDSListen inside the instance, and sets
// w.IMDS. Real IMDS answers from outside the instance's kernel too; the
// emulator's socket is the instance's, so dualhomed reaches it the same way.
func (w *World) StartIMDS() error {
	srv := emulator.New(w.emulatedInstance())
	var ln net.Listener
	err := w.Instance.Do(func() (err error) {
		ln, err = net.Listen("tcp", IMDSListen)
		return err
	})
	if err != nil {
		return fmt.Errorf("listening for IMDS in %s: %w", w.Instance.Name, err)
	}
	if _, err := srv.Serve(ln); err != nil {
		return err
	}
	w.onClose(srv.Close)
	w.IMDS = srv
	return nil
}

// AddIP assigns a secondary address (IPv4 or IPv6) to the ENI in IMDS, as
// `aws ec2 assign-private-ip-addresses` does: the OS is not told.
func (w *World) AddIP(e *ENI, a netip.Addr) error {
	return w.changeIPs(e, "assigning", a, func(v4, v6 []netip.Addr) ([]netip.Addr, []netip.Addr) {
		if a.Is4() {
			return append(v4, a), v6
		}
		return v4, append(v6, a)
	})
}

// RemoveIP unassigns a secondary address (IPv4 or IPv6) of the ENI in IMDS,
// as `aws ec2 unassign-private-ip-addresses` does: the OS is not told.
func (w *World) RemoveIP(e *ENI, a netip.Addr) error {
	drop := func(s []netip.Addr) []netip.Addr {
		return slices.DeleteFunc(s, func(x netip.Addr) bool { return x == a })
	}
	return w.changeIPs(e, "unassigning", a, func(v4, v6 []netip.Addr) ([]netip.Addr, []netip.Addr) { return drop(v4), drop(v6) })
}

// changeIPs changes the ENI's addresses in the world's record and in IMDS.
func (w *World) changeIPs(e *ENI, what string, a netip.Addr, change func(v4, v6 []netip.Addr) ([]netip.Addr, []netip.Addr)) error {
	e.mu.Lock()
	e.desc.LocalIPv4s, e.desc.IPv6s = change(e.desc.LocalIPv4s, e.desc.IPv6s)
	e.mu.Unlock()
	if err := w.IMDS.UpdateENI(e.MAC, func(x *imds.ENI) { x.LocalIPv4s, x.IPv6s = change(x.LocalIPv4s, x.IPv6s) }); err != nil {
		return fmt.Errorf("%s %s of %s in IMDS: %w", what, a, e.ID, err)
	}
	return nil
}

// HotAttach attaches the detached ENI the way EC2 does: IMDS lists it
// (ListInIMDS), then its link arrives (Plug). It returns when the link
// started to move into the instance.
func (w *World) HotAttach(e *ENI) (time.Time, error) {
	if err := w.ListInIMDS(e); err != nil {
		return time.Time{}, err
	}
	return w.Plug(e)
}

// ListInIMDS makes IMDS list the detached ENI, whose link has not arrived yet.
func (w *World) ListInIMDS(e *ENI) error {
	if e.Attached() {
		return fmt.Errorf("%s is already attached", e.Link)
	}
	if err := w.IMDS.AttachENI(e.imdsENI()); err != nil {
		return fmt.Errorf("attaching %s in IMDS: %w", e.ID, err)
	}
	return nil
}

// Plug makes the detached ENI's link arrive as a hot-plugged NIC does: its
// veth pair is made in the VPC's router, the ENI end moves into the
// instance, comes up (as udev and the network manager bring it up) and gets
// its address from "DHCP" (not with MinimalBoot). It returns when the move
// started: moving a veth costs the kernel milliseconds a real attach does
// not (unregister, synchronize_net, register), so the link's RTM_NEWLINK in
// the instance is the moment of its arrival.
func (w *World) Plug(e *ENI) (time.Time, error) {
	r := e.VPC.Router
	if err := w.addLink(e, r); err != nil {
		return time.Time{}, err
	}
	l, err := r.NL.LinkByName(e.Link)
	if err != nil {
		return time.Time{}, fmt.Errorf("finding %s in %s: %w", e.Link, r.Name, err)
	}
	moved := time.Now()
	if err := r.NL.LinkSetNsFd(l, int(w.Instance.Handle)); err != nil {
		return moved, fmt.Errorf("moving %s into the instance: %w", e.Link, err)
	}
	if l, err = w.Instance.NL.LinkByName(e.Link); err == nil {
		err = w.Instance.NL.LinkSetUp(l)
	}
	if err != nil {
		return moved, fmt.Errorf("setting %s up in the instance: %w", e.Link, err)
	}
	e.mu.Lock()
	e.attached = true
	e.mu.Unlock()
	return moved, w.bootENI(e)
}

// Detach detaches the ENI the way EC2 does: IMDS stops listing it and its
// link disappears from the instance (the veth pair is deleted).
func (w *World) Detach(e *ENI) error {
	if !e.Attached() {
		return fmt.Errorf("%s is not attached", e.Link)
	}
	if err := w.IMDS.DetachENI(e.MAC); err != nil {
		return fmt.Errorf("detaching %s in IMDS: %w", e.ID, err)
	}
	l, err := w.Instance.NL.LinkByName(e.Link)
	if err == nil {
		err = w.Instance.NL.LinkDel(l)
	}
	if err != nil {
		return fmt.Errorf("deleting %s from the instance: %w", e.Link, err)
	}
	e.mu.Lock()
	e.attached = false
	e.mu.Unlock()
	return nil
}

// Reissue gives the detached ENI a new MAC and interface ID: attached
// again, it is a new ENI in the old one's place (same device number,
// subnet and addresses), which dualhomed must read from IMDS afresh.
func (w *World) Reissue(e *ENI, mac, id string) error {
	if e.Attached() {
		return fmt.Errorf("%s is attached", e.Link)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.MAC, e.ID = mac, id
	e.desc.MAC, e.desc.InterfaceID = mac, id
	return nil
}
