// Package imds reads what the EC2 instance metadata service (IMDSv2) says about
// the instance's network interfaces and turns it into plain values.
//
// A Snapshot is either complete and authoritative or an error: a failed,
// partial or throttled read never yields a snapshot with ENIs or addresses
// missing, because callers delete configuration that a snapshot no longer lists.
package imds

import (
	"net/netip"
	"reflect"
	"slices"
)

// Snapshot is one complete, authoritative read of the instance's ENIs.
type Snapshot struct {
	// PrimaryMAC is the top-level meta-data/mac: the primary ENI's MAC, lower case.
	PrimaryMAC string
	// ENIs holds one entry per MAC listed under network/interfaces/macs/,
	// sorted by MAC. Not-ready ENIs are included, flagged with Ready=false.
	ENIs []ENI
	// MultiCard is true when some ENI's listing names network-card: the
	// instance type has several network cards (IMDS has no such key on
	// the others).
	MultiCard bool
	// Requests is the number of HTTP requests (token included) the snapshot cost.
	Requests int
}

// ENI is what IMDS says about one attached network interface.
//
// Optional keys that IMDS does not list are left at their zero value
// (an invalid netip.Prefix, a nil slice).
type ENI struct {
	MAC string // lower case, colon separated
	// Ready is false while IMDS is still catching up after a hot attach (see
	// Client.Snapshot for the rule). A not-ready ENI must not be configured,
	// and must not cause removal either.
	Ready          bool
	NotReadyReason string

	DeviceNumber int
	NetworkCard  int // 0 when the network-card key is absent
	InterfaceID  string
	SubnetID     string
	VPCID        string
	OwnerID      string

	SubnetIPv4CIDR  netip.Prefix   // invalid on IPv6-only subnets
	SubnetIPv6CIDRs []netip.Prefix // subnet-ipv6-cidr-blocks
	VPCIPv4CIDRs    []netip.Prefix // vpc-ipv4-cidr-blocks (falls back to vpc-ipv4-cidr-block)
	VPCIPv6CIDRs    []netip.Prefix // vpc-ipv6-cidr-blocks

	LocalIPv4s   []netip.Addr   // in IMDS order: the first is the ENI's primary private IPv4
	IPv6s        []netip.Addr   // ipv6s
	IPv4Prefixes []netip.Prefix // ipv4-prefix (delegated prefixes)
	IPv6Prefixes []netip.Prefix // ipv6-prefix (delegated prefixes)
}

// ENI returns the ENI with the given MAC, if the snapshot lists it.
func (s Snapshot) ENI(mac string) (ENI, bool) {
	for _, e := range s.ENIs {
		if e.MAC == mac {
			return e, true
		}
	}
	return ENI{}, false
}

// Equal reports whether s and o say the same about the instance's ENIs
// (what they cost to read aside).
func (s Snapshot) Equal(o Snapshot) bool {
	return s.PrimaryMAC == o.PrimaryMAC && s.MultiCard == o.MultiCard && slices.EqualFunc(s.ENIs, o.ENIs, ENI.Equal)
}

// Unconfirmed reports whether e is a ready secondary ENI at device 0 of a
// card other than 0: valid, but IMDS answers device-number 0 before the
// real value has propagated, so the 0 may still change.
func (e ENI) Unconfirmed() bool { return e.Ready && e.DeviceNumber == 0 && e.NetworkCard != 0 }

// Equal reports whether e and o are the same in every field. A list is
// nil or non-empty (IMDS never yields an empty one), so DeepEqual's nil
// versus empty distinction never arises.
func (e ENI) Equal(o ENI) bool { return reflect.DeepEqual(e, o) }
