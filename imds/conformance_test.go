package imds_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
)

// Conformance against AWS's own IMDS mock, amazon-ec2-metadata-mock (AEMM),
// pinned by version. The test builds it with the go command (module proxy or
// module cache), outside our module, and runs it with -I (IMDSv2 only).

const (
	aemmModule  = "github.com/aws/amazon-ec2-metadata-mock"
	aemmVersion = "v1.13.0"
	aemmMain    = aemmModule + "/cmd/ec2-metadata-mock"
)

var aemmBuild struct {
	once sync.Once
	bin  string
	err  error
}

// buildAEMM installs the pinned mock once per machine into
// $TMPDIR/dualhomed-aemm-<version>/ (built in a scratch GOBIN, then renamed
// into place atomically, so concurrent test processes never see half a
// binary); go's module and build caches make a rebuild cheap anyway.
func buildAEMM(t *testing.T) string {
	t.Helper()
	aemmBuild.once.Do(func() {
		cache := filepath.Join(os.TempDir(), "dualhomed-aemm-"+aemmVersion)
		bin := filepath.Join(cache, "ec2-metadata-mock")
		if _, err := os.Stat(bin); err == nil {
			aemmBuild.bin = bin
			return
		}
		goBin, err := exec.LookPath("go")
		if err != nil {
			aemmBuild.err = fmt.Errorf("no go command in PATH: %w", err)
			return
		}
		if err := os.MkdirAll(cache, 0o755); err != nil {
			aemmBuild.err = err
			return
		}
		scratch, err := os.MkdirTemp(cache, "build-")
		if err != nil {
			aemmBuild.err = err
			return
		}
		defer os.RemoveAll(scratch)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, goBin, "install", aemmMain+"@"+aemmVersion)
		cmd.Dir = scratch // outside our module: the version pin alone decides
		goflags := strings.TrimSpace(os.Getenv("GOFLAGS") + " -mod=mod")
		cmd.Env = append(os.Environ(), "GOBIN="+scratch, "GOFLAGS="+goflags, "GOWORK=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			aemmBuild.err = fmt.Errorf("go install %s@%s: %v\n%s", aemmMain, aemmVersion, err, out)
			return
		}
		if err := os.Rename(filepath.Join(scratch, "ec2-metadata-mock"), bin); err != nil {
			aemmBuild.err = err
			return
		}
		aemmBuild.bin = bin
	})
	if aemmBuild.err != nil {
		t.Skipf("cannot build amazon-ec2-metadata-mock (needs the Go module proxy or a warm module cache): %v", aemmBuild.err)
	}
	return aemmBuild.bin
}

