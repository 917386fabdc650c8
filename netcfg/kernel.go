package netcfg

import (
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Kernel reads and changes the kernel's routing state in one network namespace,
// through netlink (routes, rules, addresses) and /proc/sys (rp_filter).
type Kernel struct {
	h        *netlink.Handle
	ns       netns.NsHandle // sysctls are per namespace: written from a thread inside it
	stateDir string         // where rp_filter originals are recorded (e.g. /run/dualhomed)
	cfg      Config
}

// NewKernel returns a Kernel acting in namespace ns (netns.None() for the
// caller's namespace), recording state under stateDir.
func NewKernel(ns netns.NsHandle, stateDir string, cfg Config) (*Kernel, error) {
	panic("TODO(netcfg-kernel)")
}

// Close releases the netlink handle.
func (k *Kernel) Close() { panic("TODO(netcfg-kernel)") }

// Observe lists links and every address on them.
func (k *Kernel) Observe() (Observed, error) { panic("TODO(netcfg-kernel)") }

// Owned reads exactly the objects dualhomed owns: routes and rules carrying
// cfg.Protocol in our tables / priority band / main table, addresses carrying
// cfg.Protocol (IFA_PROTO), and rp_filter values we recorded changing.
func (k *Kernel) Owned() (State, error) { panic("TODO(netcfg-kernel)") }

// Apply makes the plan's changes in order and returns the number of netlink and
// sysctl writes made. EEXIST on add and ENOENT/ESRCH on delete count as success.
func (k *Kernel) Apply(p Plan) (writes int, err error) { panic("TODO(netcfg-kernel)") }

// Conflicts inspects foreign kernel state that would defeat desired and
// returns warnings with fix hints. It never changes anything.
func (k *Kernel) Conflicts(desired State) []Warning { panic("TODO(netcfg-kernel)") }
