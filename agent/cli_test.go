package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/dualhomed/dualhomed/netcfg"
)

func TestApplyWaitNamesMissingENIs(t *testing.T) {
	w := newWorld(t, 2) // ENI 1 listed by IMDS, its link missing
	cfg := w.config()
	k, err := netcfg.NewKernel(w.ns.Handle, cfg.StateDir, cfg.Netcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	src, _ := testSource(cfg.IMDS)
	rec := atOnce(NewReconciler(src, k, cfg))

	_, missing, err := Apply(context.Background(), rec, 1500*time.Millisecond, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) != 1 || !strings.Contains(missing[0], w.inst.ENIs[1].InterfaceID) || !strings.Contains(missing[0], "waiting for link") {
		t.Fatalf("missing = %q, want ENI 1 waiting for its link", missing)
	}

	w.link(1)
	rep, missing, err := Apply(context.Background(), rec, time.Minute, zap.NewNop())
	if err != nil || len(missing) != 0 {
		t.Fatalf("after the link appeared: missing %q, err %v", missing, err)
	}
	src1, table := eniRule(1)
	if !w.hasRule(src1, table) || configured(rep) != 1 {
		t.Errorf("apply did not configure ENI 1: %s", rep.Summary())
	}

	// plan is now in sync, and status renders every ENI.
	rep, err = Plan(context.Background(), rec)
	if err != nil || len(rep.Changes) != 0 {
		t.Fatalf("plan after apply: %v %v", rep.Changes, err)
	}
	var buf bytes.Buffer
	writeStatusTable(&buf, rep, nil, os.ErrNotExist)
	out := buf.String()
	for _, want := range []string{"LINK", "eth1", w.inst.ENIs[1].InterfaceID, "10.1.0.10", "20001", "configured", "primary", "* VPC differs"} {
		if !strings.Contains(out, want) {
			t.Errorf("status table lacks %q:\n%s", want, out)
		}
	}
	buf.Reset()
	if err := WritePlanJSON(&buf, rep); err != nil {
		t.Fatal(err)
	}
	var pj PlanJSON
	if err := json.Unmarshal(buf.Bytes(), &pj); err != nil || !pj.InSync || len(pj.ENIs) != 2 {
		t.Errorf("plan --json: %v %s", err, buf.String())
	}
	buf.Reset()
	h := Health{PID: os.Getpid(), Ready: true, Summary: "x", Report: Report{Trigger: "poll"}}
	if err := writeStatusJSON(&buf, rep, nil, &h, nil); err != nil {
		t.Fatal(err)
	}
	var sj map[string]any
	if err := json.Unmarshal(buf.Bytes(), &sj); err != nil {
		t.Fatal(err)
	}
	enis, _ := sj["enis"].([]any)
	daemon, _ := sj["daemon"].(map[string]any)
	if len(enis) != 2 || daemon["running"] != true || daemon["last_trigger"] != "poll" {
		t.Errorf("status --json: %s", buf.String())
	}
	if e, _ := enis[1].(map[string]any); e["interface_id"] != w.inst.ENIs[1].InterfaceID || e["table"] != float64(table) {
		t.Errorf("status --json ENI: %v", enis[1])
	}
}

func TestPlanWithoutIMDSIsAnError(t *testing.T) {
	src, _ := testSource(IMDSConfig{Endpoint: closedPort(t), Timeout: time.Second})
	_, k := testWorld()
	_, err := Plan(context.Background(), atOnce(NewReconciler(src, k, DefaultConfig())))
	if err == nil || !strings.Contains(err.Error(), "is this an EC2 instance?") {
		t.Fatalf("err = %v", err)
	}
	if len(k.applied) != 0 {
		t.Error("plan applied changes")
	}
}

func TestMetricsExposition(t *testing.T) {
	m := NewMetrics(nil)
	m.Record(Report{Time: time.Now(), Fresh: true, HaveSnapshot: true, IMDSRequests: 7, Writes: 3, Repairs: 1,
		Changes: make([]Change, 3), ManagedRules: 4, ManagedRoutes: 5,
		ENIs: []netcfg.ENIStatus{{State: netcfg.ENIConfigured}, {State: netcfg.ENIPrimaryRole}}}, nil)
	m.Record(Report{IMDSError: "down", ManagedRules: 4, ManagedRoutes: 5}, nil) // no snapshot: ENI gauges stay
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		`dualhomed_reconciles_total{result="ok"} 1`,
		`dualhomed_reconciles_total{result="degraded"} 1`,
		`dualhomed_changes_applied_total 3`,
		`dualhomed_drift_repairs_total 1`,
		`dualhomed_imds_requests_total 7`,
		`dualhomed_imds_errors_total 1`,
		`dualhomed_managed_rules 4`,
		`dualhomed_managed_routes 5`,
		`dualhomed_enis{state="configured"} 1`,
		"dualhomed_last_successful_reconcile_timestamp_seconds 1",
		"dualhomed_reconcile_duration_seconds_bucket",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// configuredENI1 is a world whose ENI 1 (another VPC) dualhomed has
// configured through the one-shot apply, with the kernel and IMDS source
// that did it.
// deleteOurMainRoute deletes the first main-table route of ours (ENI 1's
// route to its VPC, which is not the primary's) and returns it.
func (w *world) deleteOurMainRoute() *netlink.Route {
	w.t.Helper()
	routes := w.ourRoutes(netcfg.MainTable)
	if len(routes) == 0 {
		w.t.Fatal("apply added no main-table route for ENI 1 (another VPC)")
	}
	if err := w.ns.NL.RouteDel(&routes[0]); err != nil {
		w.t.Fatal(err)
	}
	return &routes[0]
}

func configuredENI1(t *testing.T) (*world, Config, Kernel, Snapshotter) {
	t.Helper()
	w := newWorld(t, 2)
	w.link(1)
	cfg := w.config()
	k, err := netcfg.NewKernel(w.ns.Handle, cfg.StateDir, cfg.Netcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Close)
	src, _ := testSource(cfg.IMDS)
	if _, _, err := Apply(context.Background(), atOnce(NewReconciler(src, k, cfg)), 0, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	return w, cfg, k, src
}

// A foreign main-table route with the destination and metric of one of ours
// makes our add answer EEXIST; the daemon skips it with a warning. plan
// agrees: the add is a warning with a hint, not a pending change, so plan
// says "in sync" (exit 0) instead of listing it forever. A foreign route
// with another metric blocks nothing: there the add stays pending.
func TestPlanReportsBlockedMainRouteAsWarning(t *testing.T) {
	w, cfg, k, src := configuredENI1(t)
	ours := w.deleteOurMainRoute()
	foreign := *ours
	foreign.Protocol = unix.RTPROT_STATIC
	plan := func() Report {
		t.Helper()
		rep, err := Plan(context.Background(), atOnce(NewReconciler(src, k, cfg))) // a fresh process, as `dualhomed plan`
		if err != nil {
			t.Fatal(err)
		}
		return rep
	}

	foreign.Priority = 100
	if err := w.ns.NL.RouteAdd(&foreign); err != nil {
		t.Fatalf("adding the foreign route: %v", err)
	}
	if rep := plan(); len(rep.Changes) != 1 || !strings.Contains(rep.Changes[0].Text, ours.Dst.String()) {
		t.Errorf("with a foreign route of another metric, plan changes = %v, want our route to %s pending", rep.Changes, ours.Dst)
	}
	if err := w.ns.NL.RouteDel(&foreign); err != nil {
		t.Fatal(err)
	}

	foreign.Priority = 0
	if err := w.ns.NL.RouteAdd(&foreign); err != nil {
		t.Fatalf("adding the foreign route: %v", err)
	}
	rep := plan()
	if len(rep.Changes) != 0 {
		t.Errorf("plan lists %v, want no pending change (the add is blocked by the foreign route)", rep.Changes)
	}
	if configured(rep) != 1 {
		t.Errorf("plan: %s, want ENI 1 configured, as the daemon reports it", rep.Summary())
	}
	// The object and its holder, as the kernel holds them.
	object := fmt.Sprintf("route %s via %s dev eth1 src %s table main", ours.Dst, ours.Gw, ours.Src)
	holder := fmt.Sprintf("route %s via %s dev eth1 src %s table main proto static metric 0", ours.Dst, ours.Gw, ours.Src)
	warned := false
	for _, wn := range rep.Warnings {
		warned = warned || (wn.Blocked != nil && wn.Blocked.Object == object && wn.Blocked.Holder == holder &&
			strings.Contains(wn.Message, "cannot add "+object+": held by "+holder) && wn.Hint != "")
	}
	if !warned {
		t.Errorf("no warning with a hint names the blocked %q and its holder %q: %v", object, holder, rep.Warnings)
	}
	var buf bytes.Buffer
	WritePlan(&buf, rep)
	if !strings.Contains(buf.String(), "in sync") || !strings.Contains(buf.String(), "held by "+holder) {
		t.Errorf("plan output:\n%s\nwant in sync, and the holder named", buf.String())
	}
	buf.Reset()
	if err := WritePlanJSON(&buf, rep); err != nil || !strings.Contains(buf.String(), `"holder": "`+holder+`"`) {
		t.Errorf("plan --json (err %v) does not name the holder:\n%s", err, buf.String())
	}

	// The daemon's path agrees: the add fails to stick, is blocked, and the
	// foreign route is left alone.
	rec := atOnce(NewReconciler(src, k, cfg))
	drep, _, err := Apply(context.Background(), rec, 0, zap.NewNop())
	if err != nil || drep.Blocked != 1 || rec.Blocked() != 1 {
		t.Errorf("apply with the foreign route: err %v, blocked %d (reconciler %d), want 1", err, drep.Blocked, rec.Blocked())
	}
	if want := []netcfg.Blocked{{Object: object, Holder: holder}}; !slices.Equal(drep.BlockedObjects, want) {
		t.Errorf("apply's blocked objects %v, want %v", drep.BlockedObjects, want)
	}
	// status shows what the daemon holds back, from its status file.
	buf.Reset()
	writeDaemonHealth(&buf, &Health{PID: os.Getpid(), Report: drep}, nil)
	if !strings.Contains(buf.String(), "daemon: cannot add "+object+": held by "+holder) {
		t.Errorf("status does not name the daemon's blocked object:\n%s", buf.String())
	}
	buf.Reset()
	if err := writeStatusJSON(&buf, rep, nil, &Health{PID: os.Getpid(), Report: drep}, nil); err != nil || strings.Count(buf.String(), `"holder": "`+holder+`"`) != 2 {
		t.Errorf("status --json (err %v) names the holder %d times, want 2 (live warning, daemon):\n%s", err, strings.Count(buf.String(), holder), buf.String())
	}
	routes, _ := w.ns.NL.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: netcfg.MainTable}, netlink.RT_FILTER_TABLE)
	left := false
	for _, rt := range routes {
		left = left || (rt.Dst != nil && rt.Dst.String() == ours.Dst.String() && rt.Protocol == unix.RTPROT_STATIC)
	}
	if !left {
		t.Error("the foreign route was replaced or deleted")
	}
}

// A foreign route in one of our tables with the destination and metric of
// ours keeps ours out (EEXIST): plan reports it as blocked, with the
// conflict's warning, not as a change pending forever (exit 2).
func TestPlanReportsBlockedRouteInOurTable(t *testing.T) {
	w, cfg, k, src := configuredENI1(t)
	table := netcfg.DefaultTableBase + w.inst.ENIs[1].DeviceNumber
	var ours *netlink.Route
	for _, rt := range w.ourRoutes(table) {
		if rt.Dst == nil || rt.Dst.String() == "0.0.0.0/0" {
			ours = &rt // the table's default route
		}
	}
	if ours == nil {
		t.Fatalf("apply added no default route to table %d", table)
	}
	if err := w.ns.NL.RouteDel(ours); err != nil {
		t.Fatal(err)
	}
	foreign := *ours
	foreign.Protocol = unix.RTPROT_STATIC
	if err := w.ns.NL.RouteAdd(&foreign); err != nil {
		t.Fatalf("adding the foreign route: %v", err)
	}
	rep, err := Plan(context.Background(), atOnce(NewReconciler(src, k, cfg)))
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Changes) != 0 {
		t.Errorf("plan lists %v, want no pending change (the add is blocked by the foreign route)", rep.Changes)
	}
	blocked := false
	for _, wn := range rep.Warnings {
		blocked = blocked || (strings.Contains(wn.Message, "cannot add") && strings.Contains(wn.Message, fmt.Sprintf("table %d", table)))
	}
	if !blocked {
		t.Errorf("no warning names the blocked default route of table %d: %v", table, rep.Warnings)
	}
}

