package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"go.uber.org/zap"

	"github.com/dualhomed/dualhomed/netcfg"
)

// Timing of the daemon loop.
const (
	// debounce coalesces bursts of netlink events (15 links at boot, an
	// address flush) into one reconcile: the reconcile waits until events
	// have been quiet this long, but never more than maxSettle after the
	// first one, so a steady stream of events cannot postpone it forever.
	// The events of a burst come a few milliseconds apart at most (15 veths
	// in about 10 ms), and a hot-attached link waits the whole window: 20 ms
	// keeps bursts in one reconcile and a hot attach well under 50 ms.
	debounce  = 20 * time.Millisecond
	maxSettle = 500 * time.Millisecond
	// maxRepairBackoff caps the delay between repairs when another program
	// keeps deleting our routes or rules.
	maxRepairBackoff = 30 * time.Second
	// calmAfter: a drift-free period this long resets the repair backoff.
	calmAfter = time.Minute
	// warnEvery spaces repeated warnings (repair fights, IMDS down).
	warnEvery = time.Minute
	// snapshotTimeout bounds one IMDS read inside the daemon, well below any
	// watchdog interval.
	snapshotTimeout = 10 * time.Second
	// kernelRetry spaces the reconciles that cannot read the kernel.
	kernelRetry = 5 * time.Second
)

// Options configure a Daemon.
type Options struct {
	ConfigPath string // read again on SIGHUP
	// Config is the loaded configuration in force at start, Override applied.
	Config Config
	// Override is applied to every reloaded configuration (command-line
	// flags win over the file). May be nil.
	Override func(*Config)
	// NS is the network namespace to manage; netns.None() for the current one.
	NS            netns.NsHandle
	Logger        *zap.Logger
	Level         *zap.AtomicLevel                      // changed by reloads when set
	NewSource     func(IMDSConfig) (Snapshotter, error) // builds the IMDS client for a configuration
	Notify        func(state string)                    // sends sd_notify(3) messages; nil: sdNotify
	Version       string
	HandleSignals bool // Run reloads on SIGHUP
}

// Daemon is the long-running service: it reconciles on kernel changes, on
// the IMDS poll timer and on reloads, from a single worker goroutine.
type Daemon struct {
	opts    Options
	log     *zap.Logger
	metrics *Metrics
	kernel  *netcfg.Kernel
	rec     *Reconciler // holds the configuration in force

	pending atomic.Uint32 // trigger bits not yet handled
	idle    atomic.Bool   // the worker waits with nothing pending (for tests)
	blocked atomic.Bool   // some wanted object is held off by a foreign one
	refused atomic.Bool   // some wanted object is one the kernel refused
	kick    chan struct{}

	// Worker state (only touched by the worker goroutine).
	started       time.Time
	ready         bool
	lastStatus    string
	lastSuccess   time.Time
	kernelFailed  bool // the last reconcile could not read the kernel
	lastIMDSWarn  time.Time
	warned        map[string]bool // the last reconcile's warnings (Warning.String)
	repairStreak  int
	lastRepair    time.Time
	repairDelay   time.Duration
	lastRepairLog time.Time
	report        Report
}

// NewDaemon builds a daemon: the IMDS client and the kernel handle for the
// initial configuration, and the host check. Nothing is changed until Run.
func NewDaemon(opts Options) (*Daemon, error) {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.Notify == nil {
		opts.Notify = sdNotify
	}
	cfg := opts.Config
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	source, err := opts.NewSource(cfg.IMDS)
	if err != nil {
		return nil, fmt.Errorf("creating IMDS client: %w", err)
	}
	kernel, err := netcfg.NewKernel(opts.NS, cfg.StateDir, cfg.Netcfg)
	if err != nil {
		return nil, fmt.Errorf("opening netlink: %w", err)
	}
	d := &Daemon{opts: opts, log: opts.Logger, kernel: kernel,
		rec: NewReconciler(source, kernel, cfg), kick: make(chan struct{}, 1)}
	d.rec.IMDSTimeout = snapshotTimeout
	d.rec.HostWarnings = HostWarnings(opts.NS)
	if cfg.Metrics.Listen != "" {
		d.metrics = NewMetrics(kernel.NATCounters)
	}
	return d, nil
}

