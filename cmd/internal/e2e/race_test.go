//go:build race

package e2e

// raceEnabled: the tests run with -race, so the programs under test are
// built with it too and a data race in the daemon fails the scenario.
const raceEnabled = true
