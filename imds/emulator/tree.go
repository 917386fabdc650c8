package emulator

import (
	"encoding/json"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"

	"github.com/dualhomed/dualhomed/imds"
)

// Paths in the tree are relative to /latest/ and have no leading or trailing
// slash: "meta-data/network/interfaces/macs/02:00:00:00:00:01/local-ipv4s".
// The root (/latest/ itself) is "".
const macsDir = "meta-data/network/interfaces/macs"

// node is one rendered path: a leaf with its value, or a directory with its
// entries (subdirectories carry a trailing '/').
type node struct {
	dir     bool
	entries []string
	body    string
}

// tree is the fully rendered metadata. It is rebuilt after every mutation and
// read without copying, so answering a GET costs one map lookup.
type tree map[string]*node

// add serves n at path, listed in its parent directory, whose own parents
// are made as needed.
func (t tree) add(path string, n *node) {
	t[path] = n
	for dir := n.dir; path != ""; dir = true {
		parent, name := "", path
		if i := strings.LastIndexByte(path, '/'); i >= 0 {
			parent, name = path[:i], path[i+1:]
		}
		if dir {
			name += "/"
		}
		p := t[parent]
		if p == nil {
			p = &node{dir: true}
			t[parent] = p
		}
		if slices.Contains(p.entries, name) {
			return
		}
		p.entries = append(p.entries, name)
		path = parent
	}
}

// finish sorts listings (except the MAC listing, which keeps model order) and
// renders directory bodies: entries one per line, no trailing newline.
func (t tree) finish() {
	for path, n := range t {
		if !n.dir {
			continue
		}
		if path != macsDir {
			slices.Sort(n.entries)
		}
		entries := n.entries
		if path == "" {
			// /latest/ lists its categories without the trailing '/':
			// "dynamic\nmeta-data" (and user-data when there is some).
			entries = make([]string, len(n.entries))
			for i, e := range n.entries {
				entries[i] = strings.TrimSuffix(e, "/")
			}
		}
		n.body = strings.Join(entries, "\n")
	}
}

func joinLines[T fmt.Stringer](items []T) string {
	parts := make([]string, len(items))
	for i, it := range items {
		parts[i] = it.String()
	}
	return strings.Join(parts, "\n")
}

// render builds the tree IMDS would serve for inst, with the raw keys (by
// MAC, then key) in place of the model's. A key whose value is empty is
// absent, as IMDS leaves out what an instance does not have.
func render(inst Instance, raw map[string]map[string]rawKey) tree {
	t := tree{"": {dir: true}}
	add := func(dir string, keys map[string]string) {
		for key, value := range keys {
			if value != "" {
				t.add(dir+key, &node{body: value})
			}
		}
	}
	region := orDefault(inst.Region, "us-east-1")
	md := map[string]string{
		"ami-id":                      "ami-0abcdef1234567890",
		"instance-id":                 inst.InstanceID,
		"instance-type":               orDefault(inst.InstanceType, "c6in.large"),
		"placement/region":            region,
		"placement/availability-zone": region + "a",
		"services/domain":             "amazonaws.com",
		"services/partition":          "aws",
		"mac":                         inst.PrimaryMAC,
	}
	// The instance's own hostname and IPv4 are the primary ENI's.
	if i := inst.eniIndex(inst.PrimaryMAC); i >= 0 {
		p := inst.ENIs[i]
		md["hostname"], md["local-hostname"] = hostname(inst, p), hostname(inst, p)
		md["local-ipv4"] = joinLines(p.LocalIPv4s[:min(len(p.LocalIPv4s), 1)])
	}
	add("meta-data/", md)
	// The network/interfaces/macs directory exists even with no ENIs.
	t.add(macsDir, &node{dir: true})

	multiCard := inst.MultiCard || slices.ContainsFunc(inst.ENIs, func(e imds.ENI) bool { return e.NetworkCard != 0 })
	for _, e := range inst.ENIs {
		keys := map[string]string{
			"device-number":           strconv.Itoa(e.DeviceNumber),
			"interface-id":            e.InterfaceID,
			"mac":                     e.MAC,
			"local-hostname":          hostname(inst, e),
			"local-ipv4s":             joinLines(e.LocalIPv4s),
			"ipv6s":                   joinLines(e.IPv6s),
			"ipv4-prefix":             joinLines(e.IPv4Prefixes),
			"ipv6-prefix":             joinLines(e.IPv6Prefixes),
			"owner-id":                e.OwnerID,
			"security-group-ids":      securityGroupID(e),
			"subnet-id":               e.SubnetID,
			"subnet-ipv6-cidr-blocks": joinLines(e.SubnetIPv6CIDRs),
			"vpc-id":                  e.VPCID,
			"vpc-ipv4-cidr-block":     joinLines(e.VPCIPv4CIDRs[:min(len(e.VPCIPv4CIDRs), 1)]),
			"vpc-ipv4-cidr-blocks":    joinLines(e.VPCIPv4CIDRs),
			"vpc-ipv6-cidr-blocks":    joinLines(e.VPCIPv6CIDRs),
		}
		if multiCard {
			keys["network-card"] = strconv.Itoa(e.NetworkCard)
		}
		if e.SubnetIPv4CIDR.IsValid() {
			keys["subnet-ipv4-cidr-block"] = e.SubnetIPv4CIDR.String()
		}
		for key, k := range raw[e.MAC] { // served even when empty
			keys[key] = ""
			if !k.absent {
				t.add(macsDir+"/"+e.MAC+"/"+key, &node{body: k.body})
			}
		}
		add(macsDir+"/"+e.MAC+"/", keys)
	}
	t.add("dynamic/instance-identity/document", &node{body: identityDocument(inst, region)})
	t.finish()
	return t
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// hostname is the IP-based EC2 hostname of an ENI (ip-10-0-0-5.ec2.internal),
// or the resource-name form for IPv6-only ENIs.
func hostname(inst Instance, e imds.ENI) string {
	if len(e.LocalIPv4s) > 0 && e.LocalIPv4s[0].Is4() {
		return "ip-" + strings.ReplaceAll(e.LocalIPv4s[0].String(), ".", "-") + ".ec2.internal"
	}
	return orDefault(inst.InstanceID, "i-0123456789abcdef0") + ".ec2.internal"
}

// securityGroupID derives a stable, plausible group id from the VPC, since
// the shared ENI type does not model security groups.
func securityGroupID(e imds.ENI) string {
	h := fnv.New64a()
	h.Write([]byte(e.VPCID))
	return fmt.Sprintf("sg-%017x", h.Sum64()&0xfffffffffffffff)
}

func identityDocument(inst Instance, region string) string {
	doc := map[string]any{
		"accountId":        "123456789012",
		"architecture":     "x86_64",
		"availabilityZone": region + "a",
		"imageId":          "ami-0abcdef1234567890",
		"instanceId":       inst.InstanceID,
		"instanceType":     orDefault(inst.InstanceType, "c6in.large"),
		"region":           region,
		"version":          "2017-09-30",
	}
	if i := inst.eniIndex(inst.PrimaryMAC); i >= 0 && len(inst.ENIs[i].LocalIPv4s) > 0 {
		doc["privateIp"] = inst.ENIs[i].LocalIPv4s[0].String()
	}
	b, _ := json.MarshalIndent(doc, "", "  ")
	return string(b)
}
