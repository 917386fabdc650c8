package agent

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"go.uber.org/zap"

	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/netcfg"
)

// IMDSSource builds the IMDS client for c: c.Endpoint when set, else
// $AWS_EC2_METADATA_SERVICE_ENDPOINT, else http://169.254.169.254.
func IMDSSource(c IMDSConfig) (Snapshotter, error) {
	return imds.New(imds.Options{Endpoint: c.Endpoint, Timeout: c.Timeout})
}

// imdsError turns a failed snapshot of source into the message an operator
// needs, naming the URL source talks to.
func imdsError(source Snapshotter, err error) error {
	endpoint := "the IMDS endpoint"
	if e, ok := source.(interface{ Endpoint() string }); ok {
		endpoint = e.Endpoint()
	}
	if imds.IsUnreachable(err) {
		return fmt.Errorf("IMDS unreachable at %s: is this an EC2 instance? (set --imds-endpoint): %w", endpoint, err)
	}
	return fmt.Errorf("reading IMDS at %s: %w", endpoint, err)
}

// Plan computes what a reconcile would change, changing nothing. An IMDS
// failure is an error: without a snapshot there is nothing to compare.
func Plan(ctx context.Context, rec *Reconciler) (Report, error) {
	rep, err := rec.Reconcile(ctx, TriggerStart, true)
	if err != nil {
		return rep, err
	}
	if rep.IMDSErr != nil {
		return rep, imdsError(rec.imds.source, rep.IMDSErr)
	}
	if slices.ContainsFunc(rep.ENIs, func(e netcfg.ENIStatus) bool { return e.NAT != "" }) {
		c, err := rec.kernel.NATCounters()
		if err != nil {
			return rep, err
		}
		rep.NAT = &c
	}
	return rep, nil
}

// Status prints `dualhomed status` to w, as a table or as JSON: the live
// report (a dry-run reconcile, as Plan) and the daemon's health from
// <stateDir>/status.json. When IMDS cannot be read live and the daemon left
// a report, it prints that report instead, says why and how old it is, and
// returns stale. Its warnings matter most when IMDS fails: a secondary
// ENI's gateway taking over main cuts IMDS off too. The daemon's changes
// were applied, not pending, and what is pending now is unknown: the stale
// report lists none.
func Status(ctx context.Context, w io.Writer, rec *Reconciler, stateDir string, asJSON bool) (stale bool, err error) {
	var health *Health
	h, healthErr := ReadStatus(stateDir)
	if healthErr == nil {
		health = &h
	}
	rep, liveErr := Plan(ctx, rec)
	stale = liveErr != nil && rep.IMDSErr != nil && health != nil && !health.Report.Time.IsZero()
	switch {
	case liveErr != nil && !stale:
		if !asJSON {
			writeDaemonHealth(w, health, healthErr)
		}
		return false, liveErr
	case stale:
		rep = health.Report
		rep.Changes, rep.DryRun = nil, false
	}
	if asJSON {
		return stale, writeStatusJSON(w, rep, liveErr, health, healthErr)
	}
	if stale {
		fmt.Fprintf(w, "status: IMDS could not be read live (%v)\nstatus: showing the daemon's last report instead, from %s (%s ago); pending changes unknown\n",
			liveErr, rep.Time.Format(time.RFC3339), time.Since(rep.Time).Round(time.Second))
	}
	writeStatusTable(w, rep, health, healthErr)
	return stale, nil
}