// A warning of Desired is both the ENI's and the report's: the status table
// prints it once; an ENI's own note (not ready, kept state) is printed too.
func TestStatusTablePrintsEachWarningOnce(t *testing.T) {
	overlap := "not routing 10.0.0.0/16 of vpc-c through eth2 in the main table: it overlaps 10.0.0.0/16 of vpc-a"
	rep := Report{HaveSnapshot: true,
		ENIs: []netcfg.ENIStatus{{MAC: "02:00:00:00:00:02", InterfaceID: "eni-2", State: netcfg.ENIConfigured,
			Warnings: []string{overlap, "keeping the existing configuration until IMDS is ready"}}},
		Warnings: []netcfg.Warning{{ENI: "eni-2", Message: overlap, Hint: "list what this ENI must reach under `routes:`"}},
	}
	var buf bytes.Buffer
	writeStatusTable(&buf, rep, nil, os.ErrNotExist)
	if n := strings.Count(buf.String(), overlap); n != 1 {
		t.Errorf("the overlap warning is printed %d times:\n%s", n, buf.String())
	}
	if !strings.Contains(buf.String(), "warning: eni-2: keeping the existing configuration") {
		t.Errorf("the ENI's own note is missing:\n%s", buf.String())
	}
}

// The NAT's counters are read at each scrape, and status shows each ENI's
// NAT role, a source's connections and the drops.
func TestNATInMetricsAndStatus(t *testing.T) {
	counters := netcfg.NATCounters{Connections: map[string]uint64{"eth1": 12}, Dropped: map[string]uint64{"between two ENIs": 3}}
	m := NewMetrics(func() (netcfg.NATCounters, error) { return counters, nil })
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{`dualhomed_nat_connections_total{link="eth1"} 12`, `dualhomed_nat_dropped_packets_total{reason="between two ENIs"} 3`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}

	rep := Report{HaveSnapshot: true, NAT: &counters, ENIs: []netcfg.ENIStatus{
		{MAC: "02:00:00:00:00:00", Link: "eth0", NAT: netcfg.NATRoleEgress, State: netcfg.ENIPrimaryRole},
		{MAC: "02:00:00:00:00:01", Link: "eth1", NAT: netcfg.NATRoleSource, State: netcfg.ENIConfigured},
	}}
	var buf bytes.Buffer
	writeStatusTable(&buf, rep, nil, os.ErrNotExist)
	for _, want := range []string{"egress", "source (connections: 12)", "NAT (table inet dualhomed) dropped packets: between two ENIs 3"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, buf.String())
		}
	}
	buf.Reset()
	WritePlan(&buf, rep)
	if want := "NAT (table inet dualhomed): eth0 egress, eth1 source (connections: 12)\n"; !strings.Contains(buf.String(), want) {
		t.Errorf("plan lacks %q:\n%s", want, buf.String())
	}
}

