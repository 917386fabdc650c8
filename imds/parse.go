package imds

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"unicode/utf8"
)

// The parsers below are pure functions from one IMDS body to typed values.
// Each rejects anything real IMDS would never send, so that a corrupted or
// truncated answer becomes an error naming the value instead of a wrong
// configuration. They accept one trailing newline: real IMDS sends none,
// but AWS's amazon-ec2-metadata-mock ends some listings with one, and
// tolerating it costs nothing.

// ValueError says what is wrong with one value read from IMDS. Value is the
// offending line (not the whole body) so that the message stays short.
type ValueError struct {
	Value  string
	Reason string // completes the sentence `"<value>" <reason>`
}

func (e *ValueError) Error() string {
	v := e.Value
	if len(v) > maxValueInError {
		v = v[:maxValueInError] + "..."
	}
	return fmt.Sprintf("%q %s", v, e.Reason)
}

// maxValueInError bounds how much of a bad value an error message quotes:
// enough to recognise it, not a 64 KiB wall of junk in a log line.
const maxValueInError = 80

func invalid(value, reason string) error { return &ValueError{Value: value, Reason: reason} }

// splitLines splits an IMDS body into its lines. One trailing newline is
// tolerated; an empty body, empty lines and control characters are errors.
func splitLines(body string) ([]string, error) {
	body = strings.TrimSuffix(body, "\n")
	if body == "" {
		return nil, invalid(body, "is empty")
	}
	lines := strings.Split(body, "\n")
	for _, l := range lines {
		if l == "" {
			return nil, invalid(body, "has an empty line")
		}
		if !utf8.ValidString(l) {
			return nil, invalid(l, "is not valid UTF-8")
		}
		if strings.ContainsFunc(l, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			return nil, invalid(l, "contains control characters")
		}
	}
	return lines, nil
}

// oneLine parses body, which must be a single line, with parse.
func oneLine[T any](body string, parse func(line string) (T, error)) (T, error) {
	lines, err := splitLines(body)
	if err == nil && len(lines) != 1 {
		err = invalid(body, "has more than one line")
	}
	if err != nil {
		var zero T
		return zero, err
	}
	return parse(lines[0])
}

// parseMAC parses one MAC in IMDS form (6 octets, colon separated) and
// returns it lower case.
func parseMAC(s string) (string, error) {
	hw, err := net.ParseMAC(s)
	if err != nil || len(hw) != 6 || len(s) != len("00:00:00:00:00:00") || strings.Count(s, ":") != 5 {
		return "", invalid(s, "is not a MAC address")
	}
	return hw.String(), nil // net.HardwareAddr prints lower case with colons
}

// parsePrimaryMAC parses the body of meta-data/mac.
func parsePrimaryMAC(body string) (string, error) { return oneLine(body, parseMAC) }

// parseMACList parses the listing of network/interfaces/macs/: one "<mac>/"
// per line. It returns the MACs lower case, in listing order, and rejects
// duplicates and an empty listing (an instance always has its primary ENI).
func parseMACList(body string) ([]string, error) {
	return parseList(body, func(l string) (string, error) { return parseMAC(strings.TrimSuffix(l, "/")) })
}

// parseKeyList parses a directory listing such as macs/<mac>/: one key per
// line, subdirectories with a trailing slash. It returns the set of names,
// subdirectories included with their slash. An empty listing is an empty
// set, not an error: IMDS can list a MAC before it lists any of its keys.
func parseKeyList(body string) (map[string]bool, error) {
	keys := map[string]bool{}
	if strings.TrimSuffix(body, "\n") == "" {
		return keys, nil
	}
	lines, err := splitLines(body)
	if err != nil {
		return nil, err
	}
	for _, l := range lines {
		name := strings.TrimSuffix(l, "/")
		if name == "" || strings.TrimLeft(name, "abcdefghijklmnopqrstuvwxyz0123456789-_.") != "" {
			return nil, invalid(l, "is not a metadata key name")
		}
		if keys[l] {
			return nil, invalid(l, "is listed twice")
		}
		keys[l] = true
	}
	return keys, nil
}

