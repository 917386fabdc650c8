package agent

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/dualhomed/dualhomed/netcfg"
)

// Metrics are the daemon's Prometheus metrics, in a private registry so that
// nothing else in the process can add to (or break) the endpoint.
type Metrics struct {
	reg *prometheus.Registry

	reconciles   *prometheus.CounterVec
	duration     prometheus.Histogram
	changes      prometheus.Counter
	repairs      prometheus.Counter
	imdsRequests prometheus.Counter
	imdsErrors   prometheus.Counter
	imdsLatency  prometheus.Histogram
	enis         *prometheus.GaugeVec
	rules        prometheus.Gauge
	routes       prometheus.Gauge
	lastSuccess  prometheus.Gauge
}

// NewMetrics registers every metric in a new private registry; natCounters
// reads the NAT's counters at each scrape (nil: no NAT metrics).
func NewMetrics(natCounters func() (netcfg.NATCounters, error)) *Metrics {
	reg := prometheus.NewRegistry()
	with := promauto.With(reg)
	counter := func(name, help string) prometheus.Counter {
		return with.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	gauge := func(name, help string) prometheus.Gauge {
		return with.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	}
	histogram := func(name, help string) prometheus.Histogram {
		return with.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)})
	}
	m := &Metrics{
		reg: reg,
		reconciles: with.NewCounterVec(prometheus.CounterOpts{
			Name: "dualhomed_reconciles_total",
			Help: "Reconciles run, by result (ok, degraded: IMDS or apply failed, error: kernel unreadable).",
		}, []string{"result"}),
		duration:     histogram("dualhomed_reconcile_duration_seconds", "Time one reconcile took, IMDS read included."),
		changes:      counter("dualhomed_changes_applied_total", "Route, rule, address and rp_filter changes applied."),
		repairs:      counter("dualhomed_drift_repairs_total", "Objects re-added after another program removed them."),
		imdsRequests: counter("dualhomed_imds_requests_total", "HTTP requests made to the instance metadata service (token included)."),
		imdsErrors:   counter("dualhomed_imds_errors_total", "IMDS snapshots that failed (unreachable, throttled, malformed)."),
		imdsLatency:  histogram("dualhomed_imds_snapshot_duration_seconds", "Time to read one complete IMDS snapshot."),
		enis: with.NewGaugeVec(prometheus.GaugeOpts{Name: "dualhomed_enis", Help: "ENIs listed by IMDS, by state."},
			[]string{"state"}),
		rules:       gauge("dualhomed_managed_rules", "Policy rules owned by dualhomed."),
		routes:      gauge("dualhomed_managed_routes", "Routes owned by dualhomed."),
		lastSuccess: gauge("dualhomed_last_successful_reconcile_timestamp_seconds", "Unix time of the last reconcile that read IMDS and applied everything."),
	}
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if natCounters != nil {
		reg.MustRegister(natCollector{natCounters,
			prometheus.NewDesc("dualhomed_nat_connections_total", "Connections the NAT opened, by source link (since its table was last written).", []string{"link"}, nil),
			prometheus.NewDesc("dualhomed_nat_dropped_packets_total", "Packets the NAT dropped, by reason (since its table was last written).", []string{"reason"}, nil)})
	}
	return m
}

// natCollector reads the NAT's counters, which live in its nftables table,
// at each scrape: a reconcile that finds nothing to do does not read them.
type natCollector struct {
	read         func() (netcfg.NATCounters, error)
	conns, drops *prometheus.Desc
}

func (c natCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.conns; ch <- c.drops }

func (c natCollector) Collect(ch chan<- prometheus.Metric) {
	n, err := c.read()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.conns, err)
		return
	}
	for link, v := range n.Connections {
		ch <- prometheus.MustNewConstMetric(c.conns, prometheus.CounterValue, float64(v), link)
	}
	for reason, v := range n.Dropped {
		ch <- prometheus.MustNewConstMetric(c.drops, prometheus.CounterValue, float64(v), reason)
	}
}

// Handler serves the registry in the Prometheus exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// Record accounts for one reconcile.
func (m *Metrics) Record(rep Report, err error) {
	if m == nil {
		return
	}
	m.duration.Observe(rep.Duration.Seconds())
	switch {
	case err != nil:
		m.reconciles.WithLabelValues("error").Inc()
		return
	case rep.IMDSError != "" || rep.ApplyError != "":
		m.reconciles.WithLabelValues("degraded").Inc()
	default:
		m.reconciles.WithLabelValues("ok").Inc()
	}
	m.imdsRequests.Add(float64(rep.IMDSRequests))
	if rep.IMDSError != "" {
		m.imdsErrors.Inc()
	}
	if rep.IMDSRequests > 0 || rep.IMDSError != "" {
		m.imdsLatency.Observe(rep.IMDSLatency.Seconds())
	}
	if rep.ApplyError == "" {
		m.changes.Add(float64(len(rep.Changes)))
	}
	m.repairs.Add(float64(rep.Repairs))
	if rep.HaveSnapshot { // without any snapshot nothing is known about ENIs
		m.enis.Reset()
		for _, s := range netcfg.ENIStates {
			m.enis.WithLabelValues(string(s)).Set(0)
		}
		for _, e := range rep.ENIs {
			m.enis.WithLabelValues(string(e.State)).Inc()
		}
	}
	m.rules.Set(float64(rep.ManagedRules))
	m.routes.Set(float64(rep.ManagedRoutes))
	if rep.OK() {
		m.lastSuccess.Set(float64(rep.Time.Add(rep.Duration).Unix()))
	}
}
