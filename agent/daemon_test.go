package agent

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/imds/emulator"
	"github.com/dualhomed/dualhomed/netcfg"
	"github.com/dualhomed/dualhomed/netcfg/nstest"
)

// world is a throwaway instance namespace with its primary ENI (eth0), a
// router namespace holding the veth peers, and an IMDS emulator on loopback in
// the host namespace (the daemon's HTTP client runs there; netlink acts in
// the instance namespace).
type world struct {
	t      *testing.T
	ns     *nstest.NS
	router *nstest.NS
	emu    *emulator.Server
	url    string
	inst   emulator.Instance // as created: ENIs[0] primary, ENIs[1] and [2] secondary
}

func newWorld(t *testing.T, attached int) *world {
	t.Helper()
	nstest.RequireRoot(t)
	w := &world{t: t, ns: nstest.New(t), router: nstest.New(t)}
	// IPv4-only world: without IPv6, no link-local address or DAD events
	// arrive late and trigger reconciles the test did not ask for.
	err := w.ns.Do(func() error {
		for _, k := range []string{"all", "default"} {
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+k+"/disable_ipv6", []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("disabling IPv6 in the test namespace: %v", err)
	}
	w.inst = emulator.ExampleInstance(3, 2, 0, 0, 1)
	inst := w.inst.Clone()
	inst.ENIs = inst.ENIs[:attached]
	w.emu = emulator.New(inst)
	url, err := w.emu.Start("127.0.0.1:0")
	if err != nil {
		t.Fatalf("starting IMDS emulator: %v", err)
	}
	t.Cleanup(func() { w.emu.Close() })
	w.url = url
	w.link(0)
	return w
}

// link creates the veth of ENI i in the instance namespace: eth<i>.
func (w *world) link(i int) {
	w.t.Helper()
	name := "eth" + string(rune('0'+i))
	w.ns.Veth(w.t, name, w.inst.ENIs[i].MAC, w.router, "r"+name)
}

func (w *world) config() Config {
	cfg := DefaultConfig()
	cfg.StateDir = w.t.TempDir()
	cfg.PollInterval = time.Hour // only events may trigger, unless a test says otherwise
	cfg.StartTimeout = time.Hour
	cfg.DHCPGrace = 0 // the test world runs no DHCP client
	cfg.IMDS = IMDSConfig{Endpoint: w.url, Timeout: time.Second}
	return cfg
}

func testSource(c IMDSConfig) (Snapshotter, error) {
	// Unpaced: the emulator is local.
	cl, err := imds.New(imds.Options{Endpoint: c.Endpoint, Timeout: c.Timeout, MaxRequestsPerSecond: -1})
	if err != nil {
		return nil, err
	}
	return cl, nil
}

// recorder keeps every sd_notify message (Options.Notify).
type recorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *recorder) Notify(s string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, s)
}

func (r *recorder) has(prefix string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range r.msgs {
		for _, line := range strings.Split(m, "\n") {
			if strings.HasPrefix(line, prefix) {
				return true
			}
		}
	}
	return false
}

type running struct {
	d        *Daemon
	stateDir string
	logs     *observer.ObservedLogs // what the daemon logged at info level and above
	notes    *recorder
	cancel   context.CancelFunc
	done     chan error
}

func (w *world) start(cfg Config, configPath string) *running {
	w.t.Helper()
	return w.startPrepared(cfg, configPath, nil)
}

