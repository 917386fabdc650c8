package simworld

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"
)

// The probes are written in Go rather than with ping(8) so that the tests
// need nothing beyond iproute2, and so that sockets are created inside the
// probing namespace (a socket stays in the namespace it was created in).

// pinger sends ICMP echo requests from a raw socket inside a namespace and
// records when the reply to each arrives.
type pinger struct {
	c      net.PacketConn
	dst    netip.Addr
	id     uint16
	mu     sync.Mutex
	got    map[int]time.Time // reply arrival by sequence number
	first  chan time.Time    // receives the first reply's arrival
	reader chan struct{}     // closed when the reader has stopped
}

// startPinger opens the socket in ns for dst's family and starts reading
// replies until close.
func startPinger(ns *NS, dst netip.Addr) (*pinger, error) {
	var c net.PacketConn
	err := ns.Do(func() (err error) {
		if dst.Is4() {
			c, err = net.ListenPacket("ip4:icmp", "0.0.0.0")
		} else {
			c, err = net.ListenPacket("ip6:ipv6-icmp", "::")
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("opening ICMP socket in %s: %w", ns.Name, err)
	}
	var id [2]byte
	_, _ = rand.Read(id[:])
	p := &pinger{c: c, dst: dst, id: binary.BigEndian.Uint16(id[:]), got: map[int]time.Time{},
		first: make(chan time.Time, 1), reader: make(chan struct{})}
	reply := byte(0) // ICMP echo reply
	if dst.Is6() {
		reply = 129
	}
	go func() {
		defer close(p.reader)
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			ip, ok := from.(*net.IPAddr)
			if !ok || n < 8 || buf[0] != reply || binary.BigEndian.Uint16(buf[4:]) != p.id {
				continue
			}
			if fa, _ := netip.AddrFromSlice(ip.IP); fa.Unmap() == dst {
				p.mu.Lock()
				if len(p.got) == 0 {
					p.first <- time.Now()
				}
				p.got[int(binary.BigEndian.Uint16(buf[6:]))] = time.Now()
				p.mu.Unlock()
			}
		}
	}()
	return p, nil
}

// send sends the echo request seq; a failed send (no route) is a lost
// request, as ping(8) counts it.
func (p *pinger) send(seq int) {
	_, _ = p.c.WriteTo(echoRequest(p.dst.Is6(), p.id, uint16(seq)), &net.IPAddr{IP: p.dst.AsSlice()})
}

func (p *pinger) replies() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.got)
}

// close stops reading and returns the replies.
func (p *pinger) close() map[int]time.Time {
	p.c.Close()
	<-p.reader
	return p.got
}

// echoRequest builds an ICMP(v6) echo request. The kernel fills the ICMPv6
// checksum of raw sockets itself; IPv4's is ours to compute.
func echoRequest(v6 bool, id, seq uint16) []byte {
	b := make([]byte, 8+16)
	b[0] = 8 // ICMP echo request
	if v6 {
		b[0] = 128
	}
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], "dualhomed-e2e...")
	if !v6 {
		binary.BigEndian.PutUint16(b[2:], checksum(b))
	}
	return b
}

// checksum is the Internet checksum of b, of even length.
func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// PingResult counts an echo run.
type PingResult struct {
	Sent, Received int
	// Lost lists the sequence numbers that got no reply.
	Lost []int
}

// Ping sends one echo request from ns to dst and waits up to timeout for the
// reply: `ip netns exec <ns> ping -c1 -W<timeout> <dst>`.
func Ping(ns *NS, dst netip.Addr, timeout time.Duration) error {
	r, err := PingRun(context.Background(), ns, dst, 1, 0, timeout)
	if err == nil && r.Received != 1 {
		err = fmt.Errorf("ping %s from %s: no reply within %s", dst, ns.Name, timeout)
	}
	return err
}

// PingRun sends count echo requests, one every interval, and waits up to
// linger after the last for the replies: `ping -c <count> -i <interval>`.
// It stops sending early if ctx ends.
func PingRun(ctx context.Context, ns *NS, dst netip.Addr, count int, interval, linger time.Duration) (PingResult, error) {
	p, err := startPinger(ns, dst)
	if err != nil {
		return PingResult{}, err
	}
	res := PingResult{}
	for ; res.Sent < count; res.Sent++ {
		if res.Sent > 0 && Sleep(ctx, interval) != nil {
			break
		}
		p.send(res.Sent)
	}
	for deadline := time.Now().Add(linger); p.replies() < res.Sent && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	got := p.close()
	for seq := range res.Sent {
		if _, ok := got[seq]; ok {
			res.Received++
		} else {
			res.Lost = append(res.Lost, seq)
		}
	}
	return res, nil
}

// FirstReply pings dst from ns every interval until the first echo reply,
// and returns when that reply arrived; ctx bounds the wait.
func FirstReply(ctx context.Context, ns *NS, dst netip.Addr, interval time.Duration) (time.Time, error) {
	p, err := startPinger(ns, dst)
	if err != nil {
		return time.Time{}, err
	}
	defer p.close()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for seq := 0; ; seq++ {
		p.send(seq)
		select {
		case t := <-p.first:
			return t, nil
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("no echo reply from %s to %s: %w", dst, ns.Name, ctx.Err())
		case <-tick.C:
		}
	}
}

// Sleep waits d, or less when ctx ends first (then it returns ctx's error).
func Sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// Dial opens a TCP connection from ns to dst, like a client program running
// in ns; the kernel picks the source address (the connection is unbound).
func Dial(ctx context.Context, ns *NS, dst netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	return DialFrom(ctx, ns, netip.AddrPort{}, dst, timeout)
}

