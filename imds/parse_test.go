package imds

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

// checkParse runs one table case: a wanted value, or an error whose text
// contains wantErr.
func checkParse[T any](t *testing.T, in string, got T, err error, want T, wantErr string) {
	t.Helper()
	if wantErr != "" {
		if err == nil {
			t.Errorf("parse(%q) = %v, want error containing %q", in, got, wantErr)
			return
		}
		var ve *ValueError
		if !errors.As(err, &ve) {
			t.Errorf("parse(%q) error %T, want *ValueError", in, err)
		}
		if !strings.Contains(err.Error(), wantErr) {
			t.Errorf("parse(%q) error %q, want it to contain %q", in, err, wantErr)
		}
		return
	}
	if err != nil {
		t.Errorf("parse(%q): %v", in, err)
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parse(%q) = %v, want %v", in, got, want)
	}
}

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestParseMACList(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    []string
		wantErr string
	}{
		{"02:00:00:00:00:01/", []string{"02:00:00:00:00:01"}, ""},
		{"02:00:00:00:00:01/\n0e:49:61:0F:C3:11/", []string{"02:00:00:00:00:01", "0e:49:61:0f:c3:11"}, ""},
		{"02:00:00:00:00:01/\n", []string{"02:00:00:00:00:01"}, ""}, // tolerated trailing newline (AEMM sends one on some listings)
		{"02:00:00:00:00:01", []string{"02:00:00:00:00:01"}, ""},
		{"", nil, `"" is empty`},
		{"\n", nil, "is empty"},
		{"02:00:00:00:00:01/\n\n02:00:00:00:00:02/", nil, "empty line"},
		{"02:00:00:00:00:01/\n02:00:00:00:00:01/", nil, `"02:00:00:00:00:01/" is listed twice`},
		{"02:00:00:00:00:01/\n02:00:00:00:00:01:ff/", nil, "is not a MAC address"},
		{"02-00-00-00-00-01/", nil, `"02-00-00-00-00-01" is not a MAC address`},
		{"0200.0000.0001/", nil, "is not a MAC address"},
		{"02:00:00:00:00:01/\r", nil, "control characters"},
		{"<html>404 Not Found</html>", nil, "is not a MAC address"},
	} {
		got, err := parseMACList(tc.in)
		checkParse(t, tc.in, got, err, tc.want, tc.wantErr)
	}
}

func TestParsePrimaryMAC(t *testing.T) {
	for _, tc := range []struct{ in, want, wantErr string }{
		{"02:00:00:00:00:01", "02:00:00:00:00:01", ""},
		{"0E:49:61:0F:C3:11\n", "0e:49:61:0f:c3:11", ""},
		{"02:00:00:00:00:01\n02:00:00:00:00:02", "", "more than one line"},
		{"", "", "is empty"},
		{"02:00:00:00:00:01/", "", "is not a MAC address"},
	} {
		got, err := parsePrimaryMAC(tc.in)
		checkParse(t, tc.in, got, err, tc.want, tc.wantErr)
	}
}

func TestParseKeyList(t *testing.T) {
	set := func(ks ...string) map[string]bool {
		m := map[string]bool{}
		for _, k := range ks {
			m[k] = true
		}
		return m
	}
	for _, tc := range []struct {
		in      string
		want    map[string]bool
		wantErr string
	}{
		{"device-number\ninterface-id\nipv4-associations/", set("device-number", "interface-id", "ipv4-associations/"), ""},
		{"device-number\n", set("device-number"), ""},
		{"", set(), ""}, // a MAC listed before its keys: not ready, not an error
		{"device-number\ndevice-number", nil, "listed twice"},
		{"device number", nil, "is not a metadata key name"},
		{"Device-Number", nil, "is not a metadata key name"},
		{"a\n\nb", nil, "empty line"},
		{"/", nil, "is not a metadata key name"},
	} {
		got, err := parseKeyList(tc.in)
		checkParse(t, tc.in, got, err, tc.want, tc.wantErr)
	}
}

func TestParseDeviceNumber(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    int
		wantErr string
	}{
		{"0", 0, ""},
		{"1", 1, ""},
		{"14\n", 14, ""},
		{"1023", 1023, ""},
		{"", 0, "is empty"},
		{"-1", 0, `"-1" is not a device number`},
		{"+1", 0, "is not a device number"},
		{"01", 0, "is not a device number"},
		{" 1", 0, "is not a device number"},
		{"1.0", 0, "is not a device number"},
		{"99999", 0, "is not a device number"},
		{"0x1", 0, "is not a device number"},
		{"1\n2", 0, "more than one line"},
	} {
		got, err := parseDeviceNumber(tc.in)
		checkParse(t, tc.in, got, err, tc.want, tc.wantErr)
	}
}

