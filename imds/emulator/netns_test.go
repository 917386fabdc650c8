package emulator_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/dualhomed/dualhomed/imds/emulator"
	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// TestServeInNamespace serves on the real IMDS address, 169.254.169.254:80,
// inside a throwaway namespace (never the host's), the way the end-to-end
// tests and the demo do: the listener is made inside, the server runs anywhere.
func TestServeInNamespace(t *testing.T) {
	ns := nstest.New(t)
	lo, err := ns.NL.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := netlink.ParseAddr("169.254.169.254/32")
	if err := ns.NL.AddrAdd(lo, addr); err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	if err := ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", "169.254.169.254:80")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := emulator.New(emulator.ExampleInstance(2, 1, 0, 0, 1))
	base, err := srv.Serve(ln)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if base != "http://169.254.169.254:80" {
		t.Errorf("base URL %q", base)
	}

	// Requests from inside the namespace, over a connection dialled there.
	do := func(method, path string, hdr map[string]string) (int, string) {
		t.Helper()
		var conn net.Conn
		if err := ns.Do(func() (err error) {
			conn, err = net.Dial("tcp", "169.254.169.254:80")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		var req strings.Builder
		fmt.Fprintf(&req, "%s %s HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n", method, path)
		for k, v := range hdr {
			fmt.Fprintf(&req, "%s: %s\r\n", k, v)
		}
		req.WriteString("\r\n")
		if _, err := io.WriteString(conn, req.String()); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	status, token := do(http.MethodPut, emulator.TokenPath, map[string]string{emulator.TokenTTLHeader: "60"})
	if status != 200 {
		t.Fatalf("PUT token in namespace: %d", status)
	}
	status, body := do(http.MethodGet, "/latest/meta-data/network/interfaces/macs/", map[string]string{emulator.TokenHeader: token})
	if status != 200 || body != "02:00:00:00:00:00/\n02:00:00:00:00:01/" {
		t.Errorf("macs/ in namespace: %d %q", status, body)
	}
}
