package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/netcfg/nsthread"
)

// pinger sends ICMP echo requests from a client address inside a VPC
// namespace, to find the moment an ENI address starts answering.
type pinger struct {
	fd  int
	src netip.Addr
	id  uint16
}

// newPinger opens a raw ICMP socket inside ns, bound to src (which must be
// an address of that namespace).
func newPinger(ns netns.NsHandle, src netip.Addr) (*pinger, error) {
	var fd int
	err := nsthread.Do(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		if err != nil {
			return fmt.Errorf("opening ICMP socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: src.As4()}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("binding ICMP socket to %s: %w", src, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// A short receive timeout lets one goroutine alternate sending and
	// receiving at a fixed pace.
	tv := unix.NsecToTimeval(int64(200 * time.Microsecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("setting ICMP receive timeout: %w", err)
	}
	return &pinger{fd: fd, src: src, id: uint16(os.Getpid())}, nil
}

func (p *pinger) Close() { unix.Close(p.fd) }

// firstReply sends an echo request to dst every interval until one is
// answered, and returns the time the first reply arrived.
func (p *pinger) firstReply(ctx context.Context, dst netip.Addr, interval time.Duration) (time.Time, error) {
	to := &unix.SockaddrInet4{Addr: dst.As4()}
	buf := make([]byte, 1500)
	// Replies to an earlier call's last requests may still be queued: a new
	// identifier tells them apart, and they are drained first.
	p.id++
	for {
		if _, _, err := unix.Recvfrom(p.fd, buf, unix.MSG_DONTWAIT); err != nil {
			break
		}
	}
	var seq uint16
	next := time.Now()
	for {
		if err := ctx.Err(); err != nil {
			return time.Time{}, err
		}
		if now := time.Now(); !now.Before(next) {
			seq++
			// Errors (no route yet, link down) only mean "not yet".
			_ = unix.Sendto(p.fd, echoRequest(p.id, seq), 0, to)
			next = now.Add(interval)
		}
		n, from, err := unix.Recvfrom(p.fd, buf, 0)
		if err != nil {
			continue
		}
		at := time.Now()
		sa, ok := from.(*unix.SockaddrInet4)
		if !ok || netip.AddrFrom4(sa.Addr) != dst || n < 20 {
			continue
		}
		ihl := int(buf[0]&0x0f) * 4
		if n < ihl+8 {
			continue
		}
		icmp := buf[ihl:n]
		if icmp[0] == 0 && binary.BigEndian.Uint16(icmp[4:6]) == p.id { // echo reply to us
			return at, nil
		}
	}
}

func echoRequest(id, seq uint16) []byte {
	b := make([]byte, 16)
	b[0] = 8 // echo request
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	binary.BigEndian.PutUint16(b[2:], checksum(b))
	return b
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}
