package imds

import (
	"net/netip"
	"reflect"
	"testing"
)

// Equal must look at every field of ENI: a field added later and forgotten
// there would make the agent keep a stale snapshot.
func TestENIEqualSeesEveryField(t *testing.T) {
	base := ENI{MAC: "02:00:00:00:00:02", Ready: true, DeviceNumber: 1, InterfaceID: "eni-1",
		SubnetIPv4CIDR: netip.MustParsePrefix("10.1.0.0/24"), LocalIPv4s: []netip.Addr{netip.MustParseAddr("10.1.0.10")}}
	if !base.Equal(base) {
		t.Fatal("an ENI differs from itself")
	}
	typ := reflect.TypeOf(base)
	for i := range typ.NumField() {
		changed := base
		f := reflect.ValueOf(&changed).Elem().Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString(f.String() + "x")
		case reflect.Bool:
			f.SetBool(!f.Bool())
		case reflect.Int:
			f.SetInt(f.Int() + 1)
		case reflect.Slice:
			f.Set(reflect.Append(f, reflect.Zero(f.Type().Elem())))
		case reflect.Struct: // netip.Prefix
			f.Set(reflect.ValueOf(netip.MustParsePrefix("192.0.2.0/24")))
		default:
			t.Fatalf("field %s: kind %s not covered by this test", typ.Field(i).Name, f.Kind())
		}
		if base.Equal(changed) || changed.Equal(base) {
			t.Errorf("Equal misses a change of %s", typ.Field(i).Name)
		}
		s1, s2 := Snapshot{PrimaryMAC: "a", ENIs: []ENI{base}}, Snapshot{PrimaryMAC: "a", ENIs: []ENI{changed}}
		if s1.Equal(s2) {
			t.Errorf("Snapshot.Equal misses a change of %s", typ.Field(i).Name)
		}
	}
	if (Snapshot{PrimaryMAC: "a", Requests: 1}).Equal(Snapshot{PrimaryMAC: "b", Requests: 1}) {
		t.Error("Snapshot.Equal misses the primary MAC")
	}
	if !(Snapshot{PrimaryMAC: "a", Requests: 1}).Equal(Snapshot{PrimaryMAC: "a", Requests: 2}) {
		t.Error("Snapshot.Equal compares the cost of the reads")
	}
}
