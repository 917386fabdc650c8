// Package chaos is dualhomed's fault-injection suite: the real dualhomed
// binary runs inside a simulated dual-homed instance (cmd/internal/simworld),
// served by the IMDS emulator, while the tests break things around them.
//
//   - IMDS faults (500, 429, latency, dropped connections, token expiry,
//     pending MACs, device-number 0, malformed values, rules deleted or the
//     daemon restarted while IMDS fails): nothing that works is removed, the
//     request rate stays within the client's retry budget (requestBound), and
//     the daemon converges once IMDS recovers.
//   - Crashes: SIGKILL of `apply`, `daemon` and `cleanup` at seeded random
//     points of a large apply; a restart converges to exactly the state of an
//     uninterrupted apply, foreign objects included.
//   - Fights: other programs deleting our rules, flushing our tables, renaming
//     or deleting links, and owning the routes we want; the daemon stays
//     correct where it can, backs off, and uses little CPU.
//   - Event storms: 1,000 link flaps; memory stays bounded and reconciles
//     coalesce.
//   - Bad input: command-line misuse and unusable configuration files fail
//     clearly and change nothing.
//
// Throughout, a TCP stream and a ping through the primary ENI (eth0) must not
// lose a single packet.
//
// `make test` runs the short form; `make chaos` sets CHAOS_LONG=1 for more
// iterations and longer fault windows. Every random choice comes from one
// seed, printed at the start; CHAOS_SEED=<n> replays a run. Tests need root
// (network namespaces) and skip otherwise. Figures (requests per second, CPU,
// reconcile counts, memory) are printed with t.Logf: run with -v to see them.
package chaos
