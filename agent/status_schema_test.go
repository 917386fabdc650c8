package agent

import (
	"encoding"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/dualhomed/dualhomed/netcfg"
)

var updateSchema = flag.Bool("update", false, "rewrite testdata/status.schema")

const schemaFile = "testdata/status.schema"

// schemaLines lists every field t marshals to as "<path> <kind>", walking
// the type as encoding/json does: a field that omitempty leaves out of one
// file is still part of the schema.
func schemaLines(prefix string, t reflect.Type) []string {
	textMarshaler := reflect.TypeFor[encoding.TextMarshaler]()
	switch {
	case t == reflect.TypeFor[netcfg.Op]():
		// Op.MarshalJSON adds three keys to the struct's own.
		out := []string{prefix + ".action string", prefix + ".kind string", prefix + ".text string"}
		type plain netcfg.Op
		return append(out, schemaLines(prefix, reflect.TypeFor[plain]())...)
	case t == reflect.TypeFor[time.Duration]():
		return []string{prefix + " number"}
	case t.Implements(textMarshaler) || reflect.PointerTo(t).Implements(textMarshaler):
		return []string{prefix + " string"}
	}
	switch t.Kind() {
	case reflect.Pointer:
		return schemaLines(prefix, t.Elem())
	case reflect.Slice:
		return append([]string{prefix + " array"}, schemaLines(prefix+"[]", t.Elem())...)
	case reflect.Struct:
		out := []string{prefix + " object"}
		for f := range t.Fields() {
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			switch {
			case name == "-" || !f.IsExported():
			case f.Anonymous && name == "":
				out = append(out, schemaLines(prefix, f.Type)[1:]...)
			default:
				out = append(out, schemaLines(prefix+"."+cmpOr(name, f.Name), f.Type)...)
			}
		}
		return out
	case reflect.Bool:
		return []string{prefix + " boolean"}
	case reflect.String:
		return []string{prefix + " string"}
	case reflect.Interface:
		return []string{prefix + " any"}
	default:
		return []string{prefix + " number"}
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// status.json and `dualhomed status --json` keep their fields within a
// schema version: renaming, removing or retyping a field fails here until
// StatusSchema goes up (and docs/cli.md says what changed); a new field
// only needs the file updated (go test ./agent -run TestStatusSchema -update).
func TestStatusSchema(t *testing.T) {
	got := append([]string{fmt.Sprintf("schema %d", StatusSchema)},
		append(schemaLines("status.json", reflect.TypeFor[Health]()), schemaLines("status-json", reflect.TypeFor[StatusJSON]())...)...)
	if *updateSchema {
		if err := os.WriteFile(schemaFile, []byte(strings.Join(got, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(schemaFile)
	if err != nil {
		t.Fatal(err)
	}
	want := strings.Split(strings.TrimSpace(string(b)), "\n")
	var gone, added []string
	for _, l := range want[1:] {
		if !slices.Contains(got, l) {
			gone = append(gone, l)
		}
	}
	for _, l := range got[1:] {
		if !slices.Contains(want, l) {
			added = append(added, l)
		}
	}
	if len(gone) > 0 && want[0] == got[0] {
		t.Errorf("fields renamed, removed or retyped without raising StatusSchema (%d):\n%s", StatusSchema, strings.Join(gone, "\n"))
	}
	if len(gone)+len(added) > 0 || want[0] != got[0] {
		t.Errorf("%s is not up to date (%s; added: %v; gone: %v): update it with -update, and docs/cli.md", schemaFile, got[0], added, gone)
	}
}

// Every change line and every warning line carries the same fields, so that
// a fleet's logs can be searched by them (docs/cli.md, docs/fleet.md); a
// warning is logged at warn level when it appears, at debug level while it
// stays.
func TestLogFieldsForFleetSearch(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	d := &Daemon{rec: NewReconciler(nil, nil, DefaultConfig())}
	route := netcfg.Route{Table: 20101, Dst: netip.MustParsePrefix("0.0.0.0/0"), Gateway: netip.MustParseAddr("10.1.0.1"), LinkIndex: 3}
	enis := []netcfg.ENIStatus{{MAC: "02:00:00:00:01:01", InterfaceID: "eni-1", Link: "eth1", LinkIndex: 3, Table: 20101}}
	held := netcfg.Blocked{Object: "route default via 10.1.0.1 dev eth1 table 20101", Holder: "route default via 10.1.0.1 dev eth1 table 20101 proto dhcp metric 0"}
	rep := Report{ENIs: enis, Warnings: []netcfg.Warning{{ENI: "eni-1", Message: "m", Hint: "h", Blocks: []netcfg.Route{route}, Blocked: &held}},
		Blocked: 1, BlockedObjects: []netcfg.Blocked{held}}
	rep.Changes = netcfg.Attribute([]netcfg.Op{{Route: &route}, {Delete: true, AltName: &netcfg.AltName{LinkIndex: 3, Name: "eni-1"}}},
		enis, []netcfg.Link{{Index: 3, Name: "eth1"}})
	d.logReport(rep, zap.New(core), 0)
	d.logReport(rep, zap.New(core), 0)
	want := []map[string]any{
		{"eni": "eni-1", "link": "eth1", "table": int64(20101), "op": "add", "object": "route", "text": "+ route default via 10.1.0.1 dev eth1 table 20101"},
		{"eni": "eni-1", "link": "eth1", "table": int64(20101), "op": "delete", "object": "altname", "text": "- altname eni-1 dev eth1"},
	}
	changed := logs.FilterMessage("changed").All()
	for i, w := range want {
		if got := changed[i].ContextMap(); !reflect.DeepEqual(got, w) {
			t.Errorf("changed line %d: %v, want %v", i, got, w)
		}
	}
	warnings := logs.FilterMessage("warning").All()
	if len(warnings) != 2 || warnings[0].Level != zap.WarnLevel || warnings[1].Level != zap.DebugLevel {
		t.Fatalf("warning lines %v: want one at warn level, then one at debug", warnings)
	}
	if got, want := warnings[0].ContextMap(), map[string]any{"eni": "eni-1", "message": "m", "hint": "h",
		"blocks": []any{"default via 10.1.0.1 dev #3 table 20101"}, "object": held.Object, "holder": held.Holder}; !reflect.DeepEqual(got, want) {
		t.Errorf("warning line: %v, want %v", got, want)
	}
	// The blocked line names each object and its holder.
	lines := logs.FilterMessageSnippet("some objects could not be added").All()
	if len(lines) == 0 {
		t.Fatal("no line about the blocked objects")
	}
	if got, want := lines[0].ContextMap(), map[string]any{"blocked": int64(1), "objects": []netcfg.Blocked{held}}; !reflect.DeepEqual(got, want) {
		t.Errorf("blocked line: %v, want %v", got, want)
	}
}
