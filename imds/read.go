package imds

import (
	"context"
	"errors"
	"net/http"
	"net/netip"
	"slices"
	"sync/atomic"
)

const macsPath = "network/interfaces/macs/"

// eniKey is one key under macs/<mac>/ that dualhomed reads, and how its
// value lands in the ENI. Keys not in this table (local-hostname,
// security-group-ids, ...) are never fetched.
type eniKey struct {
	name string
	// dynamic keys change while an ENI stays attached: private IPv4 and
	// IPv6 addresses and delegated prefixes are assigned and unassigned, and
	// CIDR blocks are associated with the VPC and the subnet. The others
	// are fixed for the life of an attachment.
	dynamic bool
	apply   func(e *ENI, body string) error
}

// eniKeys lists the keys in the order they are fetched and parsed; the order
// makes requests and errors deterministic.
var eniKeys = []eniKey{
	{"device-number", false, func(e *ENI, b string) (err error) { e.DeviceNumber, err = parseDeviceNumber(b); return }},
	{"network-card", false, func(e *ENI, b string) (err error) { e.NetworkCard, err = parseDeviceNumber(b); return }},
	{"interface-id", false, func(e *ENI, b string) (err error) { e.InterfaceID, err = parseID(b, "eni-"); return }},
	{"subnet-id", false, func(e *ENI, b string) (err error) { e.SubnetID, err = parseID(b, "subnet-"); return }},
	{"vpc-id", false, func(e *ENI, b string) (err error) { e.VPCID, err = parseID(b, "vpc-"); return }},
	{"owner-id", false, func(e *ENI, b string) (err error) { e.OwnerID, err = parseOwnerID(b); return }},
	{"subnet-ipv4-cidr-block", false, func(e *ENI, b string) (err error) { e.SubnetIPv4CIDR, err = parseIPv4Prefix(b); return }},
	{"subnet-ipv6-cidr-blocks", true, func(e *ENI, b string) (err error) { e.SubnetIPv6CIDRs, err = parsePrefixList(b, 6); return }},
	{"vpc-ipv4-cidr-blocks", true, func(e *ENI, b string) (err error) { e.VPCIPv4CIDRs, err = parsePrefixList(b, 4); return }},
	// Older IMDS versions list only the single (primary) VPC CIDR; it is
	// fetched only when vpc-ipv4-cidr-blocks is not listed.
	{"vpc-ipv4-cidr-block", true, func(e *ENI, b string) error {
		p, err := parseIPv4Prefix(b)
		e.VPCIPv4CIDRs = []netip.Prefix{p}
		return err
	}},
	{"vpc-ipv6-cidr-blocks", true, func(e *ENI, b string) (err error) { e.VPCIPv6CIDRs, err = parsePrefixList(b, 6); return }},
	{"local-ipv4s", true, func(e *ENI, b string) (err error) { e.LocalIPv4s, err = parseIPv4List(b); return }},
	{"ipv6s", true, func(e *ENI, b string) (err error) { e.IPv6s, err = parseIPv6List(b); return }},
	{"ipv4-prefix", true, func(e *ENI, b string) (err error) { e.IPv4Prefixes, err = parsePrefixList(b, 4); return }},
	{"ipv6-prefix", true, func(e *ENI, b string) (err error) { e.IPv6Prefixes, err = parsePrefixList(b, 6); return }},
}

// Snapshot reads the primary MAC, the list of MACs, and for each MAC its
// directory listing and then only the listed keys that dualhomed uses (an
// absent optional key costs no request).
//
// It returns a *KeyError naming the key (and the value, when it did not
// parse) if any read fails after retries or any value does not parse; it
// never returns a partial snapshot. A MAC that IMDS is still catching up on
// is not an error: its ENI has Ready=false and a reason when its listing is
// empty or 404 (seen right after a hot attach); device-number is not listed,
// or is 0 on card 0 of a secondary MAC; network-card is not listed on a
// secondary MAC of a multi-card instance (in these three cases DeviceNumber
// is DeviceNumberUnknown, never 0); interface-id is not listed, or neither
// local-ipv4s nor ipv6s is; or local-ipv4s (ipv6s) is listed without
// subnet-ipv4-cidr-block (subnet-ipv6-cidr-blocks): no gateway to derive.
func (c *Client) Snapshot(ctx context.Context) (Snapshot, error) {
	return c.Refresh(ctx, Snapshot{}, Update{})
}

// read runs one of the client's reads (Snapshot, Refresh, ListMACs) and
// returns what it cost in requests. A read that follows a failed one first
// waits for a retry token, so callers that simply call again are paced; the
// caller's cancellation says nothing about IMDS and leaves that state as is.
func (c *Client) read(ctx context.Context, fn func(ctx context.Context) error) (requests int, err error) {
	if c.lastFailed.Load() {
		if err := c.retries.wait(ctx); err != nil {
			return 0, err
		}
	}
	var count atomic.Int64
	err = fn(context.WithValue(ctx, snapshotCounterKey{}, &count))
	if ctx.Err() == nil {
		c.lastFailed.Store(err != nil)
	}
	return int(count.Load()), err
}