// Apply reconciles once, logging each change to log; with wait > 0 it
// repeats (every second) until every ENI listed in IMDS has a link and is
// configured, or wait passes. missing lists what is still not configured
// when Apply gives up.
func Apply(ctx context.Context, rec *Reconciler, wait time.Duration, log *zap.Logger) (rep Report, missing []string, err error) {
	deadline := time.Now().Add(wait)
	for {
		rep, err = rec.Reconcile(ctx, TriggerStart, false)
		if err == nil {
			for _, c := range rep.Changes {
				log.Info("changed", ChangeFields(c)...)
			}
			switch {
			case rep.IMDSErr != nil:
				err = imdsError(rec.imds.source, rep.IMDSErr)
			case rep.ApplyError != "":
				err = fmt.Errorf("applying changes: %s", rep.ApplyError)
			}
		}
		if wait <= 0 {
			return rep, nil, err
		}
		missing = notConfigured(rep)
		if err == nil && len(missing) == 0 {
			return rep, nil, nil
		}
		if !time.Now().Add(time.Second).Before(deadline) {
			return rep, missing, err
		}
		select {
		case <-ctx.Done():
			return rep, missing, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// notConfigured lists the ENIs that are not (yet) configured: "eni-... (mac): waiting for link".
func notConfigured(rep Report) []string {
	var out []string
	if rep.IMDSErr != nil || !rep.Fresh {
		return []string{"IMDS has not been read"}
	}
	for _, e := range rep.ENIs {
		switch e.State {
		case netcfg.ENIConfigured, netcfg.ENIPrimaryRole, netcfg.ENIExcluded:
			continue
		}
		out = append(out, fmt.Sprintf("%s (%s): %s", cmp.Or(e.InterfaceID, "eni ?"), e.MAC, e.State))
	}
	return out
}

// WritePlan prints the plan: one change per line in `ip` syntax with its
// ENI, then the warnings, then a one-line verdict.
func WritePlan(w io.Writer, rep Report) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, c := range rep.Changes {
		who := strings.TrimSpace(strings.Join([]string{c.ENI, c.Link}, " "))
		if who != "" {
			who = "(" + who + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\n", c.Text, who)
	}
	tw.Flush()
	var nat []string
	for _, e := range rep.ENIs {
		if e.NAT != "" {
			nat = append(nat, cmp.Or(e.Link, e.MAC)+" "+natRole(rep, e))
		}
	}
	if len(nat) > 0 {
		fmt.Fprintf(w, "NAT (table inet %s): %s\n", netcfg.NATTableName, strings.Join(nat, ", "))
	}
	writeWarnings(w, rep)
	if len(rep.Changes) == 0 {
		fmt.Fprintf(w, "in sync: %s\n", rep.Summary())
	} else {
		fmt.Fprintf(w, "%d changes pending: %s\n", len(rep.Changes), rep.Summary())
	}
}

// ENIView is one ENI in `plan --json` and `status --json`.
type ENIView struct {
	Link        string       `json:"link"` // "" while waiting for the link
	MAC         string       `json:"mac"`
	InterfaceID string       `json:"interface_id"`
	VPCID       string       `json:"vpc_id"`
	MultiVPC    bool         `json:"multi_vpc"`
	Primary     bool         `json:"primary"`
	NetworkCard int          `json:"network_card"`
	Device      int          `json:"device_number"`
	Addresses   []netip.Addr `json:"addresses"`
	Table       int          `json:"table,omitempty"`
	Priority    int          `json:"priority,omitempty"`
	NAT         string       `json:"nat,omitempty"` // source or egress of the shared NAT
	State       string       `json:"state"`
	Warnings    []string     `json:"warnings"`
}

// WarningView is one warning in JSON output.
type WarningView struct {
	ENI     string `json:"eni,omitempty"`
	Message string `json:"message"`
	Hint    string `json:"hint,omitempty"`
	// Blocked names the add of ours and its holder ("cannot add" warnings).
	Blocked *netcfg.Blocked `json:"blocked,omitempty"`
}

// DaemonView is the running daemon's health in `status --json`.
type DaemonView struct {
	PID         int       `json:"pid"`
	Version     string    `json:"version"`
	Running     bool      `json:"running"`
	Started     time.Time `json:"started"`
	Updated     time.Time `json:"updated"`
	Ready       bool      `json:"ready"`
	Degraded    bool      `json:"degraded"`
	Summary     string    `json:"summary"`
	LastSuccess time.Time `json:"last_success"`
	LastError   string    `json:"last_error,omitempty"`
	LastTrigger string    `json:"last_trigger,omitempty"`
	// Blocked lists the adds the daemon holds back because another
	// program's object holds their place (EEXIST), with that holder as the
	// daemon read it back: a one-shot plan cannot learn all of them.
	Blocked []netcfg.Blocked `json:"blocked,omitempty"`
}

// daemonBlocked returns the adds the daemon's last report holds back.
func daemonBlocked(h *Health) []netcfg.Blocked {
	var out []netcfg.Blocked
	for _, w := range h.Report.Warnings {
		if w.Blocked != nil {
			out = append(out, *w.Blocked)
		}
	}
	return out
}

func eniViews(enis []netcfg.ENIStatus) []ENIView {
	out := []ENIView{}
	for _, e := range enis {
		out = append(out, ENIView{Link: e.Link, MAC: e.MAC, InterfaceID: e.InterfaceID, VPCID: e.VPCID, MultiVPC: e.MultiVPC,
			Primary: e.Primary, NetworkCard: e.Card, Device: e.Device, Addresses: append([]netip.Addr{}, e.Addresses...),
			Table: e.Table, Priority: e.Priority, NAT: e.NAT, State: string(e.State), Warnings: append([]string{}, e.Warnings...)})
	}
	return out
}

func warningViews(ws []netcfg.Warning) []WarningView {
	out := []WarningView{}
	for _, w := range ws {
		out = append(out, WarningView{ENI: w.ENI, Message: w.Message, Hint: w.Hint, Blocked: w.Blocked})
	}
	return out
}

// PlanJSON is the output of `dualhomed plan --json`.
type PlanJSON struct {
	InSync   bool          `json:"in_sync"`
	Changes  []Change      `json:"changes"`
	Warnings []WarningView `json:"warnings"`
	ENIs     []ENIView     `json:"enis"`
	Summary  string        `json:"summary"`
}

// WritePlanJSON prints the plan as JSON.
func WritePlanJSON(w io.Writer, rep Report) error {
	return writeJSON(w, PlanJSON{InSync: len(rep.Changes) == 0, Changes: append([]Change{}, rep.Changes...),
		Warnings: warningViews(rep.Warnings), ENIs: eniViews(rep.ENIs), Summary: rep.Summary()})
}

// StatusJSON is the output of `dualhomed status --json`.
type StatusJSON struct {
	Schema   int           `json:"schema"` // StatusSchema
	ENIs     []ENIView     `json:"enis"`
	Warnings []WarningView `json:"warnings"`
	Pending  []Change      `json:"pending_changes"`
	Summary  string        `json:"summary"`
	// NAT holds the NAT's counters when an ENI has a NAT role.
	NAT *netcfg.NATCounters `json:"nat,omitempty"`
	// Live is false when IMDS could not be read live: enis and warnings are
	// then the daemon's last report (of ReportTime), pending_changes empty.
	Live       bool      `json:"live"`
	LiveError  string    `json:"live_error,omitempty"`
	ReportTime time.Time `json:"report_time"`
	// Daemon is the running daemon's health (from status.json), when known.
	Daemon *DaemonView `json:"daemon,omitempty"`
	// DaemonError says why the daemon's health is unknown.
	DaemonError string `json:"daemon_error,omitempty"`
}

// natRole is e's role in the shared NAT, with a source's connections when
// rep has the counters; "" for none.
func natRole(rep Report, e netcfg.ENIStatus) string {
	if rep.NAT != nil && e.NAT == netcfg.NATRoleSource {
		return fmt.Sprintf("%s (connections: %d)", e.NAT, rep.NAT.Connections[e.Link])
	}
	return e.NAT
}

// writeStatusJSON prints the status (live unless liveErr says why not, see
// Status) and the daemon's health as JSON.
func writeStatusJSON(w io.Writer, rep Report, liveErr error, health *Health, healthErr error) error {
	out := StatusJSON{Schema: StatusSchema, ENIs: eniViews(rep.ENIs), Warnings: warningViews(rep.Warnings), Pending: append([]Change{}, rep.Changes...),
		Summary: rep.Summary(), NAT: rep.NAT, Live: liveErr == nil, ReportTime: rep.Time}
	if liveErr != nil {
		out.LiveError = liveErr.Error()
	}
	if health != nil {
		out.Daemon = &DaemonView{PID: health.PID, Version: health.Version, Running: processAlive(health.PID),
			Started: health.Started, Updated: health.Updated, Ready: health.Ready, Degraded: health.Degraded,
			Summary: health.Summary, LastSuccess: health.LastSuccess, LastError: health.LastError,
			LastTrigger: health.Report.Trigger, Blocked: daemonBlocked(health)}
	}
	if healthErr != nil {
		out.DaemonError = healthErr.Error()
	}
	return writeJSON(w, out)
}

// writeStatusTable prints the daemon's health, the per-ENI table and the warnings.
func writeStatusTable(w io.Writer, rep Report, health *Health, healthErr error) {
	writeDaemonHealth(w, health, healthErr)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LINK\tMAC\tENI\tVPC\tCARD/DEV\tADDRESSES\tTABLE\tPRIORITY\tNAT\tSTATE")
	multi := false
	for _, e := range rep.ENIs {
		vpc := cmp.Or(e.VPCID, "-")
		if e.MultiVPC {
			vpc += " *"
			multi = true
		}
		var addrs []string
		for _, a := range e.Addresses {
			addrs = append(addrs, a.String())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%s\t%s\t%s\t%s\t%s\n",
			cmp.Or(e.Link, "-"), e.MAC, cmp.Or(e.InterfaceID, "-"), vpc, e.Card, e.Device,
			cmp.Or(strings.Join(addrs, ","), "-"), zeroDash(e.Table), zeroDash(e.Priority), cmp.Or(natRole(rep, e), "-"), e.State)
	}
	tw.Flush()
	if rep.NAT != nil {
		var drops []string
		for _, reason := range slices.Sorted(maps.Keys(rep.NAT.Dropped)) {
			drops = append(drops, fmt.Sprintf("%s %d", reason, rep.NAT.Dropped[reason]))
		}
		fmt.Fprintf(w, "NAT (table inet %s) dropped packets: %s\n", netcfg.NATTableName, cmp.Or(strings.Join(drops, ", "), "none"))
	}
	if multi {
		fmt.Fprintln(w, "* VPC differs from the primary ENI's (multi-VPC)")
	}
	// Desired's warnings are both the ENI's and the report's: print each once.
	for _, e := range rep.ENIs {
		for _, msg := range e.Warnings {
			if !slices.ContainsFunc(rep.Warnings, func(x netcfg.Warning) bool { return x.ENI == e.Name() && x.Message == msg }) {
				fmt.Fprintf(w, "warning: %s: %s\n", e.Name(), msg)
			}
		}
	}
	writeWarnings(w, rep)
	if len(rep.Changes) > 0 {
		fmt.Fprintf(w, "%d changes pending (see `dualhomed plan`)\n", len(rep.Changes))
	}
}

// writeDaemonHealth prints one line about the running daemon.
func writeDaemonHealth(w io.Writer, h *Health, err error) {
	switch {
	case h == nil && errors.Is(err, os.ErrNotExist):
		fmt.Fprintln(w, "daemon: no status file (is dualhomed.service running?)")
	case h == nil && err != nil:
		fmt.Fprintf(w, "daemon: status unknown: %v\n", err)
	case h != nil:
		state := "healthy"
		switch {
		case h.PID > 0 && !processAlive(h.PID):
			state = "not running (stale status file)"
		case h.Degraded:
			state = "degraded"
		case !h.Ready:
			state = "starting"
		}
		fmt.Fprintf(w, "daemon: %s, pid %d, version %s, updated %s ago: %s\n", state, h.PID, cmp.Or(h.Version, "?"),
			time.Since(h.Updated).Round(time.Second), h.Summary)
		if h.LastError != "" {
			fmt.Fprintf(w, "daemon: last error: %s\n", h.LastError)
		}
		for _, b := range daemonBlocked(h) {
			fmt.Fprintf(w, "daemon: cannot add %s: held by %s\n", b.Object, b.Holder)
		}
	}
}

func processAlive(pid int) bool {
	_, err := os.Stat(filepath.Join("/proc", fmt.Sprint(pid)))
	return err == nil
}

func writeWarnings(w io.Writer, rep Report) {
	ws := append([]netcfg.Warning(nil), rep.Warnings...)
	sort.SliceStable(ws, func(i, j int) bool { return ws[i].ENI < ws[j].ENI })
	for _, x := range ws {
		fmt.Fprintf(w, "warning: %s\n", x.String())
	}
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func zeroDash(n int) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprint(n)
}