// startPrepared is start with prepare run on the daemon before Run (its
// worker state is then still the test's to set).
func (w *world) startPrepared(cfg Config, configPath string, prepare func(*Daemon)) *running {
	w.t.Helper()
	core, logs := observer.New(zap.InfoLevel)
	r := &running{notes: &recorder{}, logs: logs, done: make(chan error, 1), stateDir: cfg.StateDir}
	logger := zaptest.NewLogger(w.t, zaptest.WrapOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core { return zapcore.NewTee(c, core) })))
	d, err := NewDaemon(Options{
		ConfigPath: configPath, Config: cfg, NS: w.ns.Handle, Logger: logger,
		NewSource: testSource, Notify: r.notes.Notify, Version: "test",
		// Only the reload test sends SIGHUP, and only while Run is active.
		HandleSignals: configPath != "",
	})
	if err != nil {
		w.t.Fatalf("NewDaemon: %v", err)
	}
	r.d = d
	if prepare != nil {
		prepare(d)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- d.Run(ctx) }()
	w.t.Cleanup(r.stop)
	return r
}

func (r *running) stop() {
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	<-r.done
}

// settle waits until the daemon has handled every event so far, so that
// what happens next is caused by the test's own action.
func (r *running) settle(t *testing.T) {
	t.Helper()
	waitFor(t, "the daemon to go idle", r.d.idle.Load)
}

// waitFor polls cond until it holds; the deadline is generous on purpose (no
// timing assertion: a slow CI machine must not fail the test).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitForEvery(t, 20*time.Millisecond, what, cond)
}

// waitForEvery is waitFor polling every interval (finer for latency figures).
func waitForEvery(t *testing.T, interval time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(interval)
	}
}

// hasRule reports whether the namespace has `from src lookup table` with our protocol.
func (w *world) hasRule(src string, table int) bool {
	rules, err := w.ns.NL.RuleList(netlink.FAMILY_V4)
	if err != nil {
		w.t.Fatalf("listing rules: %v", err)
	}
	for _, r := range rules {
		if r.Table == table && r.Src != nil && r.Src.String() == src && r.Protocol == netcfg.DefaultProtocol {
			return true
		}
	}
	return false
}

func (w *world) findRule(match func(netlink.Rule) bool) *netlink.Rule {
	rules, err := w.ns.NL.RuleList(netlink.FAMILY_V4)
	if err != nil {
		w.t.Fatalf("listing rules: %v", err)
	}
	for _, r := range rules {
		if match(r) {
			return &r
		}
	}
	return nil
}

// eniRule is the first rule dualhomed wants for ENI i of ExampleInstance:
// from 10.i.0.10 lookup 2000i.
func eniRule(i int) (string, int) {
	return netip.AddrFrom4([4]byte{10, byte(i), 0, 10}).String() + "/32", netcfg.DefaultTableBase + i
}

func TestDaemonConfiguresHotAttachedLinkWithoutPoll(t *testing.T) {
	w := newWorld(t, 2) // IMDS already lists ENI 1; its link does not exist yet
	cfg := w.config()
	r := w.start(cfg, "")
	waitFor(t, "READY=1 after the first reconcile", func() bool { return r.notes.has("READY=1") })

	r.settle(t)
	src, table := eniRule(1)
	if w.hasRule(src, table) {
		t.Fatal("ENI 1 configured before its link exists")
	}
	start := time.Now()
	w.link(1) // the hot attach: the poll timer is 1 h away, only the link event can act
	// Polled every millisecond: the logged latency is a figure, not a bound.
	waitForEvery(t, time.Millisecond, "the rule of the hot-attached ENI", func() bool { return w.hasRule(src, table) })
	t.Logf("hot-attached link configured %s after its creation began", time.Since(start).Round(time.Millisecond))

	h, err := ReadStatus(cfg.StateDir)
	if err != nil {
		t.Fatalf("reading status file: %v", err)
	}
	if !h.Ready || h.PID != os.Getpid() {
		t.Errorf("status file: %+v", h)
	}
}

func TestDaemonLinkBeforeIMDSKnowsIt(t *testing.T) {
	w := newWorld(t, 1) // IMDS lists only the primary
	cfg := w.config()
	cfg.PollInterval = time.Second
	r := w.start(cfg, "")
	waitFor(t, "READY=1", func() bool { return r.notes.has("READY=1") })

	w.link(1) // the link appears first: IMDS does not know the MAC yet
	src, table := eniRule(1)
	if err := w.emu.AttachENI(w.inst.ENIs[1]); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the rule of the ENI IMDS learned late", func() bool { return w.hasRule(src, table) })
}

