package netcfg

import (
	"cmp"
	"net/netip"
	"strings"

	"golang.org/x/sys/unix"
)

// addrRecords are the addresses dualhomed added, on kernels older than
// 5.18 that cannot mark an address with IFA_PROTO. The file lives under the
// state directory (/run/dualhomed: gone at reboot, like the addresses
// themselves).
var addrRecords = recordFile[addrRecord]{name: "addresses.json", what: "addresses",
	compare: func(a, b addrRecord) int {
		return cmp.Or(cmp.Compare(a.Link, b.Link), strings.Compare(a.Prefix, b.Prefix))
	}}

// addrRecord is one address we added: link index and address/prefix length.
type addrRecord struct {
	Link   int    `json:"link"`
	Prefix string `json:"prefix"`
}

func recordOf(link int, p netip.Prefix) addrRecord { return addrRecord{Link: link, Prefix: p.String()} }

// recordAddr notes that we added a (owned) or deleted it, on a kernel
// without IFA_PROTO.
func (k *Kernel) recordAddr(a Addr, owned bool) error {
	if k.addrProto {
		return nil
	}
	set, err := addrRecords.read(k.stateDir)
	if err != nil {
		return err
	}
	rec := recordOf(a.LinkIndex, a.Prefix)
	if set[rec] == owned {
		return nil
	}
	if owned {
		set[rec] = true
	} else {
		delete(set, rec)
	}
	return addrRecords.write(k.stateDir, set)
}

// pruneAddrRecords forgets recorded addresses that are no longer on their
// link (deleted by somebody else, or gone with their link): should another
// tool add the same address later, it is not ours.
func (k *Kernel) pruneAddrRecords() error {
	if k.addrProto {
		return nil
	}
	set, err := addrRecords.read(k.stateDir)
	if err != nil || len(set) == 0 {
		return err
	}
	present, err := k.dump.addrs(unix.AF_UNSPEC)
	if err != nil {
		return err
	}
	kept := map[addrRecord]bool{}
	for _, a := range present {
		if rec := recordOf(a.LinkIndex, a.Prefix); set[rec] {
			kept[rec] = true
		}
	}
	if len(kept) == len(set) {
		return nil
	}
	return addrRecords.write(k.stateDir, kept)
}
