package agent

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
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
	// warnEvery limits repeated warnings (repair fights, IMDS down) to one
	// per minute.
	warnEvery = time.Minute
	// maxLinkRetries bounds the quick IMDS re-reads for a link IMDS does not
	// know yet (0.5 s, 1 s, 2 s, 4 s, 8 s); after that the poll timer takes over.
	maxLinkRetries = 5
	firstLinkRetry = 500 * time.Millisecond
	// maxIMDSBackoff caps the retry delay while IMDS is unreachable (the poll
	// interval caps it too).
	maxIMDSBackoff = 30 * time.Second
	// snapshotTimeout bounds one IMDS read inside the daemon, well below any
	// watchdog interval.
	snapshotTimeout = 10 * time.Second
	// minLinkReadGap spaces the IMDS reads caused by new links: on a host
	// where containers come and go, each new veth would otherwise cost a
	// read (a MAC listing, see RefreshIfNewLinks). A hot-attached ENI waits
	// at most this long for its read.
	minLinkReadGap = time.Second
	// kernelRetry is the delay before retrying a reconcile that could not
	// read the kernel's state.
	kernelRetry = 5 * time.Second
)

// KernelFactory builds a Kernel for a namespace, state directory and config.
type KernelFactory func(ns netns.NsHandle, stateDir string, cfg netcfg.Config) (Kernel, error)

// SourceFactory builds the IMDS client for a configuration.
type SourceFactory func(IMDSConfig) (Snapshotter, error)

// NetcfgKernel is the production KernelFactory.
func NetcfgKernel(ns netns.NsHandle, stateDir string, cfg netcfg.Config) (Kernel, error) {
	k, err := netcfg.NewKernel(ns, stateDir, cfg)
	if err != nil {
		return nil, err
	}
	return k, nil
}

// Options configure a Daemon.
type Options struct {
	// ConfigPath is re-read by Reload.
	ConfigPath string
	// Config is the configuration in force at start (already loaded).
	Config Config
	// Override is applied to every loaded configuration (command-line flags
	// win over the file, also after a reload). May be nil.
	Override func(*Config)
	// NS is the network namespace to manage; netns.None() for the current one.
	NS        netns.NsHandle
	Logger    *zap.Logger
	Level     *zap.AtomicLevel // changed by reloads when set
	NewSource SourceFactory
	NewKernel KernelFactory // nil: NetcfgKernel
	Notifier  Notifier      // nil: SystemdNotifier
	Version   string
	// HandleSignals makes Run reload on SIGHUP.
	HandleSignals bool
}

// Daemon is the long-running service: it reconciles on netlink events, on the
// IMDS poll timer and on reloads, from a single worker goroutine.
type Daemon struct {
	opts     Options
	log      *zap.Logger
	notifier Notifier
	metrics  *Metrics

	mu       sync.Mutex // guards cfg, source, kernel between Reload and the worker
	cfg      Config
	protocol atomic.Uint32
	rec      *Reconciler
	kernel   Kernel

	pending atomic.Uint32 // reason bits not yet handled
	idle    atomic.Bool   // the worker waits with nothing pending (for tests)
	runs    atomic.Int64  // reconciles run so far (for tests: proves coalescing)
	blocked atomic.Bool   // some wanted object is held off by a foreign one
	kick    chan struct{}
	reload  chan chan error

	// Worker state (only touched by the worker goroutine).
	started       time.Time
	ready         bool
	lastStatus    string
	lastSuccess   time.Time
	lastRead      time.Time // last IMDS read, successful or not
	readDeferred  bool      // a new link's IMDS read waits for minLinkReadGap
	kernelFailed  bool      // the last reconcile could not read the kernel
	imdsFailures  int
	imdsLastError string
	imdsRetryAt   time.Time
	lastIMDSWarn  time.Time
	linkRetries   map[int]int
	repairStreak  int
	lastRepair    time.Time
	repairDelay   time.Duration
	lastRepairLog time.Time
	report        Report
}