// startedWithENI1 is a world with ENI 1's link, and its daemon (default
// configuration) started, ready and idle with ENI 1 configured: the source
// and table of ENI 1's rule are returned too.
func startedWithENI1(t *testing.T) (*world, *running, string, int) {
	t.Helper()
	w := newWorld(t, 2)
	w.link(1)
	r := w.start(w.config(), "")
	src, table := eniRule(1)
	waitFor(t, "ENI 1 configured", func() bool { return w.hasRule(src, table) })
	waitFor(t, "READY=1", func() bool { return r.notes.has("READY=1") })
	r.settle(t)
	return w, r, src, table
}

func TestDaemonRepairsOwnRuleLeavesForeignRules(t *testing.T) {
	w, r, src, table := startedWithENI1(t)

	// Two foreign rules: one in our priority band (another protocol), kept;
	// one we delete, which must stay deleted.
	foreign := func(prio int, from string) *netlink.Rule {
		rule := netlink.NewRule()
		rule.Priority, rule.Table, rule.Protocol = prio, 100+prio%100, unix.RTPROT_STATIC
		rule.Src = &net.IPNet{IP: net.ParseIP(from).To4(), Mask: net.CIDRMask(32, 32)}
		if err := w.ns.NL.RuleAdd(rule); err != nil {
			t.Fatalf("adding foreign rule: %v", err)
		}
		return rule
	}
	kept := foreign(netcfg.DefaultPriorityBase+5, "192.0.2.5")
	gone := foreign(1000, "192.0.2.6")
	if err := w.ns.NL.RuleDel(gone); err != nil {
		t.Fatal(err)
	}

	ours := w.findRule(func(r netlink.Rule) bool { return r.Table == table && r.Src != nil && r.Src.String() == src })
	if err := w.ns.NL.RuleDel(ours); err != nil {
		t.Fatalf("deleting our rule: %v", err)
	}
	// Deleted after the foreign one, so its repair proves a reconcile ran
	// after the foreign deletion.
	waitFor(t, "our deleted rule restored", func() bool { return w.hasRule(src, table) })
	r.settle(t)
	if h, err := ReadStatus(r.stateDir); err != nil || !strings.Contains(h.Report.Trigger, "drift") {
		t.Errorf("the repair was not triggered by the rule deletion: trigger %q, %v", h.Report.Trigger, err)
	}

	if w.findRule(func(r netlink.Rule) bool { return r.Priority == gone.Priority && r.Table == gone.Table }) != nil {
		t.Error("a deleted foreign rule was restored")
	}
	if w.findRule(func(r netlink.Rule) bool {
		return r.Priority == kept.Priority && r.Table == kept.Table && r.Protocol == unix.RTPROT_STATIC
	}) == nil {
		t.Error("a foreign rule in our priority band was removed")
	}
}