// ListMACs reads only meta-data/network/interfaces/macs/ and returns the
// listed MACs, lower case and sorted, with the number of HTTP requests the
// call cost (1 once the token is cached). A link IMDS may not know (every
// container veth on a busy host) then costs one request instead of a full
// Snapshot (212 on a 15-ENI instance with 100 addresses and 4 prefixes per
// ENI): IMDS shares the link-local budget of 1024 packets/s per ENI with DNS
// and NTP. Errors, retries, pacing and counting are Snapshot's: a failure is
// a *KeyError, never a partial or empty list.
func (c *Client) ListMACs(ctx context.Context) (macs []string, requests int, err error) {
	requests, err = c.read(ctx, func(ctx context.Context) (err error) {
		macs, err = getParsed(ctx, c, macsPath, parseMACList)
		return err
	})
	slices.Sort(macs) // nil after a failure
	return macs, requests, err
}

// withoutDynamic returns e with the values of its dynamic keys cleared, as
// before they are read again.
func withoutDynamic(e ENI) ENI {
	e.SubnetIPv6CIDRs, e.VPCIPv4CIDRs, e.VPCIPv6CIDRs = nil, nil, nil
	e.LocalIPv4s, e.IPv6s, e.IPv4Prefixes, e.IPv6Prefixes = nil, nil, nil, nil
	return e
}

// Update says what Refresh reads again.
type Update struct {
	// MACs is the MAC listing the caller has just read (ListMACs); nil
	// reads it.
	MACs []string
	// Full names MACs to read in full even though the previous snapshot
	// has them ready: their link is new (an ENI detached and attached again
	// may come back with another device number).
	Full []string
	// Dynamic re-reads the dynamic keys (addresses, prefixes, CIDR blocks)
	// of the other MACs the previous snapshot has ready; false keeps their
	// values (a hot attach, where only the new ENI is news).
	Dynamic bool
}

// Refresh reads IMDS again at a fraction of Snapshot's cost, building on
// prev, a complete snapshot this client (or another) read earlier. The MAC
// listing (unless u.MACs gives it) is read again and is authoritative:
// ENIs it no longer names are gone from the result. A MAC that prev lacks,
// has not ready, or u.Full names is read in full, as Snapshot reads it; the
// others get only their dynamic keys read again (u.Dynamic) or are kept as
// prev has them. On that 15-ENI instance a poll costs 121 requests instead
// of 212, and a hot attach 14 after the MAC listing.
//
// The guarantees are Snapshot's: an error (a *KeyError) rather than a
// partial result, and readiness judged on the fresh listing of every MAC
// read. prev without a primary MAC makes Refresh a Snapshot.
func (c *Client) Refresh(ctx context.Context, prev Snapshot, u Update) (Snapshot, error) {
	if prev.PrimaryMAC == "" {
		u = Update{}
	}
	var snap Snapshot
	n, err := c.read(ctx, func(ctx context.Context) (err error) {
		snap, err = c.readENIs(ctx, prev, u)
		return err
	})
	if err == nil {
		snap.Requests = n
	}
	return snap, err // the zero Snapshot after a failure
}

// readENIs reads the primary MAC and the MAC listing unless prev and u
// give them, and each MAC's keys as Refresh says.
func (c *Client) readENIs(ctx context.Context, prev Snapshot, u Update) (Snapshot, error) {
	primary, macs := prev.PrimaryMAC, slices.Clone(u.MACs)
	var err error
	if primary == "" {
		if primary, err = getParsed(ctx, c, "mac", parsePrimaryMAC); err != nil {
			return Snapshot{}, err
		}
	}
	if macs == nil {
		if macs, err = getParsed(ctx, c, macsPath, parseMACList); err != nil {
			return Snapshot{}, err
		}
	}
	if !slices.Contains(macs, primary) {
		// IMDS contradicts itself; wait for it to settle rather than guess.
		return Snapshot{}, &KeyError{Key: "meta-data/" + macsPath, Err: invalid(primary, "(meta-data/mac) is not listed")}
	}
	slices.Sort(macs)
	enis := make([]ENI, len(macs))
	reads := make([]eniRead, 0, len(macs))
	for i, mac := range macs {
		r := eniRead{eni: &enis[i]}
		switch old, ok := prev.ENI(mac); {
		case !ok || !old.Ready || slices.Contains(u.Full, mac):
		case u.Dynamic:
			enis[i], r.dynamic = withoutDynamic(old), true
		default:
			enis[i] = old // kept as prev has it
			continue
		}
		enis[i].MAC, enis[i].Ready, enis[i].NotReadyReason = mac, true, ""
		reads = append(reads, r)
	}
	if err := c.forEach(ctx, len(reads), func(ctx context.Context, j int) error { return c.listKeys(ctx, &reads[j]) }); err != nil {
		return Snapshot{}, err
	}
	if err := c.fetchKeys(ctx, reads); err != nil {
		return Snapshot{}, err
	}
	snap := Snapshot{PrimaryMAC: primary, ENIs: enis, MultiCard: prev.MultiCard}
	for _, r := range reads {
		snap.MultiCard = snap.MultiCard || r.listed["network-card"]
	}
	for _, r := range reads {
		checkReady(r.eni, r.listed, snap)
	}
	return snap, nil
}

