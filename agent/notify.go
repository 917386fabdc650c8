package agent

import (
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// sdNotify sends state ("READY=1", "STATUS=...") to $NOTIFY_SOCKET, if
// set, and ignores errors: a lost notification must never stop the daemon,
// and systemd notices a missing READY or WATCHDOG by itself.
func sdNotify(state string) { _, _ = daemon.SdNotify(false, state) }

// watchdogInterval returns how often to send WATCHDOG=1 (half of
// $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or 0 when the watchdog
// is off. SdWatchdogEnabled returns 0 with its errors (a malformed
// variable), and a positive interval otherwise.
func watchdogInterval() time.Duration {
	d, _ := daemon.SdWatchdogEnabled(false)
	return d / 2
}