func TestDaemonReloadRejectsBadConfig(t *testing.T) {
	w := newWorld(t, 2)
	w.link(1)
	cfg := w.config()
	path := filepath.Join(t.TempDir(), "dualhomed.yaml")
	base := "poll_interval: 1h\ndhcp_grace: 0s\nstate_dir: " + cfg.StateDir + "\nimds:\n  endpoint: " + w.url + "\n"
	if err := os.WriteFile(path, []byte(base), 0o644); err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	r := w.start(loaded, path)
	src, table := eniRule(1)
	waitFor(t, "ENI 1 configured", func() bool { return w.hasRule(src, table) })
	waitFor(t, "READY=1", func() bool { return r.notes.has("READY=1") }) // Run has installed its SIGHUP handler

	bad := base + "enis:\n  - match: {interface_id: " + w.inst.ENIs[1].InterfaceID + "}\n    vpc_routes: maybe\n"
	if err := os.WriteFile(path, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	// Through SIGHUP, as systemctl reload does: the rejection is logged.
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the bad file's rejection", func() bool {
		for _, e := range r.logs.FilterMessage("reload rejected; keeping the running configuration").All() {
			if err, _ := e.ContextMap()["error"].(string); strings.Contains(err, path+":8: enis[0].vpc_routes") {
				return true
			}
		}
		return false
	})
	// The old configuration still runs: drift is repaired as before.
	ours := w.findRule(func(r netlink.Rule) bool { return r.Table == table && r.Src != nil && r.Src.String() == src })
	if err := w.ns.NL.RuleDel(ours); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "rule restored under the old configuration", func() bool { return w.hasRule(src, table) })

	// A good file takes effect: a route of `routes:` appears in main.
	good := base + "enis:\n  - match: {interface_id: " + w.inst.ENIs[1].InterfaceID + "}\n    routes: [198.51.100.0/24]\n"
	if err := os.WriteFile(path, []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the route of the reloaded configuration", func() bool {
		routes, err := w.ns.NL.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			t.Fatal(err)
		}
		for _, rt := range routes {
			if rt.Dst != nil && rt.Dst.String() == "198.51.100.0/24" {
				return true
			}
		}
		return false
	})
}

func TestDaemonIMDSUnreachableKeepsKernelState(t *testing.T) {
	w := newWorld(t, 2)
	w.link(1)
	// A rule of ours from an earlier run.
	src, table := eniRule(1)
	rule := netlink.NewRule()
	rule.Priority, rule.Table, rule.Protocol = netcfg.DefaultPriorityBase+1, table, netcfg.DefaultProtocol
	rule.Src = &net.IPNet{IP: net.ParseIP("10.1.0.10").To4(), Mask: net.CIDRMask(32, 32)}
	if err := w.ns.NL.RuleAdd(rule); err != nil {
		t.Fatal(err)
	}
	cfg := w.config()
	cfg.IMDS.Endpoint = closedPort(t)
	cfg.StartTimeout = time.Second
	r := w.start(cfg, "")
	waitFor(t, "READY=1 (degraded) after start_timeout", func() bool { return r.notes.has("READY=1") })
	if !r.notes.has("STATUS=degraded") {
		t.Errorf("READY without a degraded STATUS: %q", r.notes.msgs)
	}
	h, err := ReadStatus(cfg.StateDir)
	if err != nil || !h.Degraded || h.LastError == "" {
		t.Errorf("status file while IMDS is down: %+v, %v", h, err)
	}
	if !w.hasRule(src, table) {
		t.Error("an unreachable IMDS removed a rule")
	}
}

// closedPort returns an http URL on loopback where nothing listens.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr
}

func TestDaemonSdNotify(t *testing.T) {
	w := newWorld(t, 2)
	w.link(1)
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	t.Setenv("WATCHDOG_USEC", "200000")

	var mu sync.Mutex
	got := map[string]bool{}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			mu.Lock()
			for _, line := range strings.Split(string(buf[:n]), "\n") {
				key, _, _ := strings.Cut(line, "=")
				got[key] = true
				if key == "STATUS" && strings.Contains(line, "configured") {
					got["STATUS configured"] = true
				}
			}
			mu.Unlock()
		}
	}()
	seen := func(k string) func() bool {
		return func() bool { mu.Lock(); defer mu.Unlock(); return got[k] }
	}

	cfg := w.config()
	d, err := NewDaemon(Options{Config: cfg, NS: w.ns.Handle, Logger: zaptest.NewLogger(t), NewSource: testSource})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	waitFor(t, "READY", seen("READY"))
	waitFor(t, "STATUS with configured ENIs", seen("STATUS configured"))
	waitFor(t, "WATCHDOG", seen("WATCHDOG"))
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	waitFor(t, "STOPPING", seen("STOPPING"))

	// Stopping leaves routes in place.
	src, table := eniRule(1)
	if !w.hasRule(src, table) {
		t.Error("stopping removed our rules")
	}
}