// parseDeviceNumber parses device-number (and network-card): a small
// non-negative decimal integer.
func parseDeviceNumber(body string) (int, error) {
	return oneLine(body, func(line string) (int, error) {
		// Reject signs, spaces and leading zeros that strconv would accept or
		// that hint at a corrupted value. EC2 allows far fewer than 1000 ENIs.
		if len(line) > 4 || strings.TrimLeft(line, "0123456789") != "" || (len(line) > 1 && line[0] == '0') {
			return 0, invalid(line, "is not a device number")
		}
		return strconv.Atoi(line) // up to 4 digits: cannot fail
	})
}

// parseID parses a resource id such as interface-id ("eni-0123abcd"):
// the given prefix followed by lower-case hex digits.
func parseID(body, prefix string) (string, error) {
	return oneLine(body, func(line string) (string, error) {
		rest, ok := strings.CutPrefix(line, prefix)
		if !ok || rest == "" || len(rest) > 32 || strings.TrimLeft(rest, "0123456789abcdef") != "" {
			return "", invalid(line, "is not a "+strings.TrimSuffix(prefix, "-")+" id")
		}
		return line, nil
	})
}

// parseOwnerID parses owner-id: a 12-digit AWS account number.
func parseOwnerID(body string) (string, error) {
	return oneLine(body, func(line string) (string, error) {
		if len(line) != 12 || strings.TrimLeft(line, "0123456789") != "" {
			return "", invalid(line, "is not an AWS account id")
		}
		return line, nil
	})
}

// parseAddr parses one address of the given family (4 or 6), without a zone
// and not IPv4-mapped.
func parseAddr(s string, family int) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil || a.Is4() != (family == 4) || a.Is4In6() || a.Zone() != "" {
		return netip.Addr{}, invalid(s, fmt.Sprintf("is not an IPv%d address", family))
	}
	return a, nil
}

// parseList parses one value per line, keeping IMDS order (the first
// local-ipv4s entry is the ENI's primary private IP) and rejecting duplicates.
func parseList[T comparable](body string, parse func(string) (T, error)) ([]T, error) {
	lines, err := splitLines(body)
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(lines))
	seen := make(map[T]bool, len(lines))
	for _, l := range lines {
		v, err := parse(l)
		if err != nil {
			return nil, err
		}
		if seen[v] {
			return nil, invalid(l, "is listed twice")
		}
		seen[v] = true
		out = append(out, v)
	}
	return out, nil
}

// parseIPv4List parses local-ipv4s.
func parseIPv4List(body string) ([]netip.Addr, error) {
	return parseList(body, func(l string) (netip.Addr, error) { return parseAddr(l, 4) })
}

// parseIPv6List parses ipv6s.
func parseIPv6List(body string) ([]netip.Addr, error) {
	return parseList(body, func(l string) (netip.Addr, error) { return parseAddr(l, 6) })
}

// parsePrefix parses one CIDR block of the given family (4 or 6). Host bits
// must be zero: IMDS lists blocks, and "10.0.1.5/24" means a corrupted value.
func parsePrefix(s string, family int) (netip.Prefix, error) {
	what := fmt.Sprintf("an IPv%d prefix", family)
	p, err := netip.ParsePrefix(s)
	if err != nil || (family == 4 && !p.Addr().Is4()) || (family == 6 && (!p.Addr().Is6() || p.Addr().Is4In6())) {
		return netip.Prefix{}, invalid(s, "is not "+what)
	}
	if p != p.Masked() {
		return netip.Prefix{}, invalid(s, "is not "+what+" (host bits set)")
	}
	return p, nil
}

// parseIPv4Prefix parses a single IPv4 CIDR block (subnet-ipv4-cidr-block,
// vpc-ipv4-cidr-block).
func parseIPv4Prefix(body string) (netip.Prefix, error) {
	return oneLine(body, func(line string) (netip.Prefix, error) { return parsePrefix(line, 4) })
}

// parsePrefixList parses one CIDR block of the given family per line
// (ipv4-prefix, ipv6-prefix, *-cidr-blocks), keeping order, rejecting duplicates.
func parsePrefixList(body string, family int) ([]netip.Prefix, error) {
	return parseList(body, func(l string) (netip.Prefix, error) { return parsePrefix(l, family) })
}
