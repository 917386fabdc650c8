// Command rollout checks the rollout recipes of packaging/rollout (an SSM
// Command document and an EC2 Image Builder component) and writes out their
// steps as the SSM Agent and AWSTOE would run them, so that
// packaging/check.sh can run them in its booted container:
//
//	rollout extract -out DIR [-param NAME=VALUE]... DOCUMENT
//
// writes DIR/NN-PHASE-STEP.sh, one executable script per step in order, with
// the parameters substituted (defaults for those not given) and the runner's
// interpreter as shebang, and prints their paths. Neither AWS publishes a
// machine-readable schema for these documents; the checks are in recipe.go.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

type paramFlags map[string]string

func (p paramFlags) String() string { return fmt.Sprint(map[string]string(p)) }

func (p paramFlags) Set(s string) error {
	name, value, ok := strings.Cut(s, "=")
	if !ok || name == "" {
		return fmt.Errorf("%q is not NAME=VALUE", s)
	}
	p[name] = value
	return nil
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "rollout:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 || args[0] != "extract" {
		return fmt.Errorf("usage: rollout extract -out DIR [-param NAME=VALUE]... DOCUMENT")
	}
	fs := flag.NewFlagSet("extract", flag.ContinueOnError)
	out := fs.String("out", "", "directory to write the step scripts into")
	params := paramFlags{}
	fs.Var(params, "param", "NAME=VALUE: a document parameter (repeatable)")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *out == "" || fs.NArg() != 1 {
		return fmt.Errorf("usage: rollout extract -out DIR [-param NAME=VALUE]... DOCUMENT")
	}
	recipe, err := Load(fs.Arg(0))
	if err != nil {
		return err
	}
	scripts, err := recipe.Scripts(params)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	for i, s := range scripts {
		path := filepath.Join(*out, fmt.Sprintf("%02d-%s-%s.sh", i+1, s.Phase, s.Step))
		body := "#!/bin/" + s.Interpreter + "\n" + s.Body
		if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
			return err
		}
		fmt.Println(path)
	}
	return nil
}
