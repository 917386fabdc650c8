package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const (
	ssmDoc       = "../../../packaging/rollout/ssm-install-dualhomed.json"
	componentDoc = "../../../packaging/rollout/imagebuilder-dualhomed.yml"
	packerDir    = "../../../packaging/rollout/packer"
)

// TestRecipesParseAndScriptsAreValidShell: both documents pass the checks of
// recipe.go, and every step is valid syntax for the shell that runs it (sh is
// dash on Debian, as strict as SSM's sh gets).
func TestRecipesParseAndScriptsAreValidShell(t *testing.T) {
	for _, doc := range []string{ssmDoc, componentDoc} {
		r, err := Load(doc)
		if err != nil {
			t.Fatal(err)
		}
		scripts, err := r.Scripts(nil)
		if err != nil {
			t.Fatalf("%s: %v", doc, err)
		}
		for _, s := range scripts {
			cmd := exec.Command(s.Interpreter, "-n")
			cmd.Stdin = strings.NewReader(s.Body)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s: step %s: %s -n: %v\n%s", doc, s.Step, s.Interpreter, err, out)
			}
		}
	}
	out, err := exec.Command("sh", "-n", filepath.Join(packerDir, "bake-dualhomed.sh")).CombinedOutput()
	if err != nil {
		t.Errorf("bake-dualhomed.sh: sh -n: %v\n%s", err, out)
	}
}

func TestComponentHasEveryPhase(t *testing.T) {
	r, err := Load(componentDoc)
	if err != nil {
		t.Fatal(err)
	}
	scripts, err := r.Scripts(map[string]string{"PackageSource": "/root/dualhomed.deb"})
	if err != nil {
		t.Fatal(err)
	}
	var phases []string
	for _, s := range scripts {
		phases = append(phases, s.Phase)
		if strings.Contains(s.Body, "{{") {
			t.Errorf("step %s keeps a reference: %s", s.Step, s.Body)
		}
	}
	if got := strings.Join(phases, " "); got != "build validate test" {
		t.Errorf("phases %q, want build validate test", got)
	}
	if !strings.Contains(scripts[0].Body, "src='/root/dualhomed.deb'") {
		t.Errorf("PackageSource not substituted:\n%s", scripts[0].Body)
	}
}

// TestSSMParametersRejectShellInjection: SSM pastes parameter values into the
// script as text; allowedPattern is what keeps a value from becoming code.
func TestSSMParametersRejectShellInjection(t *testing.T) {
	r, err := Load(ssmDoc)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"dualhomed", "dualhomed=1.2.3-1", "dualhomed-1.2.3-1.x86_64",
		"/root/dualhomed_1.2.3+git4.abc-1_amd64.deb", "/var/tmp/dualhomed-0.0.0~git20260101.abc-1.aarch64.rpm"} {
		if _, err := r.Scripts(map[string]string{"PackageSource": v}); err != nil {
			t.Errorf("PackageSource %q refused: %v", v, err)
		}
	}
	for _, v := range []string{"", "x'; reboot; '", "$(reboot)", "`reboot`", "a b", "dualhomed;reboot",
		"-o APT::Get::AllowUnauthenticated=1", "../etc/x.deb", "x\nreboot"} {
		if _, err := r.Scripts(map[string]string{"PackageSource": v}); err == nil {
			t.Errorf("PackageSource %q accepted", v)
		}
	}
	for _, v := range []string{"1; reboot", "-1", "60s", ""} {
		if _, err := r.Scripts(map[string]string{"PlanWaitSeconds": v}); err == nil {
			t.Errorf("PlanWaitSeconds %q accepted", v)
		}
	}
	if _, err := r.Scripts(map[string]string{"Nope": "1"}); err == nil {
		t.Error("an undeclared parameter was accepted")
	}
}

// TestCheckerRejectsBrokenDocuments: the checks that stand in for a schema
// catch the mistakes they are there for.
func TestCheckerRejectsBrokenDocuments(t *testing.T) {
	ssm, err := os.ReadFile(ssmDoc)
	if err != nil {
		t.Fatal(err)
	}
	component, err := os.ReadFile(componentDoc)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, doc, old, new, want string
	}{
		{"ssm unknown field", string(ssm), `"mainSteps"`, `"mainStep"`, "unknown field"},
		{"ssm schema", string(ssm), `"2.2"`, `"1.2"`, "schemaVersion"},
		{"ssm action", string(ssm), `"aws:runShellScript"`, `"aws:runPowerShellScript"`, "action"},
		{"ssm undeclared", string(ssm), `{{ PlanWaitSeconds }}`, `{{ PlanWait }}`, "never used"},
		{"ssm default refused", string(ssm), `"default": "60"`, `"default": "1m"`, "allowedPattern"},
		{"ssm input typo", string(ssm), `"runCommand"`, `"runCommands"`, "unknown field"},
		{"component unknown field", string(component), "\n    steps:", "\n    step:", "not found"},
		{"component phase", string(component), "- name: validate", "- name: verify", "phase"},
		{"component action", string(component), "action: ExecuteBash", "action: ExecuteBinary", "action"},
		{"component undeclared", string(component), "{{ PackageSource }}", "{{ Package }}", "never used"},
	} {
		if !strings.Contains(c.doc, c.old) {
			t.Fatalf("%s: %q not in the document", c.name, c.old)
		}
		broken := strings.Replace(c.doc, c.old, c.new, 1)
		var err error
		if strings.HasPrefix(c.name, "ssm") {
			_, err = parseSSM([]byte(broken))
		} else {
			_, err = parseComponent([]byte(broken))
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want one that says %q", c.name, err, c.want)
		}
	}
}