// A link whose MAC IMDS does not describe yet is retried quickly (0.5 s, 1 s,
// 2 s, 4 s) rather than at the next poll, which is an hour away here. Both
// ways IMDS catches up are covered: the MAC missing from the listing, and the
// MAC listed with its keys still answering 404.
func TestDaemonRetriesIMDSForAnUnknownLink(t *testing.T) {
	for _, pending := range []bool{false, true} {
		name := "MAC not listed"
		if pending {
			name = "MAC listed, keys 404"
		}
		t.Run(name, func(t *testing.T) {
			w := newWorld(t, 1)
			mac := w.inst.ENIs[1].MAC
			if pending {
				if err := w.emu.AttachENI(w.inst.ENIs[1]); err != nil {
					t.Fatal(err)
				}
				if err := w.emu.SetFaults(emulator.Faults{PendingMACs: []string{mac}}); err != nil {
					t.Fatal(err)
				}
			}
			r := w.start(w.config(), "")
			waitFor(t, "READY=1", func() bool { return r.notes.has("READY=1") })
			r.settle(t)
			reads := w.emu.Stats().TokenRequests + w.emu.Stats().Requests

			w.link(1)
			// Wait until the link's own reconcile has read IMDS (and found
			// nothing usable), so that only a retry can configure the ENI.
			waitFor(t, "an IMDS read caused by the new link", func() bool {
				s := w.emu.Stats()
				return s.TokenRequests+s.Requests > reads
			})
			r.settle(t)
			src, table := eniRule(1)
			if w.hasRule(src, table) {
				t.Fatal("configured before IMDS described the ENI")
			}
			if pending {
				w.emu.ClearFaults()
			} else if err := w.emu.AttachENI(w.inst.ENIs[1]); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the ENI configured by a quick retry", func() bool { return w.hasRule(src, table) })
		})
	}
}

// A burst of hot-attached links (15, as at boot on a large instance) is
// configured completely; how many snapshots it took is logged, not asserted
// (it depends on the machine's speed; TestDaemonBatchesEvents proves the
// coalescing on a simulated clock).
func TestDaemonConfiguresABurstOfLinks(t *testing.T) {
	nstest.RequireRoot(t)
	w := &world{t: t, ns: nstest.New(t), router: nstest.New(t)}
	w.inst = emulator.ExampleInstance(16, 1, 0, 0, 1)
	w.emu = emulator.New(w.inst)
	url, err := w.emu.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.emu.Close() })
	w.url = url
	w.ns.Veth(t, "eth0", w.inst.ENIs[0].MAC, w.router, "reth0")
	r := w.start(w.config(), "")
	waitFor(t, "READY=1", func() bool { return r.notes.has("READY=1") })
	r.settle(t)
	before := snapshots(w.emu)

	began := time.Now()
	for i := 1; i < 16; i++ {
		w.ns.Veth(t, "ens"+strconv.Itoa(i), w.inst.ENIs[i].MAC, w.router, "rens"+strconv.Itoa(i))
	}
	created := time.Since(began)
	for i := 1; i < 16; i++ {
		src, table := eniRule(i)
		waitFor(t, "ENI "+strconv.Itoa(i)+" configured", func() bool { return w.hasRule(src, table) })
	}
	r.settle(t)
	t.Logf("15 hot-attached links (created in %s) took %d IMDS snapshots", created.Round(time.Millisecond), snapshots(w.emu)-before)
}

// snapshots counts the emulator's answers to meta-data/mac: one per snapshot.
func snapshots(emu *emulator.Server) int64 {
	var n int64
	for path, c := range emu.Stats().ByPath {
		if strings.HasSuffix(path, "meta-data/mac") {
			n += c
		}
	}
	return n
}

