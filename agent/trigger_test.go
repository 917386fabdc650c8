package agent

import (
	"testing"

	"github.com/dualhomed/dualhomed/netcfg"
)

// A foreign deletion reconciles only while an add is blocked, any other
// change (a route added) only while the kernel refuses one of our adds.
func TestTriggerForBlockedAndRefused(t *testing.T) {
	for _, tt := range []struct {
		c                netcfg.KernelChange
		blocked, refused bool
		want             Trigger
	}{
		{netcfg.ForeignDeleted, false, false, 0},
		{netcfg.ForeignDeleted, true, false, TriggerForeign},
		{netcfg.OtherChanged, true, false, 0},
		{netcfg.OtherChanged, true, true, TriggerForeign},
		{netcfg.LinkChanged, false, false, TriggerLink},
	} {
		if got := triggerFor(tt.c, tt.blocked, tt.refused); got != tt.want {
			t.Errorf("triggerFor(%v, blocked %v, refused %v) = %v, want %v", tt.c, tt.blocked, tt.refused, got, tt.want)
		}
	}
}
