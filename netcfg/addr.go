package netcfg

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// ifaProto is the IFA_PROTO address attribute (linux/if_addr.h, kernel 5.18+):
// the address's origin, like a route's protocol. golang.org/x/sys/unix and
// vishvananda/netlink v1.3.1 do not know it yet, so addresses are added and
// dumped with raw rtnetlink messages.
const ifaProto = 11

// kernelAddr is one interface address as the kernel reports it.
type kernelAddr struct {
	LinkIndex int
	Prefix    netip.Prefix // local address with its prefix length
	Flags     uint32       // IFA_F_* (IFA_FLAGS when present, else ifa_flags)
	Proto     uint8        // IFA_PROTO; 0 when absent
}

// addrSocket talks rtnetlink for addresses in one namespace. It owns a netlink
// socket opened inside that namespace, so every request acts there whatever
// thread sends it.
type addrSocket struct {
	sh *nl.SocketHandle
}

func newAddrSocket(sock *nl.NetlinkSocket) *addrSocket {
	return &addrSocket{sh: &nl.SocketHandle{Socket: sock}}
}

func (s *addrSocket) close() { s.sh.Close() }

func (s *addrSocket) request(msgType, flags int) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(msgType, flags)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: s.sh}
	return req
}

// addrMessage builds the ifaddrmsg and attributes identifying a, plus (for
// adds) flags and protocol.
func addrMessage(req *nl.NetlinkRequest, a Addr, flags uint32, proto uint8, add bool) {
	addr := a.Prefix.Addr()
	family := unix.AF_INET6
	if addr.Is4() {
		family = unix.AF_INET
	}
	msg := nl.NewIfAddrmsg(family)
	msg.Prefixlen = uint8(a.Prefix.Bits())
	msg.Index = uint32(a.LinkIndex)
	msg.Flags = uint8(flags & 0xff)
	req.AddData(msg)
	raw := addr.AsSlice()
	req.AddData(nl.NewRtAttr(unix.IFA_LOCAL, raw))
	req.AddData(nl.NewRtAttr(unix.IFA_ADDRESS, raw))
	if !add {
		return
	}
	if addr.Is4() && a.Prefix.Bits() < 31 {
		// `ip addr add 10.1.0.11/24 brd +`: what DHCP clients set too.
		bcast := broadcast(a.Prefix)
		req.AddData(nl.NewRtAttr(unix.IFA_BROADCAST, bcast.AsSlice()))
	}
	req.AddData(nl.NewRtAttr(unix.IFA_FLAGS, nl.Uint32Attr(flags)))
	if proto != 0 {
		req.AddData(nl.NewRtAttr(ifaProto, nl.Uint8Attr(proto)))
	}
}

func broadcast(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
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

// add is `ip addr add <prefix> dev <link> [noprefixroute] [nodad] proto <proto>`
// (proto 0 sends no IFA_PROTO). It fails with EEXIST if the address is there.
func (s *addrSocket) add(a Addr, proto uint8) error {
	req := s.request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ACK)
	addrMessage(req, a, addrFlags(a), proto, true)
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// replace is `ip addr replace <prefix> dev <link> [noprefixroute] proto
// <proto>`: the address stays, its flags change.
func (s *addrSocket) replace(a Addr, proto uint8) error {
	req := s.request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE|unix.NLM_F_ACK)
	addrMessage(req, a, addrFlags(a), proto, true)
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// del is `ip addr del <prefix> dev <link>`.
func (s *addrSocket) del(a Addr) error {
	req := s.request(unix.RTM_DELADDR, unix.NLM_F_ACK)
	addrMessage(req, a, 0, 0, false)
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// maxDumpAttempts bounds the retries of a dump the kernel reports as
// interrupted (NLM_F_DUMP_INTR: the object list changed while it was read).
const maxDumpAttempts = 5

func parseAddrMessage(m []byte) (kernelAddr, bool, error) {
	if len(m) < unix.SizeofIfAddrmsg {
		return kernelAddr{}, false, fmt.Errorf("short message (%d bytes)", len(m))
	}
	// struct ifaddrmsg: family, prefixlen, flags, scope (u8 each), index (u32).
	prefixLen, flags := m[1], m[2]
	a := kernelAddr{LinkIndex: int(nl.NativeEndian().Uint32(m[4:8])), Flags: uint32(flags)}
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
			if len(v) >= 4 {
				a.Flags = nl.NativeEndian().Uint32(v[:4])
			}
		case ifaProto:
			if len(v) >= 1 {
				a.Proto = v[0]
			}
		}
	})
	if !ok {
		return kernelAddr{}, false, errors.New("malformed attributes")
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
	a.Prefix = netip.PrefixFrom(ip.Unmap(), int(prefixLen))
	return a, true, nil
}