// A foreign route holding the place of one of ours (same table and
// destination) is left alone, and the daemon does not retry the add on every
// reconcile; once the foreign route goes, ours is added.
func TestDaemonLeavesBlockedRouteAlone(t *testing.T) {
	w := newWorld(t, 2)
	w.link(1)
	_, table := eniRule(1)
	eth1, err := w.ns.NL.LinkByName("eth1")
	if err != nil {
		t.Fatal(err)
	}
	// The route dualhomed wants in ENI 1's table for its subnet, put there
	// first by "another program" (protocol static).
	subnet := &net.IPNet{IP: net.IPv4(10, 1, 0, 0).To4(), Mask: net.CIDRMask(20, 32)}
	foreign := &netlink.Route{LinkIndex: eth1.Attrs().Index, Dst: subnet, Table: table, Scope: netlink.SCOPE_LINK, Protocol: unix.RTPROT_STATIC}
	if err := w.ns.NL.RouteAdd(foreign); err != nil {
		t.Fatalf("adding the foreign route: %v", err)
	}
	cfg := w.config()
	cfg.PollInterval = time.Second
	w.start(cfg, "")
	src, _ := eniRule(1)
	waitFor(t, "ENI 1's rules", func() bool { return w.hasRule(src, table) })

	// Polls find nothing to do but the blocked route: they must leave it.
	var h Health
	waitFor(t, "a poll after the configuration", func() bool {
		var err error
		h, err = ReadStatus(cfg.StateDir)
		return err == nil && h.Report.Trigger == "poll" && !h.Report.Time.IsZero()
	})
	if h.Report.Writes != 0 || h.Report.Repairs != 0 {
		t.Errorf("idle reconcile with a blocked route: %d writes, %d repairs (changes %v)", h.Report.Writes, h.Report.Repairs, h.Report.Changes)
	}
	warned := false
	for _, w := range h.Report.Warnings {
		warned = warned || strings.Contains(w.Message, "10.1.0.0/20")
	}
	if !warned {
		t.Errorf("no warning names the blocked route: %v", h.Report.Warnings)
	}
	routes, _ := w.ns.NL.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	stillForeign := false
	for _, rt := range routes {
		stillForeign = stillForeign || (rt.Dst != nil && rt.Dst.String() == subnet.String() && rt.Protocol == unix.RTPROT_STATIC)
	}
	if !stillForeign {
		t.Fatal("the foreign route was replaced or deleted")
	}

	// The other program removes its route: ours takes its place.
	if err := w.ns.NL.RouteDel(foreign); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "our subnet route after the foreign one went", func() bool {
		routes, _ := w.ns.NL.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
		for _, rt := range routes {
			if rt.Dst != nil && rt.Dst.String() == subnet.String() && rt.Protocol == netcfg.DefaultProtocol {
				return true
			}
		}
		return false
	})
}

// Container veths (MACs IMDS never lists) appearing in a burst cost the MAC
// listing, one request per read including the quick re-reads, never a full
// snapshot: N veths cost about N requests or fewer, not N snapshots of ~30
// requests each. A hot attach still works afterwards (IMDS learns the MAC).
func TestDaemonUnknownLinksCostOneRequestEach(t *testing.T) {
	const veths = 20
	w, r, _, _ := startedWithENI1(t)
	before := w.emu.Stats()
	snapsBefore := snapshots(w.emu)

	for i := range veths {
		mac := net.HardwareAddr{0x0a, 0x58, 0x0a, 0xf4, 0x00, byte(i + 1)}.String()
		w.ns.Veth(t, "veth"+strconv.Itoa(i), mac, w.router, "cveth"+strconv.Itoa(i))
	}
	// The first read and the four quick re-reads (0.5, 1, 2, 4 s) for the
	// veths, whatever the burst's split into reconciles.
	listings := func() int64 {
		return w.emu.Stats().ByPath["/latest/meta-data/network/interfaces/macs/"] - before.ByPath["/latest/meta-data/network/interfaces/macs/"]
	}
	waitFor(t, "the quick re-reads for the veths", func() bool { return listings() >= maxLinkRetries })
	r.settle(t)
	cost := w.emu.Stats().Requests - before.Requests
	t.Logf("%d container veths cost %d IMDS requests (%d listings, %d snapshots)", veths, cost, listings(), snapshots(w.emu)-snapsBefore)
	if n := snapshots(w.emu) - snapsBefore; n != 0 {
		t.Errorf("%d full snapshots for links IMDS does not list, want 0", n)
	}
	if cost > veths {
		t.Errorf("%d veths cost %d IMDS requests, want at most %d", veths, cost, veths)
	}

	// A real hot attach afterwards: the listing names the new MAC, so a
	// snapshot is taken and the ENI is configured by a quick re-read.
	w.link(2)
	if err := w.emu.AttachENI(w.inst.ENIs[2]); err != nil {
		t.Fatal(err)
	}
	src2, table2 := eniRule(2)
	waitFor(t, "the hot-attached ENI 2 configured", func() bool { return w.hasRule(src2, table2) })
}

