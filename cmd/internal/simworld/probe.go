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
	"strconv"
	"sync"
	"time"
)

// The probes are written in Go rather than with ping(8) so that the tests
// need nothing beyond iproute2, and so that sockets are created inside the
// probing namespace (a socket stays in the namespace it was created in).

// icmpConn opens a raw ICMP socket inside ns for dst's family.
func icmpConn(ns *NS, dst netip.Addr) (net.PacketConn, error) {
	var c net.PacketConn
	err := ns.Do(func() error {
		var err error
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
	return c, nil
}

// echoRequest builds an ICMP(v6) echo request. The kernel fills the ICMPv6
// checksum of raw sockets itself; IPv4's is ours to compute.
func echoRequest(v6 bool, id, seq uint16) []byte {
	b := make([]byte, 8+16)
	if v6 {
		b[0] = 128
	} else {
		b[0] = 8
	}
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], "dualhomed-e2e...")
	if !v6 {
		binary.BigEndian.PutUint16(b[2:], checksum(b))
	}
	return b
}

func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

func randomID() uint16 {
	var b [2]byte
	_, _ = rand.Read(b[:])
	return binary.BigEndian.Uint16(b[:])
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
	if err != nil {
		return err
	}
	if r.Received != 1 {
		return fmt.Errorf("ping %s from %s: no reply within %s", dst, ns.Name, timeout)
	}
	return nil
}

// PingRun sends count echo requests, one every interval, and waits up to
// linger after the last for the replies: `ping -c <count> -i <interval>`.
// It stops sending early if ctx ends.
func PingRun(ctx context.Context, ns *NS, dst netip.Addr, count int, interval, linger time.Duration) (PingResult, error) {
	c, err := icmpConn(ns, dst)
	if err != nil {
		return PingResult{}, err
	}
	defer c.Close()
	id := randomID()
	v6 := dst.Is6()
	var (
		mu  sync.Mutex
		got = map[int]bool{}
	)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		readReplies(c, dst, id, func(seq int) bool {
			mu.Lock()
			got[seq] = true
			mu.Unlock()
			return true
		})
	}()
	res := PingResult{}
	to := &net.IPAddr{IP: dst.AsSlice()}
send:
	for seq := 0; seq < count; seq++ {
		if seq > 0 {
			select {
			case <-ctx.Done():
				break send
			case <-time.After(interval):
			}
		}
		// A failed send (no route) is a lost packet, as ping(8) counts it.
		_, _ = c.WriteTo(echoRequest(v6, id, uint16(seq)), to)
		res.Sent++
	}
	deadline := time.Now().Add(linger)
	for time.Now().Before(deadline) {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n >= res.Sent {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.Close()
	<-readerDone
	for seq := 0; seq < res.Sent; seq++ {
		if got[seq] {
			res.Received++
		} else {
			res.Lost = append(res.Lost, seq)
		}
	}
	return res, nil
}

// readReplies reads c until it fails, and calls got with the sequence number
// of every echo reply from dst to the request identifier id, until got
// returns false.
func readReplies(c net.PacketConn, dst netip.Addr, id uint16, got func(seq int) bool) {
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		ip, ok := from.(*net.IPAddr)
		if !ok || n < 8 || (dst.Is6() && buf[0] != 129) || (dst.Is4() && buf[0] != 0) {
			continue
		}
		fa, _ := netip.AddrFromSlice(ip.IP)
		if fa.Unmap() == dst && binary.BigEndian.Uint16(buf[4:]) == id && !got(int(binary.BigEndian.Uint16(buf[6:]))) {
			return
		}
	}
}

// FirstReply pings dst from ns every interval until the first echo reply,
// and returns when that reply arrived; ctx bounds the wait.
func FirstReply(ctx context.Context, ns *NS, dst netip.Addr, interval time.Duration) (time.Time, error) {
	c, err := icmpConn(ns, dst)
	if err != nil {
		return time.Time{}, err
	}
	defer c.Close()
	id := randomID()
	replied := make(chan time.Time, 1)
	go readReplies(c, dst, id, func(int) bool {
		replied <- time.Now()
		return false
	})
	tick := time.NewTicker(interval)
	defer tick.Stop()
	to := &net.IPAddr{IP: dst.AsSlice()}
	for seq := 0; ; seq++ {
		// A failed send (no route yet) only means "not yet".
		_, _ = c.WriteTo(echoRequest(dst.Is6(), id, uint16(seq)), to)
		select {
		case t := <-replied:
			return t, nil
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("no echo reply from %s to %s: %w", dst, ns.Name, ctx.Err())
		case <-tick.C:
		}
	}
}

// Dial opens a TCP connection from ns to dst, like a client program running
// in ns; the kernel picks the source address (the connection is unbound).
func Dial(ctx context.Context, ns *NS, dst netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		return nil, fmt.Errorf("connecting from %s to %s: %w", ns.Name, dst, err)
	}
	return c, nil
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
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	open map[net.Conn]bool
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
