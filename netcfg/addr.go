package netcfg

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// ifaProto is the IFA_PROTO address attribute (linux/if_addr.h, kernel 5.18+):
// the address's origin, like a route's protocol. golang.org/x/sys/unix and
// vishvananda/netlink v1.3.1 do not know it yet, so addresses are added and
// dumped with raw rtnetlink messages on the dump socket.
const ifaProto = 11

// kernelAddr is one interface address as the kernel reports it.
type kernelAddr struct {
	LinkIndex int
	Prefix    netip.Prefix // local address with its prefix length
	Flags     uint32       // IFA_F_* (IFA_FLAGS when present, else ifa_flags)
	Proto     uint8        // IFA_PROTO; 0 when absent
}

// addrRequest is the body of a request about a: its ifaddrmsg and the
// attributes naming it, plus for an add its broadcast, flags and protocol
// (proto 0 sends no IFA_PROTO).
func addrRequest(a Addr, proto uint8, add bool) []byte {
	ip := a.Prefix.Addr()
	h := nl.IfAddrmsg{IfAddrmsg: unix.IfAddrmsg{Family: unix.AF_INET6, Prefixlen: uint8(a.Prefix.Bits()), Index: uint32(a.LinkIndex)}}
	if ip.Is4() {
		h.Family = unix.AF_INET
	}
	ae := netlink.NewAttributeEncoder()
	ae.Bytes(unix.IFA_LOCAL, ip.AsSlice())
	ae.Bytes(unix.IFA_ADDRESS, ip.AsSlice())
	if add {
		flags := addrFlags(a)
		h.Flags = uint8(flags) // the low 8 bits; IFA_FLAGS carries them all
		if ip.Is4() && a.Prefix.Bits() < 31 {
			// `ip addr add 10.1.0.11/24 brd +`: what DHCP clients set too.
			ae.Bytes(unix.IFA_BROADCAST, broadcast(a.Prefix).AsSlice())
		}
		ae.Uint32(unix.IFA_FLAGS, flags)
		if proto != 0 {
			ae.Uint8(ifaProto, proto)
		}
	}
	attrs, _ := ae.Encode() // cannot fail: every attribute is short
	return append(h.Serialize(), attrs...)
}

func broadcast(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	return netip.AddrFrom4([4]byte(binary.BigEndian.AppendUint32(nil, binary.BigEndian.Uint32(b[:])|host)))
}

// addrFlags are the IFA_F_* flags dualhomed adds an address with.
// IFA_F_NODAD on IPv6: EC2 assigns each address to exactly one ENI, so
// duplicate address detection can only delay the address (a tentative address
// cannot be bound or used as a route source for about a second) and never
// finds a duplicate.
func addrFlags(a Addr) uint32 {
	var f uint32
	if a.NoPrefixRoute {
		f |= unix.IFA_F_NOPREFIXROUTE
	}
	if a.Prefix.Addr().Is6() {
		f |= unix.IFA_F_NODAD
	}
	return f
}

// addAddr is `ip addr add <prefix> dev <link> [noprefixroute] [nodad] proto
// <proto>`, failing with EEXIST if the address is there; with replace it is
// `ip addr replace`: the address stays, its flags change.
func (d *dumpSocket) addAddr(a Addr, proto uint8, replace bool) error {
	flags := uint16(unix.NLM_F_CREATE | unix.NLM_F_EXCL)
	if replace {
		flags = unix.NLM_F_CREATE | unix.NLM_F_REPLACE
	}
	return d.request(nlRequest{unix.RTM_NEWADDR, flags, addrRequest(a, proto, true)}, nil)
}

// delAddr is `ip addr del <prefix> dev <link>`.
func (d *dumpSocket) delAddr(a Addr) error {
	return d.request(nlRequest{unix.RTM_DELADDR, 0, addrRequest(a, 0, false)}, nil)
}

// maxDumpAttempts bounds the retries of a dump the kernel reports as
// interrupted (NLM_F_DUMP_INTR: the object list changed while it was read).
const maxDumpAttempts = 5

func parseAddrMessage(m []byte) (kernelAddr, bool, error) {
	if len(m) < unix.SizeofIfAddrmsg {
		return kernelAddr{}, false, fmt.Errorf("parsing address message: short message (%d bytes)", len(m))
	}
	h := nl.DeserializeIfAddrmsg(m)
	a := kernelAddr{LinkIndex: int(h.Index), Flags: uint32(h.Flags)}
	var local, address []byte
	// Parsed in place (no attribute slice per message): a full-scale
	// instance has 1,500 addresses and Observe reads them all.
	ok := forEachAttr(m[unix.SizeofIfAddrmsg:], func(t uint16, v []byte) {
		switch t {
		case unix.IFA_LOCAL:
			local = v
		case unix.IFA_ADDRESS:
			address = v
		case unix.IFA_FLAGS:
			if x, ok := u32(v); ok {
				a.Flags = x
			}
		case ifaProto:
			if len(v) >= 1 {
				a.Proto = v[0]
			}
		}
	})
	if !ok {
		return kernelAddr{}, false, errors.New("parsing address message: malformed attributes")
	}
	// IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
	// point-to-point links (and the only one IPv6 sends otherwise).
	raw := local
	if raw == nil {
		raw = address
	}
	ip, ok := netip.AddrFromSlice(raw)
	if !ok {
		return kernelAddr{}, false, nil
	}
	a.Prefix = netip.PrefixFrom(ip.Unmap(), int(h.Prefixlen))
	return a, true, nil
}