// reconcilesFor replays events (offsets from the first, with their reasons)
// through the daemon's batching on a simulated clock and returns when each
// reconcile runs. No real timer is involved: the result is exact.
func reconcilesFor(events []time.Duration, r Trigger, delayFor func() time.Duration) []time.Duration {
	var b batch
	var deadline time.Duration
	var runs []time.Duration
	base := time.Unix(1e9, 0)
	for _, at := range events {
		if b.open && at >= deadline { // the settle timer fired before this event
			runs = append(runs, deadline)
			b = batch{}
		}
		if delay, rearm := b.add(base.Add(at), r, delayFor); rearm {
			deadline = at + delay
		}
	}
	if b.open {
		runs = append(runs, deadline)
	}
	return runs
}

// Bursts are coalesced by quiet, not by a fixed delay: the 45 events of 15
// links created back to back (add, up, carrier) are one reconcile that runs
// debounce after the last one; links apart by more than the debounce are
// reconciled one by one; a steady stream is cut every maxSettle; a repair
// backoff is not shortened by further drift, but a link event cuts it to the
// debounce, and a reload is not delayed.
func TestDaemonBatchesEvents(t *testing.T) {
	debounced := func() time.Duration { return debounce }
	every := func(n int, gap time.Duration) []time.Duration {
		out := make([]time.Duration, n)
		for i := range out {
			out[i] = time.Duration(i) * gap
		}
		return out
	}

	burst := every(45, time.Millisecond/2)
	if got := reconcilesFor(burst, TriggerLink, debounced); len(got) != 1 || got[0] != burst[44]+debounce {
		t.Errorf("15 links back to back: reconciles at %v, want one at %v", got, burst[44]+debounce)
	}
	if got := reconcilesFor([]time.Duration{0}, TriggerLink, debounced); len(got) != 1 || got[0] != debounce {
		t.Errorf("one hot-attached link: reconcile at %v, want %v after it", got, debounce)
	}
	apart := every(3, debounce+time.Millisecond)
	if got := reconcilesFor(apart, TriggerLink, debounced); len(got) != 3 {
		t.Errorf("links %v apart: reconciles at %v, want 3", debounce+time.Millisecond, got)
	}
	stream := every(200, debounce/2) // 2 s of events
	got := reconcilesFor(stream, TriggerAddr, debounced)
	if len(got) < 4 {
		t.Errorf("a 2 s stream of events: reconciles at %v, want one at least every %v", got, maxSettle)
	}
	for i, at := range got {
		prev := time.Duration(0)
		if i > 0 {
			prev = got[i-1]
		}
		if at-prev > maxSettle+debounce/2 {
			t.Errorf("a steady stream held a reconcile back %v (from %v to %v), want at most maxSettle %v", at-prev, prev, at, maxSettle)
		}
	}

	backoff := func() time.Duration { return 2 * time.Second }
	if got := reconcilesFor(every(10, 100*time.Millisecond), TriggerDrift, backoff); len(got) != 1 || got[0] != 2*time.Second {
		t.Errorf("drift during a repair backoff: reconciles at %v, want one at 2s", got)
	}
	var b batch
	b.add(time.Now(), TriggerDrift, backoff)
	if delay, rearm := b.add(time.Now(), TriggerDrift|TriggerReload, backoff); !rearm || delay != 0 {
		t.Errorf("reload during a repair backoff: delay %v (rearm %v), want immediate", delay, rearm)
	}
	// A link that comes up while drift waits out a repair backoff: its
	// routes (flushed by the kernel with the link) must not wait too.
	b = batch{}
	b.add(time.Now(), TriggerDrift, backoff)
	if delay, rearm := b.add(time.Now(), TriggerDrift|TriggerLink, backoff); !rearm || delay != debounce {
		t.Errorf("link event during a repair backoff: delay %v (rearm %v), want the debounce %v", delay, rearm, debounce)
	}
}

