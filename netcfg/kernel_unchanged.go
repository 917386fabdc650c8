package netcfg

// Unchanged reports whether the kernel has announced no change since the
// last Observe: no link, address, rule or route (the local table's aside)
// was added, changed or deleted, no IPv4 device setting such as rp_filter
// changed, and no notification was lost. While it holds, the Observed that
// Observe returned is still the kernel's state, so a caller may use it
// instead of dumping everything again (the daemon's poll does, when IMDS
// brought no news). It is false when the kernel cannot tell (no
// notification socket), after our own Apply, and until the next Observe.
func (k *Kernel) Unchanged() bool {
	_, _, _, ok := k.cache.get()
	return ok
}