// NewDaemon builds a daemon: the IMDS client and the kernel handle for the
// initial configuration. Nothing is changed until Run.
func NewDaemon(opts Options) (*Daemon, error) {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.NewKernel == nil {
		opts.NewKernel = NetcfgKernel
	}
	if opts.Notifier == nil {
		opts.Notifier = SystemdNotifier{}
	}
	if opts.NewSource == nil {
		return nil, errors.New("no IMDS client factory")
	}
	cfg := opts.Config
	if opts.Override != nil {
		opts.Override(&cfg)
	}
	d := &Daemon{
		opts:        opts,
		log:         opts.Logger,
		notifier:    opts.Notifier,
		cfg:         cfg,
		kick:        make(chan struct{}, 1),
		reload:      make(chan chan error),
		linkRetries: map[int]int{},
	}
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	source, err := opts.NewSource(cfg.IMDS)
	if err != nil {
		return nil, fmt.Errorf("creating IMDS client: %w", err)
	}
	kernel, err := opts.NewKernel(opts.NS, cfg.StateDir, cfg.Netcfg)
	if err != nil {
		return nil, fmt.Errorf("opening netlink: %w", err)
	}
	d.kernel = kernel
	d.rec = NewReconciler(source, kernel, cfg)
	d.rec.IMDSTimeout = snapshotTimeout
	d.protocol.Store(uint32(cfg.Netcfg.Protocol))
	if cfg.Metrics.Listen != "" {
		d.metrics = NewMetrics()
	}
	return d, nil
}

// Config returns the configuration in force.
func (d *Daemon) Config() Config {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cfg
}