// ourRoutes returns the IPv4 routes of table with our protocol.
func (w *world) ourRoutes(table int) []netlink.Route {
	w.t.Helper()
	routes, err := w.ns.NL.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		w.t.Fatalf("listing routes of table %d: %v", table, err)
	}
	var out []netlink.Route
	for _, rt := range routes {
		if rt.Protocol == netcfg.DefaultProtocol {
			out = append(out, rt)
		}
	}
	return out
}

// After a fight grew the repair backoff, a link that goes down and up (the
// kernel flushes its IPv4 routes) gets its routes back at once: the backoff
// is set to ten minutes, far beyond the wait, so the routes can only return
// in time if link events are not held back by it. Nor do they count as
// repairs: the backoff does not grow.
func TestDaemonLinkDownUpBypassesRepairBackoff(t *testing.T) {
	const backoff = 10 * time.Minute
	w := newWorld(t, 2)
	w.link(1)
	cfg := w.config()
	r := w.startPrepared(cfg, "", func(d *Daemon) {
		// What a long fight leaves behind (trackRepairs' state).
		d.repairStreak, d.repairDelay, d.lastRepair = 12, backoff, time.Now()
	})
	src, table := eniRule(1)
	// No settle: events held by the backoff (our own address adds) keep
	// the daemon from going idle. READY=1 follows the start's read-back:
	// a link taken down before it would have the start's routes blocked.
	waitFor(t, "ENI 1 configured", func() bool {
		return r.notes.has("READY=1") && w.hasRule(src, table) && len(w.ourRoutes(table)) > 0
	})
	want := len(w.ourRoutes(table))

	eth1, err := w.ns.NL.LinkByName("eth1")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.ns.NL.LinkSetDown(eth1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the kernel to flush eth1's routes", func() bool { return len(w.ourRoutes(table)) == 0 })
	up := time.Now()
	if err := w.ns.NL.LinkSetUp(eth1); err != nil {
		t.Fatal(err)
	}
	// waitFor gives up after 30 s, well before the backoff would expire.
	waitForEvery(t, time.Millisecond, "eth1's routes back after link up", func() bool { return len(w.ourRoutes(table)) == want })
	t.Logf("%d routes back %v after link up, with a repair backoff of %v in force", want, time.Since(up).Round(time.Millisecond), backoff)
	var h Health
	waitFor(t, "the status of the reconcile that restored the routes", func() bool {
		var err error
		h, err = ReadStatus(cfg.StateDir)
		return err == nil && h.Report.Restored > 0
	})
	if h.Report.Repairs != 0 || !strings.Contains(h.Report.Trigger, "link") {
		t.Errorf("the reconcile after link up (trigger %q) counted %d repairs, want 0 (%d restored)", h.Report.Trigger, h.Report.Repairs, h.Report.Restored)
	}
}