func TestParseIDs(t *testing.T) {
	for _, tc := range []struct{ in, prefix, want, wantErr string }{
		{"eni-0f95d3625f5c521cc", "eni-", "eni-0f95d3625f5c521cc", ""},
		{"eni-0f95d362\n", "eni-", "eni-0f95d362", ""},
		{"vpc-12345678", "vpc-", "vpc-12345678", ""},
		{"subnet-0123abc", "subnet-", "subnet-0123abc", ""},
		{"eni-", "eni-", "", `"eni-" is not a eni id`},
		{"vpc-0123", "eni-", "", "is not a eni id"},
		{"eni-0F95", "eni-", "", "is not a eni id"},
		{"eni-xyz", "eni-", "", "is not a eni id"},
		{"", "eni-", "", "is empty"},
	} {
		got, err := parseID(tc.in, tc.prefix)
		checkParse(t, tc.in, got, err, tc.want, tc.wantErr)
	}
	for _, tc := range []struct{ in, want, wantErr string }{
		{"515336597381", "515336597381", ""},
		{"515336597381\n", "515336597381", ""},
		{"51533659738", "", "is not an AWS account id"},
		{"51533659738x", "", "is not an AWS account id"},
	} {
		got, err := parseOwnerID(tc.in)
		checkParse(t, tc.in, got, err, tc.want, tc.wantErr)
	}
}

func TestParseIPv4List(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    []netip.Addr
		wantErr string
	}{
		{"10.0.0.5", addrs("10.0.0.5"), ""},
		{"10.0.0.5\n10.0.0.6\n10.0.0.4", addrs("10.0.0.5", "10.0.0.6", "10.0.0.4"), ""}, // order kept: first is primary
		{"172.16.34.43\n", addrs("172.16.34.43"), ""},
		{"10.0.0.300", nil, `"10.0.0.300" is not an IPv4 address`},
		{"10.0.0.5\n10.0.0.300", nil, `"10.0.0.300" is not an IPv4 address`},
		{"::ffff:10.0.0.5", nil, "is not an IPv4 address"},
		{"2001:db8::1", nil, "is not an IPv4 address"},
		{"10.0.0.5/24", nil, "is not an IPv4 address"},
		{"010.0.0.5", nil, "is not an IPv4 address"},
		{"10.0.0.5\n10.0.0.5", nil, "listed twice"},
		{"", nil, "is empty"},
		{"10.0.0.5 ", nil, "is not an IPv4 address"},
	} {
		got, err := parseIPv4List(tc.in)
		checkParse(t, tc.in, got, err, tc.want, tc.wantErr)
	}
}

func TestParseIPv6List(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    []netip.Addr
		wantErr string
	}{
		{"2001:db8:8:4::2", addrs("2001:db8:8:4::2"), ""},
		{"2001:db8::2\n2001:DB8::1\n", addrs("2001:db8::2", "2001:db8::1"), ""},
		{"10.0.0.5", nil, `"10.0.0.5" is not an IPv6 address`},
		{"::ffff:10.0.0.5", nil, "is not an IPv6 address"},
		{"fe80::1%eth0", nil, "is not an IPv6 address"},
		{"2001:db8::/64", nil, "is not an IPv6 address"},
		{"2001:db8::1\n2001:db8:0::1", nil, "listed twice"},
	} {
		got, err := parseIPv6List(tc.in)
		checkParse(t, tc.in, got, err, tc.want, tc.wantErr)
	}
}

func TestParsePrefixList(t *testing.T) {
	for _, tc := range []struct {
		in      string
		family  int
		want    []netip.Prefix
		wantErr string
	}{
		{"10.0.1.32/28", 4, prefixes("10.0.1.32/28"), ""},
		{"10.0.0.0/16\n100.64.0.0/24\n", 4, prefixes("10.0.0.0/16", "100.64.0.0/24"), ""},
		{"2001:db8:1:1::/64", 6, prefixes("2001:db8:1:1::/64"), ""},
		{"2001:db8:1:1:a::/80\n2001:db8:1:1:b::/80", 6, prefixes("2001:db8:1:1:a::/80", "2001:db8:1:1:b::/80"), ""},
		{"10.0.1.33/28", 4, nil, `"10.0.1.33/28" is not an IPv4 prefix (host bits set)`},
		{"10.0.1.0/33", 4, nil, "is not an IPv4 prefix"},
		{"10.0.1.0", 4, nil, "is not an IPv4 prefix"},
		{"2001:db8::/64", 4, nil, "is not an IPv4 prefix"},
		{"10.0.0.0/16", 6, nil, `"10.0.0.0/16" is not an IPv6 prefix`},
		{"::ffff:10.0.0.0/120", 6, nil, "is not an IPv6 prefix"},
		{"10.0.0.0/16\n10.0.0.0/16", 4, nil, "listed twice"},
		{"", 6, nil, "is empty"},
	} {
		got, err := parsePrefixList(tc.in, tc.family)
		checkParse(t, tc.in, got, err, tc.want, tc.wantErr)
	}
	for _, tc := range []struct {
		in      string
		want    netip.Prefix
		wantErr string
	}{
		{"10.0.1.0/24", netip.MustParsePrefix("10.0.1.0/24"), ""},
		{"192.0.2.0/24\n", netip.MustParsePrefix("192.0.2.0/24"), ""},
		{"10.0.1.0/24\n10.0.2.0/24", netip.Prefix{}, "more than one line"},
		{"10.0.1.1/24", netip.Prefix{}, "host bits set"},
	} {
		got, err := parseIPv4Prefix(tc.in)
		checkParse(t, tc.in, got, err, tc.want, tc.wantErr)
	}
}

func TestValueErrorTruncatesLongValues(t *testing.T) {
	_, err := parseIPv4List(strings.Repeat("x", 1000))
	if err == nil || len(err.Error()) > 150 {
		t.Errorf("error for a 1000-byte value is %d bytes long: %v", len(err.Error()), err)
	}
}
