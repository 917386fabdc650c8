// Command imds-emulator runs the dualhomed IMDS emulator (package
// imds/emulator) as a process, for end-to-end tests and the demo: typically
// on 169.254.169.254:80 inside a test network namespace.
//
//	imds-emulator --listen 127.0.0.1:8111 --control unix:/run/imds-ctl.sock --instance inst.json
//
// When it serves, it prints "ready listen=<URL> control=<addr>" on stdout
// (and writes it to --ready-file). It exits cleanly on SIGTERM or SIGINT.
// Drive it with emulator.DialControl(addr).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/dualhomed/dualhomed/imds/emulator"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	fs := flag.NewFlagSet("imds-emulator", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:8111", "address to serve IMDS on (host:port; port 0 picks one)")
	control := fs.String("control", "", "control channel address: unix:/path.sock or host:port (none when empty)")
	instanceFile := fs.String("instance", "", "initial instance as JSON (emulator.Instance); default: --example")
	example := fs.String("example", "2,2,2,1,1", "initial instance from emulator.ExampleInstance: ENIs,IPv4s,IPv6s,prefixes,cards")
	readyFile := fs.String("ready-file", "", "also write the ready line to this file once serving")
	dump := fs.Bool("dump", false, "print the initial instance as JSON (a starting point for --instance) and exit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "imds-emulator: unexpected arguments %q\n", fs.Args())
		return 2
	}

	var inst emulator.Instance
	if *instanceFile != "" {
		var err error
		if inst, err = emulator.LoadInstance(*instanceFile); err != nil {
			fmt.Fprintf(os.Stderr, "imds-emulator: %v\n", err)
			return 2
		}
	} else {
		n, err := parseExample(*example)
		if err != nil {
			fmt.Fprintf(os.Stderr, "imds-emulator: --example %q: %v\n", *example, err)
			return 2
		}
		inst = emulator.ExampleInstance(n[0], n[1], n[2], n[3], n[4])
	}

	if *dump {
		out, _ := json.MarshalIndent(inst, "", "  ")
		fmt.Println(string(out))
		return 0
	}

	srv := emulator.New(inst)
	defer srv.Close()
	baseURL, err := srv.Start(*listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "imds-emulator: %v\n", err)
		return 1
	}
	ctl := ""
	if *control != "" {
		if ctl, err = srv.StartControl(*control); err != nil {
			fmt.Fprintf(os.Stderr, "imds-emulator: %v\n", err)
			return 1
		}
	}

	// Subscribe before announcing readiness, so a SIGTERM sent right after
	// the ready line is never lost.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)

	line := emulator.ReadyLine(baseURL, ctl)
	if *readyFile != "" {
		// Write then rename, so a watcher never reads half a line.
		tmp := *readyFile + ".tmp"
		err := os.WriteFile(tmp, []byte(line+"\n"), 0o644)
		if err == nil {
			err = os.Rename(tmp, *readyFile)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "imds-emulator: writing ready file: %v\n", err)
			return 1
		}
	}
	fmt.Println(line)

	<-sig
	if err := srv.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "imds-emulator: closing: %v\n", err)
	}
	if strings.HasPrefix(ctl, "unix:") {
		os.Remove(strings.TrimPrefix(ctl, "unix:"))
	}
	return 0
}

func parseExample(s string) ([5]int, error) {
	var n [5]int
	parts := strings.Split(s, ",")
	if len(parts) > 5 {
		return n, fmt.Errorf("want at most 5 comma-separated numbers")
	}
	n[4] = 1
	for i, p := range parts {
		v, err := strconv.Atoi(strings.TrimSpace(p))
		if err != nil || v < 0 {
			return n, fmt.Errorf("field %d: %q is not a non-negative integer", i+1, p)
		}
		n[i] = v
	}
	if n[0] > 256 {
		return n, fmt.Errorf("at most 256 ENIs")
	}
	return n, nil
}