// Issue 13 (coexistence change 8): with eth1's subnet route moved out of
// main (amazon-ec2-net-utils), the kernel refuses our VPC route in main
// (ENETUNREACH). The reconcile succeeds with a warning naming the route
// and the reason, the add is not tried again while the kernel stays as it
// is (zero writes), and once the kernel changes (Unblock, as the daemon
// does on a kernel event) it goes in.
func TestRefusedMainRouteIsAWarningNotRetried(t *testing.T) {
	w, cfg, k, src := configuredENI1(t)
	ours := w.deleteOurMainRoute()
	routes, err := w.ns.NL.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: netcfg.MainTable, LinkIndex: ours.LinkIndex},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_OIF)
	if err != nil {
		t.Fatal(err)
	}
	var moved []netlink.Route // the subnet's route, as ec2-net-utils moves it
	for _, rt := range routes {
		if rt.Protocol == unix.RTPROT_KERNEL {
			moved = append(moved, rt)
			if err := w.ns.NL.RouteDel(&rt); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(moved) == 0 {
		t.Fatal("eth1 has no subnet route in main to move away")
	}
	rec := atOnce(NewReconciler(src, k, cfg))
	object := fmt.Sprintf("route %s via %s dev eth1 src %s table main", ours.Dst, ours.Gw, ours.Src)
	reason := fmt.Sprintf("network is unreachable: no route in table 254 reaches %s", ours.Gw)
	for i, trig := range []Trigger{TriggerStart, TriggerPoll} {
		rep, err := rec.Reconcile(context.Background(), trig, false)
		if err != nil || rep.ApplyError != "" {
			t.Fatalf("reconcile %d: %v, apply error %q", i, err, rep.ApplyError)
		}
		if i == 1 && rep.Writes != 0 {
			t.Errorf("reconcile %d tried the refused add again: %d writes", i, rep.Writes)
		}
		if slices.ContainsFunc(rep.Changes, func(c netcfg.Change) bool { return strings.Contains(c.Text, ours.Dst.String()) }) {
			t.Errorf("reconcile %d reports the refused add as a change: %v", i, rep.Changes)
		}
		warned := false
		for _, wn := range rep.Warnings {
			warned = warned || (wn.Blocked != nil && wn.Blocked.Object == object && strings.Contains(wn.Message, "cannot add "+object+": "+reason))
		}
		if !warned || !rec.Refused() {
			t.Errorf("reconcile %d: no warning names %q and %q (refused %v): %v", i, object, reason, rec.Refused(), rep.Warnings)
		}
	}
	for _, rt := range moved {
		if err := w.ns.NL.RouteAdd(&rt); err != nil {
			t.Fatal(err)
		}
	}
	rec.Unblock()
	if rep, err := rec.Reconcile(context.Background(), TriggerForeign, false); err != nil || rep.ApplyError != "" || rec.Refused() {
		t.Fatalf("reconcile with the subnet route back: %v, apply error %q, refused %v", err, rep.ApplyError, rec.Refused())
	}
	if len(w.ourRoutes(netcfg.MainTable)) == 0 {
		t.Error("with the subnet route back in main, our VPC route was not added")
	}
}

// Issue 13 (coexistence, amazon-ec2-net-utils as installed): networkd with
// a DHCPv4 RouteTable= adds the lease's address with noprefixroute and puts
// the subnet's route in that table, not in main. main then does not reach
// the ENI's gateway: dualhomed carries the subnet in main itself, so the
// kernel accepts its VPC route (no refusal, retried at every lease renewal:
// the matrix counted that as a fight), the instance reaches the ENI's VPC
// through it, and the next reconcile makes no write.
func TestNoPrefixRouteLeaseGetsTheSubnetInMain(t *testing.T) {
	w := newWorld(t, 2)
	w.link(1)
	eni := w.inst.ENIs[1]
	eth1, err := w.ns.NL.LinkByName("eth1")
	if err != nil {
		t.Fatal(err)
	}
	primary, subnet := eni.LocalIPv4s[0], eni.SubnetIPv4CIDR
	lease := &netlink.Addr{IPNet: &net.IPNet{IP: primary.AsSlice(), Mask: net.CIDRMask(subnet.Bits(), 32)}, Flags: unix.IFA_F_NOPREFIXROUTE, ValidLft: 600, PreferedLft: 600}
	if err := w.ns.NL.AddrAdd(eth1, lease); err != nil {
		t.Fatalf("adding the lease %v: %v", lease, err)
	}
	if err := w.ns.NL.RouteAdd(&netlink.Route{LinkIndex: eth1.Attrs().Index, Dst: &net.IPNet{IP: subnet.Addr().AsSlice(), Mask: net.CIDRMask(subnet.Bits(), 32)}, Src: primary.AsSlice(),
		Scope: netlink.SCOPE_LINK, Table: 10001, Protocol: unix.RTPROT_DHCP}); err != nil {
		t.Fatalf("adding the subnet's route to table 10001: %v", err)
	}
	cfg := w.config()
	k, err := netcfg.NewKernel(w.ns.Handle, cfg.StateDir, cfg.Netcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Close)
	src, _ := testSource(cfg.IMDS)
	rec := atOnce(NewReconciler(src, k, cfg))
	rep, err := rec.Reconcile(context.Background(), TriggerStart, false)
	if err != nil || rep.ApplyError != "" || rec.Refused() || rec.Blocked() != 0 {
		t.Fatalf("reconcile: %v, apply error %q, refused %v, blocked %d: %v", err, rep.ApplyError, rec.Refused(), rec.Blocked(), rep.Warnings)
	}
	inVPC := netip.AddrFrom4([4]byte{10, 1, 200, 1}) // in the ENI's VPC, outside its subnet
	if !eni.VPCIPv4CIDRs[0].Contains(inVPC) || subnet.Contains(inVPC) {
		t.Fatalf("%v: not in VPC %v outside subnet %v", inVPC, eni.VPCIPv4CIDRs, subnet)
	}
	got, err := w.ns.NL.RouteGet(inVPC.AsSlice())
	if err != nil || len(got) != 1 || got[0].LinkIndex != eth1.Attrs().Index || !got[0].Src.Equal(primary.AsSlice()) {
		t.Errorf("the kernel routes %v via %+v (%v); want eth1 from %v", inVPC, got, err, primary)
	}
	if rep, err := rec.Reconcile(context.Background(), TriggerPoll, false); err != nil || rep.Writes != 0 || len(rep.Changes) != 0 {
		t.Errorf("second reconcile: %v, %d writes, changes %v; want none", err, rep.Writes, rep.Changes)
	}
}
