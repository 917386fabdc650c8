package netcfg

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// natChildEnv carries the helper process's orders (natChildOrders, JSON).
const natChildEnv = "DUALHOMED_NAT_CHILD"

type natChildOrders struct {
	StateDir string
	NATs     []NAT
	Start    int // the index of the first NAT to apply
}

// TestNATHelperApplyForever is not a test on its own: TestNATApplyKilledMidBatch
// runs it in a child process, inside the test's namespace (fd 3), where it
// applies the NATs it is given in turn until it is killed.
func TestNATHelperApplyForever(t *testing.T) {
	spec := os.Getenv(natChildEnv)
	if spec == "" {
		t.Skip("helper process of TestNATApplyKilledMidBatch")
	}
	var o natChildOrders
	if err := json.Unmarshal([]byte(spec), &o); err != nil {
		t.Fatal(err)
	}
	k, err := NewKernel(netns.NsHandle(3), o.StateDir, DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		start := time.Now()
		obs, err := k.Observe()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := k.Apply(Diff(obs.Owned, withNAT(obs.Owned, &o.NATs[(o.Start+i)%len(o.NATs)]))); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			// The parent kills at a random moment of the applies that follow.
			fmt.Printf("applied in %d\n", time.Since(start))
		}
	}
}

// TestNATApplyKilledMidBatch kills, with SIGKILL, a process that applies
// three NATs in turn (a change of rules, then two replacements of the whole
// table), at random moments. Each time the table must be exactly one of the
// three: the kernel applies a batch whole or not at all. Then a restart
// (a new Kernel) must converge in one Apply, with no chain or rule twice.
func TestNATApplyKilledMidBatch(t *testing.T) {
	requireNFT(t)
	w := newNATKTWorld(t)
	full, narrow, oneSource := w.nat(), w.nat("10.1.5.0/24"), w.nat()
	oneSource.Sources = oneSource.Sources[:1]
	nats := []NAT{*full, *narrow, *oneSource}
	tables := map[string]int{}
	for i, n := range nats {
		tables[n.table().canon] = i
	}
	fd, err := syscall.Dup(int(w.ns.Handle))
	if err != nil {
		t.Fatal(err)
	}
	nsFile := os.NewFile(uintptr(fd), "netns")
	defer nsFile.Close()

	seen := map[int]int{}
	for i := range 30 {
		spec, err := json.Marshal(natChildOrders{StateDir: w.stateDir, NATs: nats, Start: i % len(nats)})
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^TestNATHelperApplyForever$", "-test.count=1")
		cmd.Env = append(os.Environ(), natChildEnv+"="+string(spec))
		cmd.ExtraFiles = []*os.File{nsFile}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var took time.Duration
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil {
			_, err = fmt.Sscanf(line, "applied in %d\n", &took)
		}
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("helper process did not apply: %q, %v", line, err)
		}
		time.Sleep(time.Duration(rand.Int64N(int64(3 * took))))
		if err := cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		cmd.Wait()
		obs, err := w.k.Observe()
		if err != nil {
			t.Fatal(err)
		}
		which, ok := tables[obs.Owned.NAT.canon]
		if !ok {
			t.Fatalf("after a SIGKILL the table is none of the three NATs:\n%s", w.nftList(t))
		}
		seen[which]++
	}
	if len(seen) < 3 {
		t.Fatalf("every kill found the same table (%v): the kills did not land during applies", seen)
	}
	t.Logf("tables found after the kills (index in the cycle: count): %v", seen)

	restarted, err := NewKernel(w.ns.Handle, w.stateDir, DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer restarted.Close()
	w.k = restarted
	w.apply(t, full)
	if got := w.nftList(t); got != natKTRuleset {
		t.Fatalf("after the restart:\n%s\nwant\n%s", got, natKTRuleset)
	}
	if writes := w.apply(t, full); writes != 0 {
		t.Fatalf("second Apply after the restart: %d writes; want 0", writes)
	}
	if got := w.ns.ReadSysctl(t, "net/ipv4/ip_forward"); got != "1" {
		t.Fatalf("ip_forward = %s after the restart, want 1", got)
	}
	if _, err := restarted.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if got := w.ns.ReadSysctl(t, "net/ipv4/ip_forward"); got != "0" {
		t.Fatalf("ip_forward = %s after Cleanup, want the original 0", got)
	}
}
