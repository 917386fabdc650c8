package netcfg

import (
	"errors"
	"fmt"
	"maps"
	"strconv"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/imds"
)

// altNamesOf returns the names a person can use for an ENI's link: its
// interface id, and amazon-ec2-net-utils' device-number-N, with the card
// appended past card 0 (device-number-N.C, upstream's spelling on
// multi-card instance types), so that each card's device 0 has its own.
func altNamesOf(e imds.ENI) []string {
	dev := "device-number-" + strconv.Itoa(e.DeviceNumber)
	if e.NetworkCard != 0 {
		dev += "." + strconv.Itoa(e.NetworkCard)
	}
	if e.InterfaceID == "" {
		return []string{dev}
	}
	return []string{e.InterfaceID, dev}
}

// altNameRecords are the altnames dualhomed added, by link index. The
// kernel has no owner mark for altnames: this file is the only record, and a
// name it does not list is never removed. It lives under the state
// directory (/run/dualhomed: gone at reboot, like the names).
var altNameRecords = recordFile[AltName]{name: "altnames.json", what: "altnames", compare: compareAltNames}

// ownedAltNames returns the recorded altnames that their link holds now;
// present maps every altname in the namespace to its link.
func (k *Kernel) ownedAltNames(present map[string]int) ([]AltName, error) {
	if len(present) == 0 {
		return nil, nil // nothing could be ours: no file to read
	}
	set, err := altNameRecords.read(k.stateDir)
	if err != nil {
		return nil, err
	}
	var out []AltName
	for a := range set {
		if present[a.Name] == a.LinkIndex { // link indexes start at 1
			out = append(out, a)
		}
	}
	return out, nil
}

// pruneAltNameRecords forgets the recorded altnames that their link no
// longer holds (gone with a detached link, or deleted by somebody else):
// should another tool add the same name later, it is not ours.
func (k *Kernel) pruneAltNameRecords() error {
	set, err := altNameRecords.read(k.stateDir)
	if err != nil || len(set) == 0 {
		return err
	}
	_, _, present, err := k.dump.links()
	if err != nil {
		return err
	}
	n := len(set)
	maps.DeleteFunc(set, func(a AltName, _ bool) bool { return present[a.Name] != a.LinkIndex })
	if len(set) == n {
		return nil
	}
	return altNameRecords.write(k.stateDir, set)
}

// applyAltName is `ip link property add|del dev <link> altname <name>`, and
// keeps the record. The record is written before the add, as rp_filter's
// original is, so that a crash never leaves a name of ours that cleanup
// does not know (a record whose name never made it onto the link owns
// nothing). A name the kernel already holds (EEXIST: another tool put it
// on this link, or another link holds it) is left alone and its record
// dropped.
func (k *Kernel) applyAltName(op Op) error {
	a := *op.AltName
	link := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: a.LinkIndex}}
	set, err := altNameRecords.read(k.stateDir)
	if err != nil {
		return err
	}
	if op.Delete {
		if err := ignoreOnDelete(k.h.LinkDelAltName(link, a.Name)); err != nil {
			return fmt.Errorf("deleting altname %s of link #%d: %w", a.Name, a.LinkIndex, err)
		}
		delete(set, a)
		return altNameRecords.write(k.stateDir, set)
	}
	set[a] = true
	if err := altNameRecords.write(k.stateDir, set); err != nil {
		return err
	}
	if err = k.h.LinkAddAltName(link, a.Name); err == nil {
		return nil
	}
	delete(set, a)
	if werr := altNameRecords.write(k.stateDir, set); werr != nil || errors.Is(err, unix.EEXIST) {
		return werr
	}
	return fmt.Errorf("adding altname %s to link #%d: %w", a.Name, a.LinkIndex, err)
}