// DialFrom is Dial bound to the source address and port src (unbound when
// src is invalid).
func DialFrom(ctx context.Context, ns *NS, src, dst netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var c net.Conn
	err := ns.Do(func() (err error) {
		var d net.Dialer
		if src.IsValid() {
			d.LocalAddr = net.TCPAddrFromAddrPort(src)
		}
		c, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("connecting from %s to %s: %w", ns.Name, dst, err)
	}
	return c, nil
}

// UDPArrives reports whether a datagram sent from ns from (from src, or
// unbound when src is invalid) to dst reaches a listener in ns to: delivery,
// not a reply, so that a check of what must not cross does not depend on
// how a reply would be routed.
func UDPArrives(from *NS, src netip.Addr, to *NS, dst netip.Addr) (bool, error) {
	const port = 9999
	var ln net.PacketConn
	if err := to.Do(func() (err error) { ln, err = net.ListenPacket("udp4", fmt.Sprintf(":%d", port)); return err }); err != nil {
		return false, fmt.Errorf("listening in %s: %w", to.Name, err)
	}
	defer ln.Close()
	payload := fmt.Sprintf("probe %v->%v %d", src, dst, time.Now().UnixNano())
	err := from.Do(func() error {
		var laddr *net.UDPAddr
		if src.IsValid() {
			laddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
		}
		c, err := net.DialUDP("udp4", laddr, net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, port)))
		if err != nil {
			return err
		}
		defer c.Close()
		for range 3 { // a first datagram can wait for ARP
			if _, err := c.Write([]byte(payload)); err != nil {
				return err
			}
			time.Sleep(20 * time.Millisecond)
		}
		return nil
	})
	if err != nil {
		return false, fmt.Errorf("sending from %s: %w", from.Name, err)
	}
	buf := make([]byte, 256)
	_ = ln.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	for {
		n, _, err := ln.ReadFrom(buf)
		if err != nil {
			return false, nil
		}
		if string(buf[:n]) == payload {
			return true, nil
		}
	}
}

// EchoOnce connects from ns to an echo server at dst, sends one line and
// checks that the same line comes back: a complete TCP round trip.
func EchoOnce(ns *NS, dst netip.AddrPort, timeout time.Duration) error {
	c, err := Dial(context.Background(), ns, dst, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	return echoLine(c, bufio.NewReader(c), fmt.Sprintf("hello from %s", ns.Name), timeout)
}

// echoLine sends msg and a newline on c and reads it back through r.
func echoLine(c net.Conn, r *bufio.Reader, msg string, timeout time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return fmt.Errorf("writing to %s: %w", c.RemoteAddr(), err)
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("reading echo from %s: %w", c.RemoteAddr(), err)
	}
	if line != msg+"\n" {
		return fmt.Errorf("echo from %s: got %q, want %q", c.RemoteAddr(), line, msg)
	}
	return nil
}

// Stream is a long-lived TCP connection that exchanges one line every
// interval with an echo server, counting round trips, until Stop.
type Stream struct {
	c      net.Conn
	stop   chan struct{}
	done   chan struct{}
	rounds int
	err    error
}

// StartStream connects from ns to the echo server at dst and starts the exchange.
func StartStream(ns *NS, dst netip.AddrPort, interval time.Duration) (*Stream, error) {
	c, err := Dial(context.Background(), ns, dst, 2*time.Second)
	if err != nil {
		return nil, err
	}
	s := &Stream{c: c, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		r := bufio.NewReader(c)
		for i := 0; ; i++ {
			select {
			case <-s.stop:
				return
			case <-time.After(interval):
			}
			// A generous deadline: TCP retransmits a lost segment after
			// about 200ms; a broken stream is a reset or a stall of seconds.
			if err := echoLine(c, r, "line "+strconv.Itoa(i), 5*time.Second); err != nil {
				s.err = fmt.Errorf("round %d: %w", i, err)
				return
			}
			s.rounds++
		}
	}()
	return s, nil
}

// Stop ends the exchange and closes the connection. It returns the number
// of complete round trips and the first error, if the stream broke.
func (s *Stream) Stop() (int, error) {
	close(s.stop)
	<-s.done
	s.c.Close()
	return s.rounds, s.err
}

// EchoServer is a TCP echo server listening on every address of a namespace
// (one dual-stack socket on [::]:port).
type EchoServer struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	open  map[net.Conn]bool
	peers []netip.AddrPort
}

// Peers lists the address and port of each connection accepted so far, as
// the server saw them.
func (s *EchoServer) Peers() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.peers)
}

// ListenEcho starts an echo server inside ns on port.
func ListenEcho(ns *NS, port int) (*EchoServer, error) {
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", net.JoinHostPort("::", strconv.Itoa(port)))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listening on port %d in %s: %w", port, ns.Name, err)
	}
	s := &EchoServer{ln: ln, open: map[net.Conn]bool{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.open[c] = true
			peer := netip.MustParseAddrPort(c.RemoteAddr().String())
			s.peers = append(s.peers, netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port()))
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				_, _ = io.Copy(c, c)
				c.Close()
				s.mu.Lock()
				delete(s.open, c)
				s.mu.Unlock()
			}()
		}
	}()
	return s, nil
}

// Close stops the server and closes its open connections.
func (s *EchoServer) Close() error {
	err := s.ln.Close()
	s.mu.Lock()
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
