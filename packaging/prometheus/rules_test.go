// Package prometheus_test checks the shipped alerting rules
// (dualhomed.rules.yml): promtool accepts them and their unit tests pass, the
// series those tests feed are the ones the daemon exports, every alert is
// tested firing and resolving, and every runbook link lands on a section of
// docs/fleet.md.
package prometheus_test

import (
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/dualhomed/dualhomed/agent"
	"github.com/dualhomed/dualhomed/netcfg"
)

const (
	rulesFile     = "dualhomed.rules.yml"
	rulesTestFile = "dualhomed.rules.test.yml"
	runbookDoc    = "../../docs/fleet.md"
	runbookURL    = "https://github.com/dualhomed/dualhomed/blob/main/docs/fleet.md#"
)

// promtool finds promtool (PROMTOOL, else PATH). Without it the test skips,
// except in CI (CI set), where .ci/run installs it and a skip would hide a
// broken install.
func promtool(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("PROMTOOL"); p != "" {
		return p
	}
	p, err := exec.LookPath("promtool")
	if err == nil {
		return p
	}
	if os.Getenv("CI") != "" {
		t.Fatal("promtool not found in CI: .ci/run installs it from Debian's prometheus package")
	}
	t.Skip("promtool not found: install Debian's prometheus package (or set PROMTOOL) to check the alerting rules")
	return ""
}

func TestPromtoolCheckRules(t *testing.T) {
	out, err := exec.Command(promtool(t), "check", "rules", rulesFile).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check rules %s: %v\n%s", rulesFile, err, out)
	}
}

func TestPromtoolTestRules(t *testing.T) {
	out, err := exec.Command(promtool(t), "test", "rules", rulesTestFile).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool test rules %s: %v\n%s", rulesTestFile, err, out)
	}
}

type rule struct {
	Alert       string            `yaml:"alert"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

func loadRules(t *testing.T) []rule {
	t.Helper()
	var f struct {
		Groups []struct {
			Name  string `yaml:"name"`
			Rules []rule `yaml:"rules"`
		} `yaml:"groups"`
	}
	data, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, &f); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	var rules []rule
	for _, g := range f.Groups {
		rules = append(rules, g.Rules...)
	}
	if len(rules) == 0 {
		t.Fatalf("%s has no rules", rulesFile)
	}
	return rules
}

type ruleTests struct {
	Tests []struct {
		InputSeries []struct {
			Series string `yaml:"series"`
		} `yaml:"input_series"`
		AlertRuleTest []struct {
			EvalTime  string `yaml:"eval_time"`
			AlertName string `yaml:"alertname"`
			ExpAlerts []struct {
				ExpLabels map[string]string `yaml:"exp_labels"`
			} `yaml:"exp_alerts"`
		} `yaml:"alert_rule_test"`
	} `yaml:"tests"`
}

func loadRuleTests(t *testing.T) ruleTests {
	t.Helper()
	var rt ruleTests
	data, err := os.ReadFile(rulesTestFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, &rt); err != nil {
		t.Fatalf("%s: %v", rulesTestFile, err)
	}
	return rt
}

// TestEveryAlertFiresAndResolves: for each alert, some test group expects it
// firing at one time and expects no such alert at a later time.
func TestEveryAlertFiresAndResolves(t *testing.T) {
	rt := loadRuleTests(t)
	for _, r := range loadRules(t) {
		ok := false
		for _, g := range rt.Tests {
			var fired time.Duration = -1
			for _, c := range g.AlertRuleTest {
				if c.AlertName != r.Alert {
					continue
				}
				at, err := time.ParseDuration(c.EvalTime)
				if err != nil {
					t.Fatalf("%s: eval_time %q: %v", rulesTestFile, c.EvalTime, err)
				}
				if len(c.ExpAlerts) > 0 && fired < 0 {
					fired = at
				}
				if len(c.ExpAlerts) == 0 && fired >= 0 && at > fired {
					ok = true
				}
			}
		}
		if !ok {
			t.Errorf("%s: no test group sees %s fire and later resolve", rulesTestFile, r.Alert)
		}
	}
}

// TestAlertsCarryWhatOnCallNeeds: a severity, a summary and a description
// that name the instance and a command to run there, and a runbook link to a
// section of docs/fleet.md named after the alert.
func TestAlertsCarryWhatOnCallNeeds(t *testing.T) {
	doc, err := os.ReadFile(runbookDoc)
	if err != nil {
		t.Fatal(err)
	}
	anchors := markdownAnchors(string(doc))
	for _, r := range loadRules(t) {
		if s := r.Labels["severity"]; s != "critical" && s != "warning" {
			t.Errorf("%s: severity %q, want critical or warning", r.Alert, s)
		}
		if r.Annotations["summary"] == "" {
			t.Errorf("%s: no summary", r.Alert)
		}
		desc := r.Annotations["description"]
		perInstance := !strings.HasPrefix(r.Expr, "absent(")
		if perInstance && (!strings.Contains(desc, "{{ $labels.instance }}") || !strings.Contains(desc, "`")) {
			t.Errorf("%s: the description must name the instance and a command to run there: %q", r.Alert, desc)
		}
		want := runbookURL + strings.ToLower(r.Alert)
		if got := r.Annotations["runbook_url"]; got != want {
			t.Errorf("%s: runbook_url %q, want %q", r.Alert, got, want)
		}
		if !anchors[strings.ToLower(r.Alert)] {
			t.Errorf("%s: %s has no section #%s", r.Alert, runbookDoc, strings.ToLower(r.Alert))
		}
	}
}

