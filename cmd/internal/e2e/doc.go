// Package e2e holds the end-to-end scenarios of dualhomed: real packets, IPv4
// and IPv6, through a simulated dual-homed instance built by simworld, with
// the real dualhomed binary running inside it and the IMDS emulator serving
// it.
//
// Run as root (`sudo make test`); as a user every scenario skips. Each
// scenario builds its own world and tears it down, even when it fails halfway.
package e2e