// TestSSMScriptOutcomes runs the SSM step against stand-ins for apt-get,
// systemctl and dualhomed: the command starts an enabled service that is not
// running, succeeds only when plan exits 0 and the service is active, and
// prints the plan when it fails. (packaging/check.sh
// runs the same step against the real package in a booted container.)
func TestSSMScriptOutcomes(t *testing.T) {
	r, err := Load(ssmDoc)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name        string
		planCodes   string // exit codes of successive `dualhomed plan` runs
		enabled     string // systemctl is-enabled
		active      string // systemctl is-active before any start
		wait        string
		wantOK      bool
		wantInError string
		wantStart   bool
	}{
		{"in sync", "0", "enabled", "active", "0", true, "", false},
		{"pending", "2", "enabled", "active", "0", false, "dualhomed plan exited 2", false},
		{"pending until the first reconcile", "2 0", "enabled", "active", "10", true, "", false},
		{"error", "1", "enabled", "active", "0", false, "dualhomed plan exited 1", false},
		{"enabled, stopped: started", "0", "enabled", "inactive", "0", true, "", true},
		{"disabled, stopped: left alone", "0", "disabled", "inactive", "0", false, "dualhomed.service is inactive", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			bin := t.TempDir()
			stub := func(name, body string) {
				if err := os.WriteFile(filepath.Join(bin, name), []byte("#!/bin/sh\n"+body), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			stub("apt-get", `echo "apt-get $*" >>"$STUB_LOG"`+"\n")
			stub("systemctl", `case $1 in
is-enabled) echo "$STUB_ENABLED"; [ "$STUB_ENABLED" = enabled ] ;;
is-active) state=$(cat "$STUB_ACTIVE"); [ "$2" = --quiet ] || echo "$state"; [ "$state" = active ] ;;
start) echo "systemctl $*" >>"$STUB_LOG"; echo active >"$STUB_ACTIVE" ;;
*) echo "systemctl $*" ;;
esac
`)
			stub("dualhomed", `case $1 in
version) echo v1.2.3 ;;
status) echo "STATUS TABLE" ;;
plan)
	set -- $(cat "$STUB_PLAN")
	code=$1; shift; [ $# -gt 0 ] && echo "$*" >"$STUB_PLAN"
	echo "PLAN OUTPUT exit $code"; exit "$code" ;;
esac
`)
			dir := t.TempDir()
			planFile, logFile, activeFile := filepath.Join(dir, "plan"), filepath.Join(dir, "log"), filepath.Join(dir, "active")
			for path, content := range map[string]string{planFile: c.planCodes, activeFile: c.active} {
				if err := os.WriteFile(path, []byte(content+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			scripts, err := r.Scripts(map[string]string{"PackageSource": "/root/dualhomed.deb", "PlanWaitSeconds": c.wait})
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command("sh", "-c", scripts[0].Body)
			cmd.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"), "STUB_PLAN="+planFile,
				"STUB_LOG="+logFile, "STUB_ACTIVE="+activeFile, "STUB_ENABLED="+c.enabled)
			var stdout, stderr strings.Builder
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err = cmd.Run()
			if (err == nil) != c.wantOK {
				t.Fatalf("err = %v, want ok=%v\nstdout:\n%s\nstderr:\n%s", err, c.wantOK, stdout.String(), stderr.String())
			}
			if !strings.Contains(stdout.String(), "PLAN OUTPUT") {
				t.Errorf("the plan was not printed:\n%s", stdout.String())
			}
			if !strings.Contains(stderr.String(), c.wantInError) {
				t.Errorf("stderr lacks %q:\n%s", c.wantInError, stderr.String())
			}
			log, _ := os.ReadFile(logFile)
			if started := strings.Contains(string(log), "systemctl start dualhomed.service"); started != c.wantStart {
				t.Errorf("started the service: %v, want %v", started, c.wantStart)
			}
			if !strings.Contains(string(log), "install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold /root/dualhomed.deb") ||
				strings.Contains(string(log), "update") {
				t.Errorf("apt-get calls:\n%s", log)
			}
		})
	}
}

// TestPackerTemplateValidates runs `packer validate` (Debian's packer 1.6.6
// in CI) on the template with its variables set.
func TestPackerTemplateValidates(t *testing.T) {
	packer, err := exec.LookPath("packer")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("packer not found in CI: .ci/run installs Debian's packer package")
		}
		t.Skip("packer not found: install Debian's packer package to validate packaging/rollout/packer")
	}
	pkg := filepath.Join(t.TempDir(), "dualhomed_1.2.3-1_amd64.deb")
	if err := os.WriteFile(pkg, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(packer, "validate", "-var", "source_ami=ami-0123456789abcdef0", "-var", "package="+pkg, "dualhomed.pkr.hcl")
	cmd.Dir = packerDir
	cmd.Env = append(os.Environ(), "CHECKPOINT_DISABLE=1", "PACKER_LOG=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("packer validate: %v\n%s", err, out)
	}
}

func TestExtractWritesOneScriptPerStep(t *testing.T) {
	out := t.TempDir()
	if err := run([]string{"extract", "-out", out, "-param", "PackageSource=/root/x.deb", componentDoc}); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(out, "*.sh"))
	if len(files) != 3 || !strings.HasSuffix(files[0], "01-build-InstallEnabledNotStarted.sh") {
		t.Fatalf("files %v", files)
	}
	data, _ := os.ReadFile(files[0])
	if !strings.HasPrefix(string(data), "#!/bin/bash\nset -euo pipefail\nsrc='/root/x.deb'\n") {
		t.Errorf("script starts %q", string(data)[:60])
	}
	if err := run([]string{"extract", "-out", out, "-param", "PackageSource=a b", ssmDoc}); err == nil {
		t.Error("a value outside allowedPattern was extracted")
	}
}