// reload loads and installs the configuration file again (SIGHUP, worker
// goroutine). A bad file is rejected with an error and the running
// configuration stays in force.
func (d *Daemon) reload() error {
	cfg, err := LoadConfig(d.opts.ConfigPath)
	if err != nil {
		return err
	}
	if d.opts.Override != nil {
		d.opts.Override(&cfg)
	}
	old := d.rec.cfg
	// The numbers that define ownership cannot change under a running
	// daemon: the objects made with the old ones would be orphaned.
	on, nn := old.Netcfg, cfg.Netcfg
	if on.Protocol != nn.Protocol || on.TableBase != nn.TableBase || on.PriorityBase != nn.PriorityBase ||
		on.CardStride != nn.CardStride || old.StateDir != cfg.StateDir {
		return fmt.Errorf("%s: protocol, table_base, priority_base, card_stride and state_dir cannot change on reload: "+
			"stop the daemon, run `dualhomed cleanup` with the old configuration, then start it with the new one", d.opts.ConfigPath)
	}
	source, err := d.opts.NewSource(cfg.IMDS)
	if err != nil {
		return fmt.Errorf("creating IMDS client: %w", err)
	}
	d.rec.Swap(source, cfg)
	d.rec.HostWarnings = HostWarnings(d.opts.NS)
	if d.opts.Level != nil {
		_ = d.opts.Level.UnmarshalText([]byte(cfg.Log.Level)) // the configuration parser rejected bad levels
	}
	if cfg.Metrics != old.Metrics {
		d.log.Warn("metrics settings change on restart only", zap.String("listen", old.Metrics.Listen))
	}
	d.log.Info("configuration reloaded", zap.String("file", d.opts.ConfigPath))
	return nil
}

