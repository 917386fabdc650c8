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
	x := imds.ENI{
		MAC:            e.MAC,
		Ready:          true,
		DeviceNumber:   e.Device,
		InterfaceID:    e.ID,
		SubnetID:       e.SubnetID,
		VPCID:          e.VPC.ID,
		OwnerID:        OwnerID,
		SubnetIPv4CIDR: e.Subnet4,
		VPCIPv4CIDRs:   []netip.Prefix{e.VPC.CIDR4},
		LocalIPv4s:     slices.Clone(e.ipv4s),
		IPv6s:          slices.Clone(e.ipv6s),
	}
	if e.Subnet6.IsValid() {
		x.SubnetIPv6CIDRs = []netip.Prefix{e.Subnet6}
	}
	if e.VPC.CIDR6.IsValid() {
		x.VPCIPv6CIDRs = []netip.Prefix{e.VPC.CIDR6}
	}
	return x
}

// emulatedInstance is the emulator's model of the instance: the attached ENIs.
func (w *World) emulatedInstance() emulator.Instance {
	inst := emulator.Instance{
		InstanceID:   "i-0d0a1b0c0e0d0e000",
		InstanceType: "c6in.large",
		Region:       "us-east-1",
		PrimaryMAC:   w.ENI("eth0").MAC,
	}
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
	w.logf("IMDS emulator listening on %s inside %s", IMDSEndpoint, w.Instance.Name)
	return nil
}

// AddIPv4 assigns a secondary private IPv4 to the ENI in IMDS, as
// `aws ec2 assign-private-ip-addresses` does: the OS is not told.
func (w *World) AddIPv4(e *ENI, a netip.Addr) error {
	e.mu.Lock()
	e.ipv4s = append(e.ipv4s, a)
	e.mu.Unlock()
	if err := w.IMDS.UpdateENI(e.MAC, func(x *imds.ENI) { x.LocalIPv4s = append(x.LocalIPv4s, a) }); err != nil {
		return fmt.Errorf("assigning %s to %s in IMDS: %w", a, e.ID, err)
	}
	return nil
}

// AddIPv6 assigns an IPv6 address to the ENI in IMDS; the OS is not told.
func (w *World) AddIPv6(e *ENI, a netip.Addr) error {
	e.mu.Lock()
	e.ipv6s = append(e.ipv6s, a)
	e.mu.Unlock()
	if err := w.IMDS.UpdateENI(e.MAC, func(x *imds.ENI) { x.IPv6s = append(x.IPv6s, a) }); err != nil {
		return fmt.Errorf("assigning %s to %s in IMDS: %w", a, e.ID, err)
	}
	return nil
}

// RemoveIP unassigns a secondary address (IPv4 or IPv6) of the ENI in IMDS,
// as `aws ec2 unassign-private-ip-addresses` does: the OS is not told.
func (w *World) RemoveIP(e *ENI, a netip.Addr) error {
	e.mu.Lock()
	e.ipv4s = slices.DeleteFunc(e.ipv4s, func(x netip.Addr) bool { return x == a })
	e.ipv6s = slices.DeleteFunc(e.ipv6s, func(x netip.Addr) bool { return x == a })
	e.mu.Unlock()
	drop := func(s []netip.Addr) []netip.Addr {
		return slices.DeleteFunc(s, func(x netip.Addr) bool { return x == a })
	}
	if err := w.IMDS.UpdateENI(e.MAC, func(x *imds.ENI) {
		x.LocalIPv4s, x.IPv6s = drop(x.LocalIPv4s), drop(x.IPv6s)
	}); err != nil {
		return fmt.Errorf("unassigning %s from %s in IMDS: %w", a, e.ID, err)
	}
	return nil
}

// HotAttach attaches the parked ENI the way EC2 does: IMDS lists it, then its
// link appears in the instance (moved in from the router's namespace), comes
// up and gets its primary address from "DHCP". It returns the moment the link
// arrived in the instance.
func (w *World) HotAttach(e *ENI) (time.Time, error) {
	if e.Attached() {
		return time.Time{}, fmt.Errorf("%s is already attached", e.Link)
	}
	if err := w.IMDS.AttachENI(e.imdsENI()); err != nil {
		return time.Time{}, fmt.Errorf("attaching %s in IMDS: %w", e.ID, err)
	}
	r := e.VPC.Router
	l, err := r.NL.LinkByName(e.Link)
	if err != nil {
		return time.Time{}, fmt.Errorf("finding parked %s in %s: %w", e.Link, r.Name, err)
	}
	arrived := time.Now()
	if err := r.NL.LinkSetNsFd(l, int(w.Instance.Handle)); err != nil {
		return arrived, fmt.Errorf("moving %s into the instance: %w", e.Link, err)
	}
	l, err = w.Instance.NL.LinkByName(e.Link)
	if err != nil {
		return arrived, fmt.Errorf("finding %s in the instance: %w", e.Link, err)
	}
	if err := w.Instance.NL.LinkSetUp(l); err != nil {
		return arrived, fmt.Errorf("setting %s up: %w", e.Link, err)
	}
	e.mu.Lock()
	e.attached = true
	e.mu.Unlock()
	return arrived, w.bootENI(e)
}

// Detach detaches the ENI the way EC2 does: IMDS stops listing it and its
// link leaves the instance (parked again in the router's namespace).
func (w *World) Detach(e *ENI) error {
	if !e.Attached() {
		return fmt.Errorf("%s is not attached", e.Link)
	}
	if err := w.IMDS.DetachENI(e.MAC); err != nil {
		return fmt.Errorf("detaching %s in IMDS: %w", e.ID, err)
	}
	l, err := w.Instance.NL.LinkByName(e.Link)
	if err != nil {
		return fmt.Errorf("finding %s in the instance: %w", e.Link, err)
	}
	if err := w.Instance.NL.LinkSetNsFd(l, int(e.VPC.Router.Handle)); err != nil {
		return fmt.Errorf("moving %s out of the instance: %w", e.Link, err)
	}
	e.mu.Lock()
	e.attached = false
	e.mu.Unlock()
	return nil
}

var errNotConfigured = errors.New("not configured yet")
