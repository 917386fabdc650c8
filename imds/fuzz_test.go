package imds

import (
	"errors"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// Fuzz targets for every parser. Seeds live in testdata/fuzz/<Target>/;
// `go test` runs them, `go test -fuzz=FuzzX -fuzztime=20s ./imds/` explores.
// Each target checks that the parser never panics, that errors are
// *ValueError values with a bounded message, and that accepted input
// round-trips: formatting the result the way IMDS does parses back to it.

// checkErr is common to all targets.
func checkErr(t *testing.T, err error) {
	t.Helper()
	var ve *ValueError
	if !errors.As(err, &ve) {
		t.Fatalf("error %v (%T) is not a *ValueError", err, err)
	}
	if n := len(err.Error()); n > 4*maxValueInError+100 {
		t.Fatalf("error message is %d bytes long", n)
	}
}

func FuzzParseMACList(f *testing.F) {
	f.Add("02:00:00:00:00:01/\n0e:49:61:0f:c3:11/")
	f.Fuzz(func(t *testing.T, body string) {
		macs, err := parseMACList(body)
		if err != nil {
			checkErr(t, err)
			return
		}
		for _, m := range macs {
			if m != strings.ToLower(m) || len(m) != 17 {
				t.Fatalf("MAC %q is not canonical", m)
			}
		}
		again, err := parseMACList(strings.Join(macs, "/\n") + "/")
		if err != nil || !slices.Equal(again, macs) {
			t.Fatalf("round trip of %q: %v, %v", macs, again, err)
		}
	})
}

func FuzzParsePrimaryMAC(f *testing.F) {
	f.Add("02:00:00:00:00:01")
	f.Fuzz(func(t *testing.T, body string) {
		mac, err := parsePrimaryMAC(body)
		if err != nil {
			checkErr(t, err)
			return
		}
		if again, err := parsePrimaryMAC(mac); err != nil || again != mac {
			t.Fatalf("round trip of %q: %q, %v", mac, again, err)
		}
	})
}

func FuzzParseKeyList(f *testing.F) {
	f.Add("device-number\ninterface-id\nipv4-associations/")
	f.Fuzz(func(t *testing.T, body string) {
		keys, err := parseKeyList(body)
		if err != nil {
			checkErr(t, err)
			return
		}
		for k := range keys {
			if k == "" || strings.ContainsAny(k, "\n\r\x00") {
				t.Fatalf("accepted key %q", k)
			}
		}
	})
}

func FuzzParseDeviceNumber(f *testing.F) {
	f.Add("0")
	f.Add("14")
	f.Fuzz(func(t *testing.T, body string) {
		n, err := parseDeviceNumber(body)
		if err != nil {
			checkErr(t, err)
			return
		}
		if n < 0 || n > 9999 {
			t.Fatalf("accepted device number %d", n)
		}
		if strings.TrimSuffix(body, "\n") != strconv.Itoa(n) {
			t.Fatalf("%q parsed as %d: not canonical", body, n)
		}
	})
}

func FuzzParseID(f *testing.F) {
	f.Add("eni-0f95d3625f5c521cc", "eni-")
	f.Add("515336597381", "")
	f.Fuzz(func(t *testing.T, body, prefix string) {
		if len(prefix) > 16 {
			t.Skip("prefixes are short constants (eni-, vpc-, subnet-)")
		}
		var id string
		var err error
		if prefix == "" {
			id, err = parseOwnerID(body)
		} else {
			id, err = parseID(body, prefix)
		}
		if err != nil {
			checkErr(t, err)
			return
		}
		if id != strings.TrimSuffix(body, "\n") || strings.ContainsAny(id, "\n\x00 ") {
			t.Fatalf("%q parsed as %q", body, id)
		}
	})
}

func fuzzAddrList(f *testing.F, parse func(string) ([]netip.Addr, error), is4 bool) {
	f.Fuzz(func(t *testing.T, body string) {
		list, err := parse(body)
		if err != nil {
			checkErr(t, err)
			return
		}
		lines := make([]string, len(list))
		for i, a := range list {
			if a.Is4() != is4 || a.Zone() != "" || a.Is4In6() {
				t.Fatalf("accepted %v", a)
			}
			lines[i] = a.String()
		}
		again, err := parse(strings.Join(lines, "\n"))
		if err != nil || !slices.Equal(again, list) {
			t.Fatalf("round trip of %v: %v, %v", list, again, err)
		}
	})
}

func FuzzParseIPv4List(f *testing.F) {
	f.Add("10.0.0.5\n10.0.0.6")
	fuzzAddrList(f, parseIPv4List, true)
}

func FuzzParseIPv6List(f *testing.F) {
	f.Add("2001:db8::1\n2001:db8::2")
	fuzzAddrList(f, parseIPv6List, false)
}

func FuzzParsePrefixList(f *testing.F) {
	f.Add("10.0.1.32/28\n10.0.1.48/28", 4)
	f.Add("2001:db8:1:1:a::/80", 6)
	f.Fuzz(func(t *testing.T, body string, family int) {
		if family != 4 && family != 6 {
			family = 4 + 2*(family&1)
		}
		list, err := parsePrefixList(body, family)
		if err != nil {
			checkErr(t, err)
			return
		}
		lines := make([]string, len(list))
		for i, p := range list {
			if p.Addr().Is4() != (family == 4) || p != p.Masked() {
				t.Fatalf("accepted %v for family %d", p, family)
			}
			lines[i] = p.String()
		}
		again, err := parsePrefixList(strings.Join(lines, "\n"), family)
		if err != nil || !slices.Equal(again, list) {
			t.Fatalf("round trip of %v: %v, %v", list, again, err)
		}
	})
}

func FuzzParseIPv4Prefix(f *testing.F) {
	f.Add("10.0.1.0/24")
	f.Fuzz(func(t *testing.T, body string) {
		p, err := parseIPv4Prefix(body)
		if err != nil {
			checkErr(t, err)
			return
		}
		if again, err := parseIPv4Prefix(p.String()); err != nil || again != p {
			t.Fatalf("round trip of %v: %v, %v", p, again, err)
		}
	})
}