// trigger records a reason and wakes the worker; never blocks.
func (d *Daemon) trigger(t Trigger) {
	d.pending.Or(uint32(t))
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// Run runs the daemon until ctx is cancelled (SIGTERM), then sends
// STOPPING=1 and returns. Routes and rules stay in place: a restart or an
// upgrade never disturbs traffic.
func (d *Daemon) Run(ctx context.Context) error {
	d.started = time.Now()
	cfg := d.rec.cfg
	d.log.Info("starting", zap.String("version", d.opts.Version), zap.String("config", d.opts.ConfigPath),
		zap.Duration("poll_interval", cfg.PollInterval), zap.String("state_dir", cfg.StateDir))
	defer d.kernel.Close()
	if d.metrics != nil {
		srv, err := d.serveMetrics(cfg.Metrics.Listen)
		if err != nil {
			return err
		}
		defer srv.Close()
	}
	d.kernel.Watch(ctx, func(c netcfg.KernelChange) {
		d.rec.KernelChanged() // every change ends the quiet memo's validity
		if t := triggerFor(c, d.blocked.Load(), d.refused.Load()); t != 0 {
			d.trigger(t)
		}
	}, func(err error, retryIn time.Duration) {
		d.log.Warn("netlink subscription lost; resubscribing", zap.Error(err), zap.Duration("retry_in", retryIn))
	})
	d.rec.KernelChanged() // the feed starts: what came before it is unknown
	var hup chan os.Signal
	if d.opts.HandleSignals {
		hup = make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
	}
	var watchdog <-chan time.Time
	if wd := watchdogInterval(); wd > 0 {
		t := time.NewTicker(wd)
		defer t.Stop()
		watchdog = t.C
		d.opts.Notify("WATCHDOG=1")
	}
	d.opts.Notify("STATUS=starting: reading IMDS")
	d.trigger(TriggerStart)
	d.loop(ctx, hup, watchdog, cfg.StartTimeout)
	d.opts.Notify("STOPPING=1")
	d.log.Info("stopping; routes and rules stay in place")
	return nil
}

// stoppedTimer is a timer that waits for its first Reset.
func stoppedTimer() *time.Timer {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return t
}

// loop is the worker: it gathers triggers into batches and reconciles each,
// until ctx ends.
func (d *Daemon) loop(ctx context.Context, hup <-chan os.Signal, watchdog <-chan time.Time, startTimeout time.Duration) {
	started := time.After(startTimeout)
	poll, retry, settle, grace := stoppedTimer(), stoppedTimer(), stoppedTimer(), stoppedTimer()
	var gathering batch
	for {
		d.idle.Store(!gathering.open && d.pending.Load() == 0)
		select {
		case <-ctx.Done():
			return
		case <-watchdog:
			// Reaching this select is the heartbeat: a reconcile stuck in
			// netlink or IMDS stops the pings and systemd restarts us.
			d.opts.Notify("WATCHDOG=1")
		case <-started:
			if !d.ready {
				d.ready = true
				d.opts.Notify("READY=1\nSTATUS=degraded: no successful reconcile within start_timeout; " + d.statusLine())
				d.log.Warn("start timeout passed without a successful reconcile; reporting ready in degraded mode",
					zap.Duration("start_timeout", startTimeout))
			}
		case <-hup:
			if err := d.reload(); err != nil {
				d.log.Error("reload rejected; keeping the running configuration", zap.Error(err))
			} else {
				d.trigger(TriggerReload)
			}
		case <-d.kick:
			if delay, rearm := gathering.add(time.Now(), Trigger(d.pending.Load()), d.settleDelay); rearm {
				settle.Reset(delay)
			}
		case <-poll.C:
			d.trigger(TriggerPoll)
		case <-retry.C:
			if d.rec.imds.failures > 0 || d.kernelFailed {
				d.trigger(TriggerRetry) // IMDS or the kernel must be read again in full
			} else {
				d.trigger(TriggerRecheck)
			}
		case <-grace.C:
			d.trigger(TriggerGrace)
		case <-settle.C:
			gathering = batch{}
			if t := Trigger(d.pending.Swap(0)); t != 0 {
				err := d.reconcile(ctx, t)
				d.schedule(poll, retry, t, err)
				if next := d.rec.NextGrace(time.Now()); next > 0 {
					grace.Reset(next)
				}
			}
		}
	}
}

// batch gathers the events of one reconcile. Its delay is the debounce
// (events extend it), a repair backoff (a link event cuts it short) or 0.
type batch struct {
	open  bool
	delay time.Duration
	first time.Time
}

// add accounts for an event (the pending triggers r) at now and returns the
// delay to (re)arm the settle timer with, or rearm false to leave it as it
// is. Start and reload fire at once, a link event waits the debounce; any
// other first event opens the batch with settle(): the debounce, or the
// repair backoff. Later events push a debounce deadline back, never beyond
// maxSettle after the first event.
func (b *batch) add(now time.Time, r Trigger, settle func() time.Duration) (delay time.Duration, rearm bool) {
	switch {
	case r&(TriggerStart|TriggerReload) != 0:
		*b = batch{open: true, first: now}
		return 0, true // a reload is never held back by a repair backoff
	case r&promptTriggers != 0 && (!b.open || b.delay > debounce):
		// What the kernel removed with a link is not a fight, and traffic
		// through the link waits for it.
		*b = batch{open: true, delay: debounce, first: now}
		return debounce, true
	case !b.open:
		*b = batch{open: true, delay: settle(), first: now}
		return b.delay, true
	case b.delay == debounce && now.Sub(b.first)+debounce < maxSettle:
		return debounce, true // the burst goes on: wait for quiet
	}
	return 0, false
}

// promptTriggers are never held back by a repair backoff. A link that goes
// down, is renamed or comes up takes its routes with it (the kernel flushes
// the IPv4 routes of a link that goes down, silently): putting them back is
// not a repair against another program, and until it happens replies through
// the ENI are broken. Address events are not among them: a program deleting
// our addresses would otherwise meet a prompt reconcile at each of our own
// re-adds (RTM_NEWADDR), and fight without backoff.
const promptTriggers = TriggerLink

// settleDelay is how long to gather events before reconciling: what is left
// of the repair backoff while another program keeps deleting our objects,
// else the debounce.
func (d *Daemon) settleDelay() time.Duration {
	if left := d.repairDelay - time.Since(d.lastRepair); d.repairDelay > debounce && left > 0 {
		return left
	}
	return debounce
}

// reconcile runs one reconcile and reports it (worker goroutine).
func (d *Daemon) reconcile(ctx context.Context, t Trigger) error {
	if t&(TriggerForeign|TriggerReload|TriggerDrift|TriggerLink|TriggerAddr|TriggerResync) != 0 {
		d.rec.Unblock()
	}
	failing := d.rec.imds.failures
	rep, err := d.rec.Reconcile(ctx, t, false)
	rep.Trigger = t.String()
	if t&promptTriggers != 0 {
		// The kernel removed these objects with a link (down, renamed,
		// flapping): no program is fighting us, so they neither count as
		// repairs nor grow the repair backoff.
		rep.Restored, rep.Repairs = rep.Repairs, 0
	}
	d.blocked.Store(d.rec.Blocked() > 0)
	d.refused.Store(d.rec.Refused())
	d.metrics.Record(rep, err)
	log := d.log.With(zap.Stringer("trigger", t))
	if err != nil {
		log.Error("reconcile failed", zap.Error(err))
		d.writeStatus(rep, err)
		return err
	}
	d.report = rep
	d.logReport(rep, log, failing)
	d.trackRepairs(rep, log)
	if rep.OK() {
		d.lastSuccess = time.Now()
	}
	switch status := d.statusLine(); {
	case !d.ready && rep.OK():
		d.ready, d.lastStatus = true, status
		d.opts.Notify("READY=1\nSTATUS=" + status)
		log.Info("ready", zap.String("status", status))
	case status != d.lastStatus:
		d.lastStatus = status
		d.opts.Notify("STATUS=" + status)
	}
	d.writeStatus(rep, nil)
	return nil
}

// logReport logs what a reconcile changed and what went wrong; failing is
// how many IMDS reads had failed in a row before it.
func (d *Daemon) logReport(rep Report, log *zap.Logger, failing int) {
	if rep.ApplyError != "" {
		log.Error("applying changes failed", zap.String("error", rep.ApplyError), zap.Int("writes", rep.Writes))
	} else {
		for _, c := range rep.Changes {
			log.Info("changed", ChangeFields(c)...)
		}
	}
	if rep.Blocked > 0 { // only after a successful apply
		log.Warn("some objects could not be added: other programs' objects hold their place; leaving them alone until those go",
			zap.Int("blocked", rep.Blocked), zap.Any("objects", rep.BlockedObjects))
	}
	// A warning is logged at warn level when it appears, at debug level
	// while it stays: every reconcile repeats it.
	warned := map[string]bool{}
	for _, w := range rep.Warnings {
		level := zap.DebugLevel
		if !d.warned[w.String()] {
			level = zap.WarnLevel
		}
		warned[w.String()] = true
		fields := []zap.Field{zap.String("eni", w.ENI), zap.String("message", w.Message), zap.String("hint", w.Hint)}
		if len(w.Blocks) > 0 {
			fields = append(fields, zap.Stringers("blocks", w.Blocks))
		}
		if w.Blocked != nil {
			fields = append(fields, zap.String("object", w.Blocked.Object), zap.String("holder", w.Blocked.Holder))
		}
		log.Log(level, "warning", fields...)
	}
	d.warned = warned
	switch {
	case rep.IMDSError != "" && time.Since(d.lastIMDSWarn) >= warnEvery:
		d.lastIMDSWarn = time.Now()
		log.Warn("IMDS unreachable; keeping routes and rules as they are, retrying with backoff",
			zap.String("error", rep.IMDSError), zap.Int("failures", d.rec.imds.failures),
			zap.Duration("retry_in", time.Until(d.rec.imds.retryAt).Round(time.Millisecond)))
	case rep.Fresh && failing > 0:
		log.Info("IMDS reachable again", zap.Int("failures", failing))
		d.lastIMDSWarn = time.Time{}
	}
	log.Debug("reconciled", zap.Duration("duration", rep.Duration), zap.Int("writes", rep.Writes),
		zap.Bool("imds_read", rep.Fresh || rep.IMDSError != ""), zap.String("summary", rep.Summary()))
}

// statusLine is the STATUS= text and status.json's summary.
func (d *Daemon) statusLine() string {
	switch {
	case d.report.Time.IsZero():
		return "waiting for the first reconcile"
	case d.rec.imds.failures > 0 && d.report.IMDSError == "":
		// This reconcile reused the last good snapshot; IMDS is still down.
		return "degraded, IMDS unreachable, keeping routes: " + d.report.Summary()
	}
	return d.report.Summary()
}

// trackRepairs backs off repairs exponentially while drift keeps coming back.
func (d *Daemon) trackRepairs(rep Report, log *zap.Logger) {
	now := time.Now()
	if now.Sub(d.lastRepair) > calmAfter {
		d.repairStreak, d.repairDelay = 0, 0
	}
	if rep.Repairs == 0 {
		return
	}
	d.repairStreak++
	d.lastRepair = now
	if d.repairStreak >= 2 {
		d.repairDelay = min(time.Second<<min(d.repairStreak-2, 10), maxRepairBackoff)
	}
	if d.repairStreak >= 3 && now.Sub(d.lastRepairLog) >= warnEvery {
		d.lastRepairLog = now
		log.Warn("another program keeps removing dualhomed's routes or rules; repairing with backoff",
			zap.Int("repairs_in_a_row", d.repairStreak), zap.Duration("backoff", d.repairDelay),
			zap.String("hint", "see docs: systemd-networkd ManageForeignRoutingPolicyRules=no, ManageForeignRoutes=no"))
	}
}

// schedule arms the poll timer after an IMDS read, and the retry timer for
// a kernel that could not be read and for IMDS (see imdsReads.next).
func (d *Daemon) schedule(poll, retry *time.Timer, t Trigger, err error) {
	d.kernelFailed = err != nil
	if err != nil {
		// The kernel could not be read: try again soon, keep polling.
		retry.Reset(kernelRetry)
	}
	if t.needsIMDS() || d.report.Fresh || d.report.IMDSError != "" {
		iv := d.rec.cfg.PollInterval
		// ±10% jitter spreads a fleet's requests.
		poll.Reset(iv + time.Duration((rand.Float64()*0.2-0.1)*float64(iv)))
	}
	if next := d.rec.imds.next(time.Now()); next > 0 {
		retry.Reset(next)
	}
}

// writeStatus publishes rep in status.json: degraded while the kernel
// cannot be read, an apply fails or IMDS fails, with the first of these
// errors.
func (d *Daemon) writeStatus(rep Report, err error) {
	var unreadable string
	if err != nil {
		unreadable = err.Error()
	}
	lastError := cmp.Or(unreadable, rep.ApplyError, d.rec.imds.lastError)
	h := Health{
		PID: os.Getpid(), Version: d.opts.Version, Started: d.started, Updated: time.Now(),
		Ready: d.ready, Degraded: lastError != "", Summary: d.statusLine(),
		LastSuccess: d.lastSuccess, LastError: lastError, Report: rep,
	}
	if werr := WriteStatus(d.rec.cfg.StateDir, h); werr != nil {
		d.log.Warn("writing status file", zap.Error(werr))
	}
}

func (d *Daemon) serveMetrics(listen string) (*http.Server, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("listening for metrics on %s: %w", listen, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", d.metrics.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics server stopped", zap.Error(err))
		}
	}()
	d.log.Info("serving metrics", zap.String("listen", ln.Addr().String()))
	return srv, nil
}