// eniRead is one MAC's read: its listing, and the keys dualhomed uses
// that it reads now (of those listed, only the dynamic ones, or all).
type eniRead struct {
	eni     *ENI
	dynamic bool
	listed  map[string]bool
	fetch   []eniKey
}

// listKeys reads the MAC's key listing and decides which keys to fetch.
func (c *Client) listKeys(ctx context.Context, r *eniRead) error {
	listed, err := getParsed(ctx, c, macsPath+r.eni.MAC+"/", parseKeyList)
	var se *StatusError
	if err != nil && !(errors.As(err, &se) && se.StatusCode == http.StatusNotFound) {
		return err
	}
	if len(listed) == 0 { // an empty listing, or 404
		*r.eni = ENI{MAC: r.eni.MAC, DeviceNumber: DeviceNumberUnknown, NotReadyReason: "IMDS lists the MAC but none of its keys yet"}
		return nil
	}
	r.listed = listed
	for _, k := range eniKeys {
		fallback := k.name == "vpc-ipv4-cidr-block" && listed["vpc-ipv4-cidr-blocks"]
		if listed[k.name] && !fallback && (k.dynamic || !r.dynamic) {
			r.fetch = append(r.fetch, k)
		}
	}
	return nil
}

// fetchKeys reads the keys the listings chose and parses them into the ENIs.
func (c *Client) fetchKeys(ctx context.Context, reads []eniRead) error {
	type job struct {
		eni  *ENI
		key  eniKey
		body string
	}
	var jobs []job
	for _, r := range reads {
		for _, k := range r.fetch {
			jobs = append(jobs, job{eni: r.eni, key: k})
		}
	}
	err := c.forEach(ctx, len(jobs), func(ctx context.Context, j int) (err error) {
		jobs[j].body, err = c.get(ctx, macsPath+jobs[j].eni.MAC+"/"+jobs[j].key.name)
		return err // a listed key that answers 404 is an error too
	})
	if err != nil {
		return err
	}
	for _, jb := range jobs {
		if err := jb.key.apply(jb.eni, jb.body); err != nil {
			return &KeyError{Key: "meta-data/" + macsPath + jb.eni.MAC + "/" + jb.key.name, Err: err}
		}
	}
	return nil
}

// checkReady flags an ENI whose keys are not yet complete enough to
// configure it. has is its listing.
//
// Right after a hot attach IMDS can answer device-number 0 before the real
// value has propagated, and list network-card late (amazon-ec2-net-utils
// 2.7.4, lib/lib.sh). The primary's keys (top-level mac) are there from
// launch, and EC2 serves network-card for every ENI of a multi-card
// instance type, so one snapshot tells: card 0 device 0 is the primary's
// slot, and a multi-card instance's ENI without network-card is not
// described yet. Device 0 on another card is valid and usual; the agent
// re-reads such an ENI a few times before it trusts the 0 (Unconfirmed).
func checkReady(e *ENI, has map[string]bool, snap Snapshot) {
	secondary := e.MAC != snap.PrimaryMAC
	switch {
	case !e.Ready: // listKeys found no keys at all
	case !has["device-number"]:
		e.Ready, e.NotReadyReason = false, "device-number not listed yet"
		e.DeviceNumber = DeviceNumberUnknown
	case secondary && snap.MultiCard && !has["network-card"]:
		e.Ready, e.NotReadyReason = false, "network-card not listed yet on a multi-card instance"
		e.DeviceNumber = DeviceNumberUnknown
	case secondary && e.DeviceNumber == 0 && e.NetworkCard == 0:
		e.Ready, e.NotReadyReason = false, "device-number 0 on card 0 of a secondary MAC: IMDS has not caught up with the attachment"
		e.DeviceNumber = DeviceNumberUnknown
	case !has["interface-id"]:
		e.Ready, e.NotReadyReason = false, "interface-id not listed yet"
	case !has["local-ipv4s"] && !has["ipv6s"]:
		e.Ready, e.NotReadyReason = false, "neither local-ipv4s nor ipv6s listed yet"
	case has["local-ipv4s"] && !has["subnet-ipv4-cidr-block"]:
		e.Ready, e.NotReadyReason = false, "local-ipv4s listed without subnet-ipv4-cidr-block"
	case has["ipv6s"] && !has["subnet-ipv6-cidr-blocks"]:
		e.Ready, e.NotReadyReason = false, "ipv6s listed without subnet-ipv6-cidr-blocks"
	}
}

// getParsed reads one key and parses it, turning a parse failure into a
// *KeyError that names key and value.
func getParsed[T any](ctx context.Context, c *Client, path string, parse func(string) (T, error)) (T, error) {
	var zero T
	body, err := c.get(ctx, path)
	if err != nil {
		return zero, err
	}
	v, err := parse(body)
	if err != nil {
		return zero, &KeyError{Key: "meta-data/" + path, Err: err}
	}
	return v, nil
}