// Reload re-reads the configuration file. A bad file is rejected with an
// error and the running configuration stays in force. While Run is active the
// reload happens on the worker goroutine, followed by a reconcile.
func (d *Daemon) Reload(ctx context.Context) error {
	reply := make(chan error, 1)
	select {
	case d.reload <- reply:
		select {
		case err := <-reply:
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	case <-ctx.Done():
		return ctx.Err()
	}
}

// doReload loads and installs the new configuration (worker goroutine).
func (d *Daemon) doReload() error {
	cfg, err := LoadConfig(d.opts.ConfigPath)
	if err != nil {
		return err
	}
	if d.opts.Override != nil {
		d.opts.Override(&cfg)
	}
	old := d.Config()
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
	kernel, err := d.opts.NewKernel(d.opts.NS, cfg.StateDir, cfg.Netcfg)
	if err != nil {
		return fmt.Errorf("opening netlink: %w", err)
	}
	if c, ok := d.kernel.(interface{ Close() }); ok {
		c.Close()
	}
	d.mu.Lock()
	d.cfg, d.kernel = cfg, kernel
	d.mu.Unlock()
	d.rec.Swap(source, kernel, cfg)
	if d.opts.Level != nil {
		UpdateLevel(*d.opts.Level, cfg.Log.Level)
	}
	if cfg.Metrics != old.Metrics {
		d.log.Warn("metrics settings change on restart only", zap.String("listen", old.Metrics.Listen))
	}
	d.log.Info("configuration reloaded", zap.String("file", d.opts.ConfigPath))
	return nil
}

// trigger records a reason and wakes the worker; never blocks.
func (d *Daemon) trigger(r reason) {
	for {
		old := d.pending.Load()
		if d.pending.CompareAndSwap(old, old|uint32(r)) {
			break
		}
	}
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
	cfg := d.Config()
	d.log.Info("starting", zap.String("version", d.opts.Version), zap.String("config", d.opts.ConfigPath),
		zap.Duration("poll_interval", cfg.PollInterval), zap.String("state_dir", cfg.StateDir))
	defer func() {
		if c, ok := d.kernel.(interface{ Close() }); ok {
			c.Close()
		}
	}()

	if d.metrics != nil {
		srv, err := d.serveMetrics(cfg.Metrics.Listen)
		if err != nil {
			return err
		}
		defer srv.Close()
	}

	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	w := &watcher{ns: d.opts.NS, protocol: &d.protocol, blocked: &d.blocked, log: d.log, trigger: d.trigger}
	w.run(wctx)

	var hup chan os.Signal
	if d.opts.HandleSignals {
		hup = make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
	}

	wd := watchdogInterval()
	var wdTick <-chan time.Time
	if wd > 0 {
		t := time.NewTicker(wd)
		defer t.Stop()
		wdTick = t.C
		d.notifier.Notify("WATCHDOG=1")
	}
	startTimeout := time.NewTimer(cfg.StartTimeout)
	defer startTimeout.Stop()
	poll := time.NewTimer(time.Hour)
	poll.Stop()
	defer poll.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	defer settle.Stop()
	var gathering batch

	d.notifier.Notify("STATUS=starting: reading IMDS")
	d.trigger(reasonStart)

	for {
		d.idle.Store(!gathering.open && d.pending.Load() == 0)
		select {
		case <-ctx.Done():
			d.notifier.Notify("STOPPING=1")
			d.log.Info("stopping; routes and rules stay in place")
			return nil

		case <-wdTick:
			// Reaching this select is the heartbeat: a reconcile stuck in
			// netlink or IMDS stops the pings and systemd restarts us.
			d.notifier.Notify("WATCHDOG=1")

		case <-startTimeout.C:
			if !d.ready {
				d.ready = true
				d.notifier.Notify("READY=1\nSTATUS=degraded: no successful reconcile within start_timeout; " + d.statusLine())
				d.log.Warn("start timeout passed without a successful reconcile; reporting ready in degraded mode",
					zap.Duration("start_timeout", cfg.StartTimeout))
			}

		case <-hup:
			if err := d.doReload(); err != nil {
				d.log.Error("reload rejected; keeping the running configuration", zap.Error(err))
			} else {
				d.trigger(reasonReload)
			}

		case reply := <-d.reload:
			err := d.doReload()
			if err != nil {
				d.log.Error("reload rejected; keeping the running configuration", zap.Error(err))
			} else {
				d.trigger(reasonReload)
			}
			reply <- err

		case <-d.kick:
			r := reason(d.pending.Load())
			if delay, rearm := gathering.add(time.Now(), r, d.settleDelay); rearm {
				settle.Reset(delay)
			}

		case <-poll.C:
			d.trigger(reasonPoll)

		case <-retry.C:
			if d.imdsFailures > 0 || d.kernelFailed {
				d.trigger(reasonRetry) // IMDS or the kernel must be read again in full
			} else {
				d.trigger(reasonRecheck)
			}

		case <-settle.C:
			gathering = batch{}
			r := reason(d.pending.Swap(0))
			if r == 0 {
				continue
			}
			d.runs.Add(1)
			err := d.reconcile(ctx, r)
			d.schedule(poll, retry, r, err)
		}
	}
}

// batch gathers the events of one reconcile.
type batch struct {
	open    bool
	sliding bool // the delay is the debounce (not a repair backoff): events extend it
	held    bool // the delay is a repair backoff: a link event cuts it short
	first   time.Time
}

// add accounts for an event (the pending reasons r) at now and returns the
// delay to (re)arm the settle timer with, or rearm false to leave it as it
// is. The first event opens the batch with delayFor(r): the debounce, or
// the repair backoff. Later events push a debounce deadline back, never
// beyond maxSettle after the first event; start and reload fire at once; a
// link event turns a repair backoff into the debounce.
func (b *batch) add(now time.Time, r reason, delayFor func(reason) time.Duration) (delay time.Duration, rearm bool) {
	switch {
	case !b.open:
		delay = delayFor(r)
		*b = batch{open: true, sliding: delay == debounce, held: delay > debounce, first: now}
		return delay, true
	case r&(reasonStart|reasonReload) != 0:
		return 0, true // a reload is never held back by a repair backoff
	case b.held && r&promptReasons != 0:
		// A link changed while a repair backoff holds the batch: what the
		// kernel removed with the link is not a fight, and traffic through
		// the link waits for it.
		*b = batch{open: true, sliding: true, first: now}
		return debounce, true
	case b.sliding && now.Sub(b.first)+debounce < maxSettle:
		return debounce, true // the burst goes on: wait for quiet
	}
	return 0, false
}

// promptReasons are never held back by a repair backoff. A link that goes
// down, is renamed or comes up takes its routes with it (the kernel flushes
// the IPv4 routes of a link that goes down, silently): putting them back is
// not a repair against another program, and until it happens replies through
// the ENI are broken. Address events are not among them: a program deleting
// our addresses would otherwise meet a prompt reconcile at each of our own
// re-adds (RTM_NEWADDR), and fight without backoff.
const promptReasons = reasonLink

// settleDelay is how long to gather events before reconciling: the debounce,
// or the repair backoff while another program keeps deleting our objects
// (never for a link change, see promptReasons).
func (d *Daemon) settleDelay(r reason) time.Duration {
	if r&(reasonStart|reasonReload) != 0 {
		return 0
	}
	if r&promptReasons != 0 {
		return debounce
	}
	if d.repairDelay > debounce && time.Since(d.lastRepair) < d.repairDelay {
		return d.repairDelay - time.Since(d.lastRepair)
	}
	return debounce
}

// reconcile runs one reconcile and reports it (worker goroutine).
func (d *Daemon) reconcile(ctx context.Context, r reason) error {
	if r&(reasonForeign|reasonReload|reasonDrift|reasonLink|reasonAddr|reasonResync) != 0 {
		d.rec.Unblock()
	}
	refresh := RefreshIfNewLinks
	gapped := false
	switch {
	case r&reasonPoll != 0 && r&(reasonStart|reasonRetry|reasonReload) == 0:
		refresh = RefreshPoll // what changes while ENIs stay attached; in full now and then
	case r.needsIMDS():
		refresh = RefreshAlways
	case time.Now().Before(d.imdsRetryAt):
		refresh = RefreshNever // IMDS is backing off: repair from the last good snapshot
	case r&reasonRecheck != 0:
		refresh = RefreshPendingLinks // its own schedule spaces it
	case time.Since(d.lastRead) < minLinkReadGap:
		refresh, gapped = RefreshNever, true
	}
	rep, err := d.rec.Reconcile(ctx, refresh, false)
	if rep.Fresh || rep.Listed || rep.IMDSError != "" {
		d.lastRead, d.readDeferred = time.Now(), false
	} else if gapped && rep.NewLinks {
		d.readDeferred = true // schedule reads it at lastRead+minLinkReadGap
	}
	rep.Trigger = r.String()
	if r&promptReasons != 0 {
		// The kernel removed these objects with a link (down, renamed,
		// flapping): no program is fighting us, so they neither count as
		// repairs nor grow the repair backoff.
		rep.Restored, rep.Repairs = rep.Repairs, 0
	}
	d.blocked.Store(d.rec.Blocked() > 0)
	d.metrics.Record(rep, err)
	log := d.log.With(zap.Stringer("trigger", r))
	if err != nil {
		log.Error("reconcile failed", zap.Error(err))
		d.writeStatus(rep, err)
		return err
	}
	d.report = rep
	for _, c := range rep.Changes {
		if rep.ApplyError != "" {
			break
		}
		log.Info("changed", zap.String("eni", c.ENI), zap.String("link", c.Link), zap.String("op", c.String()))
	}
	if rep.Blocked > 0 {
		log.Warn("some objects could not be added: other programs' objects hold their place; leaving them alone until those go",
			zap.Int("blocked", rep.Blocked))
	}
	if rep.ApplyError != "" {
		log.Error("applying changes failed", zap.String("error", rep.ApplyError), zap.Int("writes", rep.Writes))
	}
	for _, w := range rep.Warnings {
		log.Debug("warning", zap.String("eni", w.ENI), zap.String("message", w.Message), zap.String("hint", w.Hint))
	}
	d.trackIMDS(rep, log)
	d.trackRepairs(rep, log)
	d.trackLinks(rep)
	if rep.OK() {
		d.lastSuccess = time.Now()
	}
	log.Debug("reconciled", zap.Duration("duration", rep.Duration), zap.Int("writes", rep.Writes),
		zap.Bool("imds_read", rep.Fresh || rep.IMDSError != ""), zap.String("summary", rep.Summary()))

	status := d.statusLine()
	if !d.ready && rep.OK() {
		d.ready = true
		d.notifier.Notify("READY=1\nSTATUS=" + status)
		d.lastStatus = status
		log.Info("ready", zap.String("status", status))
	} else if status != d.lastStatus {
		d.notifier.Notify("STATUS=" + status)
		d.lastStatus = status
	}
	d.writeStatus(rep, nil)
	return nil
}

func (d *Daemon) statusLine() string {
	if d.report.Time.IsZero() {
		return "waiting for the first reconcile"
	}
	s := d.report.Summary()
	if d.imdsFailures > 0 && d.report.IMDSError == "" {
		// This reconcile reused the last good snapshot; IMDS is still down.
		s = "degraded, IMDS unreachable, keeping routes: " + s
	}
	return s
}

func (d *Daemon) trackIMDS(rep Report, log *zap.Logger) {
	switch {
	case rep.IMDSError != "":
		d.imdsFailures++
		d.imdsLastError = rep.IMDSError
		backoff := time.Second << min(d.imdsFailures-1, 10)
		backoff = min(backoff, maxIMDSBackoff, d.Config().PollInterval)
		d.imdsRetryAt = time.Now().Add(backoff)
		if time.Since(d.lastIMDSWarn) >= warnEvery {
			d.lastIMDSWarn = time.Now()
			log.Warn("IMDS unreachable; keeping routes and rules as they are, retrying with backoff",
				zap.String("error", rep.IMDSError), zap.Int("failures", d.imdsFailures), zap.Duration("retry_in", backoff))
		}
	case rep.Fresh:
		if d.imdsFailures > 0 {
			log.Info("IMDS reachable again", zap.Int("failures", d.imdsFailures))
		}
		d.imdsFailures = 0
		d.imdsRetryAt = time.Time{}
		d.lastIMDSWarn = time.Time{}
	}
}

// trackRepairs backs off repairs exponentially while drift keeps coming back.
func (d *Daemon) trackRepairs(rep Report, log *zap.Logger) {
	now := time.Now()
	if rep.Repairs == 0 {
		if d.repairStreak > 0 && now.Sub(d.lastRepair) > calmAfter {
			d.repairStreak, d.repairDelay = 0, 0
		}
		return
	}
	if now.Sub(d.lastRepair) > calmAfter {
		d.repairStreak = 0
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

// trackLinks counts quick IMDS re-reads per link that IMDS does not know yet.
func (d *Daemon) trackLinks(rep Report) {
	now := map[int]bool{}
	for _, l := range rep.PendingLinks {
		now[l.Index] = true
	}
	for idx := range d.linkRetries {
		if !now[idx] {
			delete(d.linkRetries, idx)
		}
	}
	if !rep.Fresh && !rep.Listed {
		return
	}
	for idx := range now {
		d.linkRetries[idx]++
	}
}

// schedule arms the poll timer after an IMDS read and the retry timer for
// IMDS backoff and for links IMDS does not know yet.
func (d *Daemon) schedule(poll, retry *time.Timer, r reason, err error) {
	d.kernelFailed = err != nil
	if err != nil {
		// The kernel could not be read: try again soon, keep polling.
		retry.Reset(kernelRetry)
	}
	if r.needsIMDS() || d.report.Fresh || d.report.IMDSError != "" {
		iv := d.Config().PollInterval
		// ±10% jitter spreads a fleet's requests.
		poll.Reset(iv + time.Duration((rand.Float64()*0.2-0.1)*float64(iv)))
	}
	var next time.Duration
	if !d.imdsRetryAt.IsZero() {
		next = max(time.Until(d.imdsRetryAt), 0)
	}
	fewest := -1
	for _, n := range d.linkRetries {
		if n <= maxLinkRetries-1 && (fewest < 0 || n < fewest) {
			fewest = n
		}
	}
	if fewest >= 1 {
		delay := firstLinkRetry << (fewest - 1)
		if next == 0 || delay < next {
			next = delay
		}
	}
	if d.readDeferred {
		delay := max(time.Until(d.lastRead.Add(minLinkReadGap)), time.Millisecond)
		if next == 0 || delay < next {
			next = delay
		}
	}
	if next > 0 {
		retry.Reset(next)
	}
}

func (d *Daemon) writeStatus(rep Report, err error) {
	cfg := d.Config()
	h := Health{
		PID: os.Getpid(), Version: d.opts.Version, Started: d.started, Updated: time.Now(),
		Ready: d.ready, Degraded: err != nil || d.imdsFailures > 0 || rep.ApplyError != "",
		Summary: d.statusLine(), LastSuccess: d.lastSuccess, Report: rep,
	}
	switch {
	case err != nil:
		h.LastError = err.Error()
	case rep.ApplyError != "":
		h.LastError = rep.ApplyError
	case d.imdsFailures > 0:
		h.LastError = d.imdsLastError
	}
	if werr := WriteStatus(cfg.StateDir, h); werr != nil {
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
