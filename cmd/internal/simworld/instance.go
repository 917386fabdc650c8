package simworld

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
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

// StartIMDS runs the IMDS emulator (Options.EmulatorBin) inside the instance
// on IMDSListen, loads the world's instance into it, and connects w.IMDS to
// its control socket.
func (w *World) StartIMDS(ctx context.Context) error {
	sock := filepath.Join(w.Dir, "imds-control.sock")
	instFile := filepath.Join(w.Dir, "instance.json")
	data, err := json.MarshalIndent(w.emulatedInstance(), "", "  ")
	if err != nil {
		return fmt.Errorf("encoding the emulated instance: %w", err)
	}
	if err := os.WriteFile(instFile, data, 0o644); err != nil {
		return fmt.Errorf("writing the emulated instance: %w", err)
	}
	p, err := w.start(w.Instance, "imds-emulator", w.opts.EmulatorBin,
		"--listen", IMDSListen, "--control", "unix:"+sock, "--instance", instFile)
	if err != nil {
		return err
	}
	ctl := emulator.DialControl("unix:" + sock)
	w.onClose(ctl.Close)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	err = waitFor(ctx, func() error {
		if done, err := p.Exited(); done {
			return fmt.Errorf("%w: %v: %s", ErrExited, err, p.Log())
		}
		return ctl.Ping()
	})
	if err != nil {
		return fmt.Errorf("waiting for the IMDS emulator: %w", err)
	}
	w.IMDS = ctl
	return nil
}

// AddIPv4 assigns a secondary private IPv4 to the ENI in IMDS, as
// `aws ec2 assign-private-ip-addresses` does: the OS is not told.
func (w *World) AddIPv4(e *ENI, a netip.Addr) error {
	e.mu.Lock()
	e.desc.LocalIPv4s = append(e.desc.LocalIPv4s, a)
	e.mu.Unlock()
	if err := w.IMDS.UpdateENI(e.MAC, func(x *imds.ENI) { x.LocalIPv4s = append(x.LocalIPv4s, a) }); err != nil {
		return fmt.Errorf("assigning %s to %s in IMDS: %w", a, e.ID, err)
	}
	return nil
}

// AddIPv6 assigns an IPv6 address to the ENI in IMDS; the OS is not told.
func (w *World) AddIPv6(e *ENI, a netip.Addr) error {
	e.mu.Lock()
	e.desc.IPv6s = append(e.desc.IPv6s, a)
	e.mu.Unlock()
	if err := w.IMDS.UpdateENI(e.MAC, func(x *imds.ENI) { x.IPv6s = append(x.IPv6s, a) }); err != nil {
		return fmt.Errorf("assigning %s to %s in IMDS: %w", a, e.ID, err)
	}
	return nil
}

// RemoveIP unassigns a secondary address (IPv4 or IPv6) of the ENI in IMDS,
// as `aws ec2 unassign-private-ip-addresses` does: the OS is not told.
func (w *World) RemoveIP(e *ENI, a netip.Addr) error {
	drop := func(s []netip.Addr) []netip.Addr {
		return slices.DeleteFunc(s, func(x netip.Addr) bool { return x == a })
	}
	e.mu.Lock()
	e.desc.LocalIPv4s, e.desc.IPv6s = drop(e.desc.LocalIPv4s), drop(e.desc.IPv6s)
	e.mu.Unlock()
	if err := w.IMDS.UpdateENI(e.MAC, func(x *imds.ENI) {
		x.LocalIPv4s, x.IPv6s = drop(x.LocalIPv4s), drop(x.IPv6s)
	}); err != nil {
		return fmt.Errorf("unassigning %s from %s in IMDS: %w", a, e.ID, err)
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

var errNotConfigured = errors.New("not configured yet")
