package agent

import (
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Notifier sends sd_notify(3) messages to the service manager.
type Notifier interface {
	Notify(state string)
}

// SystemdNotifier talks to $NOTIFY_SOCKET; without it every call is a no-op.
type SystemdNotifier struct{}

// Notify sends state ("READY=1", "STATUS=...") and ignores errors: a lost
// notification must never stop the daemon, and systemd notices a missing
// READY or WATCHDOG by itself.
func (SystemdNotifier) Notify(state string) { _, _ = daemon.SdNotify(false, state) }

// watchdogInterval returns how often to send WATCHDOG=1 (half of
// $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or 0 when the watchdog
// is off. SdWatchdogEnabled returns 0 with its errors (a malformed
// variable), and a positive interval otherwise.
func watchdogInterval() time.Duration {
	d, _ := daemon.SdWatchdogEnabled(false)
	return d / 2
}
