package e2e

import (
	"testing"
	"time"
)

// Scenario 1: without dualhomed the instance is broken the way a real one is.
// Replies to VPC B's and VPC C's clients follow the main default route out of
// eth0 into VPC A and are lost, while VPC A's client works. This proves the
// probes can fail, so their success in the other scenarios means something.
func TestBeforeDualhomedRepliesLeaveThroughEth0(t *testing.T) {
	w := newWorld(t)
	ps := clientProbes(w, "eth0", "eth1", "eth2")
	results := runAll(ps, time.Second)
	for _, p := range ps {
		errs := results[p.name]
		if p.from == w.VPCs["A"].Client {
			if errs[0] != nil || errs[1] != nil {
				t.Errorf("%s: the primary ENI must work without dualhomed: ping: %v, tcp: %v", p, errs[0], errs[1])
			}
			continue
		}
		if errs[0] == nil {
			t.Errorf("%s: ping succeeded without dualhomed; the world does not reproduce the problem", p)
		}
		if errs[1] == nil {
			t.Errorf("%s: TCP succeeded without dualhomed; the world does not reproduce the problem", p)
		}
		t.Logf("%s fails as expected: ping: %v; tcp: %v", p, errs[0], errs[1])
	}
}
