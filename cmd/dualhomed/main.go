// Command dualhomed keeps source-based policy routing for the secondary
// (multi-VPC) ENIs of an EC2 instance. This package only parses flags and
// builds things; the logic lives in package agent.
package main

import (
	"os"
)

// version is set at build time: -ldflags "-X main.version=1.2.3".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