// startAEMM runs the mock on a free 127.0.0.1 port and waits until it
// issues tokens. It returns the base URL.
func startAEMM(t *testing.T) string {
	t.Helper()
	bin := buildAEMM(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()

	home := t.TempDir() // the mock reads $HOME/aemm-config.json: keep it empty
	var logs bytes.Buffer
	cmd := exec.Command(bin, "-I", "-n", "127.0.0.1", "-p", port)
	cmd.Dir, cmd.Env = home, append(os.Environ(), "HOME="+home)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the mock: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	base := "http://127.0.0.1:" + port
	for deadline := time.Now().Add(15 * time.Second); ; {
		if st, _, _ := rawRequest(t, http.MethodPut, base+"/latest/api/token", ttlHeader("60")); st == http.StatusOK {
			return base
		}
		if time.Now().After(deadline) {
			t.Fatalf("amazon-ec2-metadata-mock did not answer on %s within 15s; its output:\n%s", base, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func ttlHeader(v string) http.Header {
	return http.Header{"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": {v}}
}

func rawRequest(t *testing.T, method, url string, h http.Header) (status int, body string, err error) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header = h
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	return resp.StatusCode, string(b), err
}

// The client reads AEMM's default instance correctly, and reads only keys
// that AEMM lists: AEMM answers even some unlisted paths with junk (for
// macs/<mac>/network-card it answers 200 "network/"), which would parse as
// an error if we fetched keys blindly.
func TestConformanceAEMMSnapshot(t *testing.T) {
	t.Parallel()
	base := startAEMM(t)
	c, err := imds.New(imds.Options{Endpoint: base, MaxRequestsPerSecond: -1})
	if err != nil {
		t.Fatal(err)
	}
	snap, err := c.Snapshot(context.Background())
	if err != nil {
		t.Fatalf("Snapshot against amazon-ec2-metadata-mock %s: %v", aemmVersion, err)
	}
	// Values of AEMM's pkg/config/defaults/aemm-metadata-default-values.json.
	want := imds.Snapshot{
		PrimaryMAC: "0e:49:61:0f:c3:11",
		ENIs: []imds.ENI{{
			MAC: "0e:49:61:0f:c3:11", Ready: true, DeviceNumber: 0,
			InterfaceID: "eni-0f95d3625f5c521cc", SubnetID: "subnet-0ac62554", VPCID: "vpc-d295a6a7",
			OwnerID:         "515336597381",
			SubnetIPv4CIDR:  netip.MustParsePrefix("192.0.2.0/24"),
			SubnetIPv6CIDRs: []netip.Prefix{netip.MustParsePrefix("2001:db8::/32")},
			VPCIPv4CIDRs:    []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")},
			VPCIPv6CIDRs:    []netip.Prefix{netip.MustParsePrefix("2001:db8::/32")},
			LocalIPv4s:      []netip.Addr{netip.MustParseAddr("172.16.34.43")},
			IPv6s:           []netip.Addr{netip.MustParseAddr("2001:db8:8:4::2")},
		}},
		// token, mac, macs/, macs/<mac>/, and the 11 listed keys we use.
		Requests: 1 + 1 + 1 + 1 + 11,
	}
	if !reflect.DeepEqual(snap, want) {
		t.Errorf("snapshot of AEMM:\n got %+v\nwant %+v", snap, want)
	}
}

// TestConformanceProtocol sends the same raw requests to AEMM and to our
// emulator. Where they disagree, the comment says which one real IMDS
// agrees with; the emulator must follow real IMDS, and the client must
// cope with both.
func TestConformanceProtocol(t *testing.T) {
	t.Parallel()
	aemm := startAEMM(t)
	emu := emulator.New(emulator.ExampleInstance(1, 1, 1, 0, 1))
	emuURL, err := emu.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emu.Close() })
	token := func(base string) http.Header {
		st, tok, err := rawRequest(t, http.MethodPut, base+"/latest/api/token", ttlHeader("60"))
		if err != nil || st != http.StatusOK {
			t.Fatalf("token from %s: %d %v", base, st, err)
		}
		return http.Header{"X-Aws-Ec2-Metadata-Token": {tok}}
	}
	aemmTok, emuTok := token(aemm), token(emuURL)
	emuMAC := emulator.ExampleMAC(0, 0)

	for _, tc := range []struct {
		name, method string
		path         func(mac string) string
		header       func(tok http.Header) http.Header
		aemm, emu    int // statuses
		// real IMDS: which of the two it matches, and why we believe so.
	}{
		// TTL bounds: AWS documents a token duration of "a minimum of one
		// second and a maximum of six hours" (EC2 User Guide, "How Instance
		// Metadata Service Version 2 works"); both answer 400 outside 1..21600
		// and without the header. They agree.
		{"token TTL 1", http.MethodPut, tokenPath, fixed(ttlHeader("1")), 200, 200},
		{"token TTL 21600", http.MethodPut, tokenPath, fixed(ttlHeader("21600")), 200, 200},
		{"token TTL 0", http.MethodPut, tokenPath, fixed(ttlHeader("0")), 400, 400},
		{"token TTL 21601", http.MethodPut, tokenPath, fixed(ttlHeader("21601")), 400, 400},
		{"token without TTL", http.MethodPut, tokenPath, fixed(http.Header{}), 400, 400},
		// GET on the token path: AEMM answers 200 with a token; real IMDS
		// answers 405 Method Not Allowed, which is why the AWS SDKs treat
		// 403/404/405 from the token PUT path as "this IMDS has no IMDSv2"
		// (aws-sdk-go-v2 feature/ec2/imds token_provider.go). The emulator
		// follows real IMDS. Our client only ever PUTs there.
		{"GET on the token path", http.MethodGet, tokenPath, fixed(ttlHeader("60")), 200, 405},
		// Missing or bogus token: 401 from both, as real IMDS with IMDSv2
		// required.
		{"no token", http.MethodGet, keyPath("mac"), fixed(http.Header{}), 401, 401},
		{"bogus token", http.MethodGet, keyPath("mac"), fixed(http.Header{"X-Aws-Ec2-Metadata-Token": {"bogus"}}), 401, 401},
		// Absent optional key: 404 from both (real IMDS: 404, and absent
		// from the listing).
		{"absent ipv4-prefix", http.MethodGet, macKey("ipv4-prefix"), withToken, 404, 404},
		// Key name of the network card index: AEMM serves
		// network-card-index; AWS documents network/interfaces/macs/<mac>/
		// network-card (present on multi-card instance types only), which is
		// what the emulator serves and the client reads. AEMM answers 200
		// "network/" for network-card, a path it does not list: the client
		// fetches only listed keys, so it never sees that.
		{"network-card-index", http.MethodGet, macKey("network-card-index"), withToken, 200, 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if st, body, err := rawRequest(t, tc.method, aemm+tc.path("0e:49:61:0f:c3:11"), tc.header(aemmTok)); err != nil || st != tc.aemm {
				t.Errorf("AEMM answered %d %v (%.60q), want %d", st, err, body, tc.aemm)
			}
			if st, body, err := rawRequest(t, tc.method, emuURL+tc.path(emuMAC), tc.header(emuTok)); err != nil || st != tc.emu {
				t.Errorf("emulator answered %d %v (%.60q), want %d", st, err, body, tc.emu)
			}
		})
	}

	// Trailing newlines: real IMDS ends no body with "\n" (AWS's examples
	// print values straight into the shell prompt, and scripts add
	// `curl -w "\n"` to compensate; ec2-facts.md says the same for
	// listings). AEMM and the emulator agree on values and on the MAC
	// listings; AEMM alone ends the top-level meta-data/ listing with "\n".
	// The parsers accept one trailing "\n" anyway.
	t.Run("trailing newlines", func(t *testing.T) {
		for _, p := range []func(string) string{keyPath("mac"), keyPath("network/interfaces/macs/"), macKey(""), macKey("local-ipv4s"), macKey("device-number")} {
			_, a, _ := rawRequest(t, http.MethodGet, aemm+p("0e:49:61:0f:c3:11"), withToken(aemmTok))
			_, e, _ := rawRequest(t, http.MethodGet, emuURL+p(emuMAC), withToken(emuTok))
			if a == "" || e == "" || strings.HasSuffix(a, "\n") || strings.HasSuffix(e, "\n") {
				t.Errorf("%s: AEMM %q, emulator %q; want both non-empty without a trailing newline", p(""), a, e)
			}
		}
		_, a, _ := rawRequest(t, http.MethodGet, aemm+"/latest/meta-data/", withToken(aemmTok))
		_, e, _ := rawRequest(t, http.MethodGet, emuURL+"/latest/meta-data/", withToken(emuTok))
		if !strings.HasSuffix(a, "\n") || strings.HasSuffix(e, "\n") {
			t.Errorf("meta-data/ listing: AEMM ends %q, emulator ends %q; want AEMM with and the emulator (like IMDS) without a trailing newline", a[max(0, len(a)-10):], e[max(0, len(e)-10):])
		}
	})
}

func tokenPath(string) string { return "/latest/api/token" }

func keyPath(key string) func(string) string {
	return func(string) string { return "/latest/meta-data/" + key }
}

func macKey(key string) func(string) string {
	return func(mac string) string { return "/latest/meta-data/network/interfaces/macs/" + mac + "/" + key }
}

func fixed(h http.Header) func(http.Header) http.Header {
	return func(http.Header) http.Header { return h }
}

func withToken(tok http.Header) http.Header { return tok }
