package main

// This file is the bench's only contact with the production packages'
// internals (agent, netcfg, imds): the in-process pipeline and the
// constants the report quotes. When their APIs change, only this file does.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/dualhomed/dualhomed/agent"
	"github.com/dualhomed/dualhomed/cmd/internal/simworld"
	"github.com/dualhomed/dualhomed/imds"
	"github.com/dualhomed/dualhomed/netcfg"
)

// Production settings the measurements and the report depend on.
const (
	pollInterval   = agent.DefaultPollInterval // the daemon's IMDS poll
	fullReadEvery  = agent.FullReadEvery       // every so many polls read the full snapshot
	imdsPace       = imds.DefaultMaxRequestsPerSecond
	imdsBurst      = imds.DefaultRequestBurst
	imdsMaxAttempt = imds.DefaultMaxAttempts
)

// bucketRefill is how long the IMDS client's default pacing takes to refill
// its whole burst: a daemon polling every 15 s always starts a poll with a
// full bucket, so measurements of one poll wait this long after the last.
var bucketRefill = time.Duration(float64(imdsBurst)/imdsPace*float64(time.Second)) + 100*time.Millisecond

// read is the daemon's trigger a reconcile runs as, which says what it
// reads from IMDS.
type read = agent.Trigger

const (
	readFull = agent.TriggerStart // the full snapshot: start, reload, every fullReadEvery polls
	readPoll = agent.TriggerPoll  // the poll timer's read of what changes while ENIs stay attached
	readNone = agent.TriggerDrift // a netlink event without a new link: the last good snapshot
)

// What the report calls the daemon's full read and its poll.
const (
	fullReadName = "agent.TriggerStart"
	pollReadName = "agent.TriggerPoll"
)

// pipeline is dualhomed's reconcile run in-process: the daemon's own
// agent.Reconciler (IMDS snapshot, Observe, Desired, Diff, Apply) over an
// imds.Client and a netcfg.Kernel working in the instance, with the
// default configuration.
type pipeline struct {
	cfg      agent.Config
	rec      *agent.Reconciler
	kernel   *netcfg.Kernel
	stateDir string
}

// newPipeline builds what a daemon starting on a freshly booted instance has:
// a new client, a new Kernel, an empty state directory. requestsPerSecond is
// the client's IMDS pacing (0: its default, negative: unpaced). The client
// dials from inside the instance, with the settings of its own transport.
func newPipeline(inst *simworld.NS, requestsPerSecond float64) (*pipeline, error) {
	cfg := agent.DefaultConfig()
	cfg.DHCPGrace = 0 // the bench's minimal image runs no DHCP client on secondary ENIs (minimalImage)
	tr := &http.Transport{DialContext: inst.DialContext, ResponseHeaderTimeout: cfg.IMDS.Timeout,
		MaxIdleConnsPerHost: imds.DefaultConcurrency, IdleConnTimeout: 30 * time.Second}
	client, err := imds.New(imds.Options{Endpoint: simworld.IMDSEndpoint, Timeout: cfg.IMDS.Timeout,
		MaxRequestsPerSecond: requestsPerSecond, Transport: tr})
	if err != nil {
		return nil, fmt.Errorf("creating IMDS client: %w", err)
	}
	dir, err := os.MkdirTemp("", "dualhomed-bench-state-*")
	if err != nil {
		return nil, err
	}
	k, err := netcfg.NewKernel(inst.Handle, dir, cfg.Netcfg)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("opening kernel: %w", err)
	}
	return &pipeline{cfg: cfg, rec: agent.NewReconciler(client, k, cfg), kernel: k, stateDir: dir}, nil
}

func (p *pipeline) Close() {
	p.kernel.Close()
	os.RemoveAll(p.stateDir)
}

// reconcileRun is what one reconcile cost.
type reconcileRun struct {
	Total    time.Duration
	IMDS     time.Duration // reading the snapshot (0 when IMDS was not read)
	Writes   int           // netlink and sysctl writes, as counted by Apply
	Requests int           // HTTP requests of the snapshot
}

// reconcile runs one reconcile that reads what r says.
func (p *pipeline) reconcile(ctx context.Context, r read) (reconcileRun, error) {
	start := time.Now()
	rep, err := p.rec.Reconcile(ctx, r, false)
	run := reconcileRun{Total: time.Since(start), IMDS: rep.IMDSLatency, Writes: rep.Writes, Requests: rep.IMDSRequests}
	switch {
	case err != nil:
		return run, err
	case rep.IMDSError != "":
		return run, fmt.Errorf("reading IMDS: %s", rep.IMDSError)
	case rep.ApplyError != "":
		return run, fmt.Errorf("applying %d changes: %s", len(rep.Changes), rep.ApplyError)
	case r == readFull && !rep.Fresh:
		return run, errors.New("the reconcile did not read IMDS")
	case r == readPoll && rep.IMDSRequests == 0:
		return run, errors.New("the poll did not read IMDS")
	}
	return run, nil
}

// breakdown times the steps of a no-op kernel pass one by one (Observe,
// Desired, Diff, Conflicts), to show where the time of a no-op goes.
func (p *pipeline) breakdown() (map[string]time.Duration, error) {
	snap, ok := p.rec.LastGood()
	if !ok {
		return nil, errors.New("no snapshot read yet")
	}
	out := map[string]time.Duration{}
	t := time.Now()
	obs, err := p.kernel.Observe()
	if err != nil {
		return nil, err
	}
	out["Observe (links, addresses, owned routes and rules)"] = time.Since(t)
	t = time.Now()
	desired := netcfg.Desired(snap, obs, p.cfg.Netcfg)
	out["Desired"] = time.Since(t)
	t = time.Now()
	plan := netcfg.Diff(obs.Owned, desired.State)
	out["Diff"] = time.Since(t)
	t = time.Now()
	netcfg.Conflicts(obs, desired.State, p.cfg.Netcfg)
	out["Conflicts"] = time.Since(t)
	if !plan.Empty() {
		return out, fmt.Errorf("the kernel pass is not a no-op: %d changes", len(plan.Ops))
	}
	return out, nil
}
