// Command imds-emulator runs the dualhomed IMDS emulator (package
// imds/emulator) as a process, for tests and checks that run dualhomed as
// a system would (the coexistence matrix, packaging/check.sh): typically on
// 169.254.169.254:80 inside a test network namespace.
//
//	imds-emulator --listen 169.254.169.254:80 --example 2,1,0,0,1
//
// When it serves, it prints "ready listen=<URL>" on stdout. It exits
// cleanly on SIGTERM or SIGINT.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/dualhomed/dualhomed/imds/emulator"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	fs := flag.NewFlagSet("imds-emulator", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:8111", "address to serve IMDS on (host:port; port 0 picks one)")
	example := fs.String("example", "2,2,2,1,1", "the instance, from emulator.ExampleInstance: ENIs,IPv4s,IPv6s,prefixes,cards")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "imds-emulator: unexpected arguments %q\n", fs.Args())
		return 2
	}
	var n [5]int
	_, err := fmt.Sscanf(*example, "%d,%d,%d,%d,%d", &n[0], &n[1], &n[2], &n[3], &n[4])
	if err != nil || min(n[0], n[1], n[2], n[3], n[4]) < 0 || n[0] > 256 {
		fmt.Fprintf(os.Stderr, "imds-emulator: --example %q: want five non-negative numbers, at most 256 ENIs\n", *example)
		return 2
	}

	srv := emulator.New(emulator.ExampleInstance(n[0], n[1], n[2], n[3], n[4]))
	defer srv.Close()
	baseURL, err := srv.Start(*listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "imds-emulator: %v\n", err)
		return 1
	}
	// Subscribe before announcing readiness, so a SIGTERM sent right after
	// the ready line is never lost.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	fmt.Printf("ready listen=%s\n", baseURL)
	<-sig
	if err := srv.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "imds-emulator: closing: %v\n", err)
	}
	return 0
}