// markdownAnchors returns the anchors GitHub makes of a document's headings:
// lower case, punctuation dropped, spaces to hyphens.
func markdownAnchors(doc string) map[string]bool {
	drop := regexp.MustCompile(`[^a-z0-9 _-]`)
	anchors := map[string]bool{}
	for line := range strings.Lines(doc) {
		if !strings.HasPrefix(line, "#") {
			continue
		}
		h := strings.ToLower(strings.TrimSpace(strings.TrimLeft(line, "#")))
		anchors[strings.ReplaceAll(drop.ReplaceAllString(h, ""), " ", "-")] = true
	}
	return anchors
}

// series is one sample's identity: metric name and labels.
type series struct {
	name   string
	labels map[string]string
}

func (s series) String() string {
	keys := make([]string, 0, len(s.labels))
	for k := range s.labels {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	b.WriteString(s.name + "{")
	for i, k := range keys {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, "%s=%q", k, s.labels[k])
	}
	return b.String() + "}"
}

// seriesPattern matches `name{k="v",...}` (the labels optional), as written
// in promtool's input_series and in the text exposition format. Label values
// here never contain quotes or backslashes.
var (
	seriesPattern = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?`)
	labelPattern  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"`)
)

func parseSeries(s string) (series, error) {
	m := seriesPattern.FindStringSubmatch(s)
	if m == nil {
		return series{}, fmt.Errorf("not a series: %q", s)
	}
	out := series{name: m[1], labels: map[string]string{}}
	for _, l := range labelPattern.FindAllStringSubmatch(m[2], -1) {
		out.labels[l[1]] = l[2]
	}
	return out, nil
}

// exported returns every series a daemon's metrics endpoint serves once it
// has reported ENIs in every state, an IMDS error and a repair.
func exported(t *testing.T) []series {
	t.Helper()
	m := agent.NewMetrics(nil)
	var enis []netcfg.ENIStatus
	for _, s := range []netcfg.ENIState{netcfg.ENIConfigured, netcfg.ENIDrift, netcfg.ENIWaitingLink,
		netcfg.ENIWaitingIMDS, netcfg.ENIExcluded, netcfg.ENIPrimaryRole, netcfg.ENIInvalid} {
		enis = append(enis, netcfg.ENIStatus{State: s})
	}
	m.Record(agent.Report{Time: time.Now(), Fresh: true, HaveSnapshot: true, Repairs: 1, ENIs: enis}, nil)
	m.Record(agent.Report{Time: time.Now(), IMDSError: "IMDS unreachable"}, nil)
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	var out []series
	for line := range strings.Lines(rec.Body.String()) {
		if strings.HasPrefix(line, "#") || strings.TrimSpace(line) == "" {
			continue
		}
		s, err := parseSeries(line)
		if err != nil {
			t.Fatalf("exposition: %v", err)
		}
		out = append(out, s)
	}
	return out
}

// Prometheus adds these at scrape time; `up` is its own.
var scrapeLabels = []string{"job", "instance"}

// TestRulesUseExportedSeries: every metric the rules name, and every series
// the rule tests feed (less the scrape's job and instance labels), is one the
// daemon exports, label for label. A renamed metric or state fails here.
func TestRulesUseExportedSeries(t *testing.T) {
	have := exported(t)
	names := map[string]bool{"up": true}
	keys := map[string]bool{}
	for _, s := range have {
		names[s.name] = true
		keys[s.String()] = true
	}
	metricName := regexp.MustCompile(`\b(dualhomed_[a-z_]+|process_[a-z_]+)\b`)
	for _, r := range loadRules(t) {
		for _, n := range metricName.FindAllString(r.Expr, -1) {
			if !names[n] {
				t.Errorf("%s uses %s, which the daemon does not export", r.Alert, n)
			}
		}
	}
	for _, g := range loadRuleTests(t).Tests {
		for _, in := range g.InputSeries {
			s, err := parseSeries(in.Series)
			if err != nil {
				t.Fatalf("%s: %v", rulesTestFile, err)
			}
			for _, l := range scrapeLabels {
				if _, ok := s.labels[l]; !ok {
					t.Errorf("%s: %s lacks the %s label a scrape adds", rulesTestFile, in.Series, l)
				}
				delete(s.labels, l)
			}
			if s.name != "up" && !keys[s.String()] {
				t.Errorf("%s feeds %s, which the daemon does not export", rulesTestFile, s)
			}
		}
	}
}
