package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"
)

// A Script is one step of a recipe as its runner would execute it: the
// parameters substituted and the step's commands joined into one script.
type Script struct {
	Phase       string // "main" for SSM; build, validate or test for a component
	Step        string
	Interpreter string // what runs it: SSM runs runShellScript with sh, AWSTOE ExecuteBash with bash
	Body        string
}

// A Recipe is a parsed, checked SSM or AWSTOE document.
type Recipe interface {
	// Scripts renders every step in order, with params (name=value)
	// overriding the defaults.
	Scripts(params map[string]string) ([]Script, error)
}

// Load parses a recipe: a .json file is an SSM Command document, a .yml or
// .yaml file an AWSTOE component document.
func Load(path string) (Recipe, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Recipe
	switch {
	case strings.HasSuffix(path, ".json"):
		r, err = parseSSM(data)
	case strings.HasSuffix(path, ".yml"), strings.HasSuffix(path, ".yaml"):
		r, err = parseComponent(data)
	default:
		err = errors.New("not a .json (SSM) or .yml (AWSTOE) document")
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// parameterRef matches a parameter reference, {{ Name }}, as SSM and AWSTOE
// substitute them (spaces inside the braces optional).
var parameterRef = regexp.MustCompile(`\{\{\s*([A-Za-z0-9_.:-]+)\s*\}\}`)

// substitute replaces every parameter reference in text with its value. A
// reference to an undeclared parameter is an error, as it is for SSM.
func substitute(text string, values map[string]string) (string, error) {
	var missing []string
	out := parameterRef.ReplaceAllStringFunc(text, func(ref string) string {
		name := parameterRef.FindStringSubmatch(ref)[1]
		v, ok := values[name]
		if !ok {
			missing = append(missing, name)
		}
		return v
	})
	if len(missing) > 0 {
		return "", fmt.Errorf("undeclared parameters %v", missing)
	}
	return out, nil
}

// values merges the overrides into the defaults; overriding an undeclared
// parameter is an error.
func values(defaults, overrides map[string]string) (map[string]string, error) {
	v := map[string]string{}
	for k, d := range defaults {
		v[k] = d
	}
	for k, o := range overrides {
		if _, ok := defaults[k]; !ok {
			return nil, fmt.Errorf("no parameter %q", k)
		}
		v[k] = o
	}
	return v, nil
}

// checkUsed reports a declared parameter that no step references: a typo in
// either place.
func checkUsed(declared map[string]string, texts []string) error {
	used := map[string]bool{}
	for _, t := range texts {
		for _, m := range parameterRef.FindAllStringSubmatch(t, -1) {
			used[m[1]] = true
		}
	}
	for name := range declared {
		if !used[name] {
			return fmt.Errorf("parameter %q is never used", name)
		}
	}
	return nil
}

// SSM Command documents, schema 2.2, with the fields AWS documents for them
// ("SSM document schemas and features", "aws:runShellScript"). No
// machine-readable schema is published, so unknown fields are errors here.
type ssmDocument struct {
	SchemaVersion string                  `json:"schemaVersion"`
	Description   string                  `json:"description"`
	Parameters    map[string]ssmParameter `json:"parameters"`
	MainSteps     []ssmStep               `json:"mainSteps"`
}

type ssmParameter struct {
	Type           string `json:"type"`
	Description    string `json:"description"`
	Default        string `json:"default"`
	AllowedPattern string `json:"allowedPattern"`
}

type ssmStep struct {
	Action       string              `json:"action"`
	Name         string              `json:"name"`
	Precondition map[string][]string `json:"precondition"`
	Inputs       struct {
		RunCommand       []string `json:"runCommand"`
		TimeoutSeconds   string   `json:"timeoutSeconds"`
		WorkingDirectory string   `json:"workingDirectory"`
	} `json:"inputs"`
}

var (
	ssmStepName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,100}$`)
	digits      = regexp.MustCompile(`^[0-9]+$`)
)

func parseSSM(data []byte) (*ssmDocument, error) {
	var d ssmDocument
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&d); err != nil {
		return nil, err
	}
	if d.SchemaVersion != "2.2" {
		return nil, fmt.Errorf("schemaVersion %q, want \"2.2\"", d.SchemaVersion)
	}
	if len(d.MainSteps) == 0 {
		return nil, errors.New("no mainSteps")
	}
	defaults := map[string]string{}
	for name, p := range d.Parameters {
		if p.Type != "String" {
			return nil, fmt.Errorf("parameter %s: type %q (only String is used here)", name, p.Type)
		}
		if p.AllowedPattern == "" {
			return nil, fmt.Errorf("parameter %s: no allowedPattern: SSM pastes values into the script as they are", name)
		}
		if err := p.allows(p.Default); err != nil {
			return nil, fmt.Errorf("parameter %s: default: %w", name, err)
		}
		defaults[name] = p.Default
	}
	var texts []string
	seen := map[string]bool{}
	for i, s := range d.MainSteps {
		if !ssmStepName.MatchString(s.Name) || seen[s.Name] {
			return nil, fmt.Errorf("mainSteps[%d]: name %q is not a unique [A-Za-z0-9_.-] name", i, s.Name)
		}
		seen[s.Name] = true
		if s.Action != "aws:runShellScript" {
			return nil, fmt.Errorf("step %s: action %q (only aws:runShellScript is used here)", s.Name, s.Action)
		}
		if len(s.Inputs.RunCommand) == 0 {
			return nil, fmt.Errorf("step %s: no runCommand", s.Name)
		}
		if s.Inputs.TimeoutSeconds != "" && !digits.MatchString(s.Inputs.TimeoutSeconds) {
			return nil, fmt.Errorf("step %s: timeoutSeconds %q", s.Name, s.Inputs.TimeoutSeconds)
		}
		for k, v := range s.Precondition {
			if k != "StringEquals" || len(v) != 2 || v[0] != "platformType" {
				return nil, fmt.Errorf("step %s: precondition %s %v (SSM accepts StringEquals [platformType, ...])", s.Name, k, v)
			}
		}
		texts = append(texts, strings.Join(s.Inputs.RunCommand, "\n"))
	}
	if err := checkUsed(defaults, texts); err != nil {
		return nil, err
	}
	return &d, nil
}

// allows reports whether SSM would accept v for p (allowedPattern is a
// regular expression the whole value must match).
func (p ssmParameter) allows(v string) error {
	re, err := regexp.Compile(p.AllowedPattern)
	if err != nil {
		return fmt.Errorf("allowedPattern: %w", err)
	}
	if !re.MatchString(v) {
		return fmt.Errorf("%q does not match allowedPattern %s", v, p.AllowedPattern)
	}
	return nil
}

func (d *ssmDocument) Scripts(params map[string]string) ([]Script, error) {
	defaults := map[string]string{}
	for name, p := range d.Parameters {
		defaults[name] = p.Default
	}
	v, err := values(defaults, params)
	if err != nil {
		return nil, err
	}
	for name, val := range params {
		if err := d.Parameters[name].allows(val); err != nil {
			return nil, fmt.Errorf("parameter %s: %w", name, err)
		}
	}
	var out []Script
	for _, s := range d.MainSteps {
		body, err := substitute(strings.Join(s.Inputs.RunCommand, "\n")+"\n", v)
		if err != nil {
			return nil, fmt.Errorf("step %s: %w", s.Name, err)
		}
		out = append(out, Script{Phase: "main", Step: s.Name, Interpreter: "sh", Body: body})
	}
	return out, nil
}

// AWSTOE component documents, schema 1.0, with the fields AWS documents for
// them ("Use the AWSTOE component document framework"). Image Builder runs
// the build and validate phases on the build instance and the test phase on
// an instance launched from the new image.
type componentDocument struct {
	Name          string                          `yaml:"name"`
	Description   string                          `yaml:"description"`
	SchemaVersion string                          `yaml:"schemaVersion"`
	Parameters    []map[string]componentParameter `yaml:"parameters"`
	Phases        []componentPhase                `yaml:"phases"`
}

type componentPhase struct {
	Name  string          `yaml:"name"`
	Steps []componentStep `yaml:"steps"`
}

type componentParameter struct {
	Type        string `yaml:"type"`
	Default     string `yaml:"default"`
	Description string `yaml:"description"`
}

type componentStep struct {
	Name   string `yaml:"name"`
	Action string `yaml:"action"`
	Inputs struct {
		Commands []string `yaml:"commands"`
	} `yaml:"inputs"`
}

var componentPhases = []string{"build", "validate", "test"}

func parseComponent(data []byte) (*componentDocument, error) {
	var d componentDocument
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&d); err != nil {
		return nil, err
	}
	if d.SchemaVersion != "1.0" {
		return nil, fmt.Errorf("schemaVersion %q, want 1.0", d.SchemaVersion)
	}
	if d.Name == "" {
		return nil, errors.New("no name")
	}
	defaults, err := d.defaults()
	if err != nil {
		return nil, err
	}
	var texts []string
	seenPhase := map[string]bool{}
	for _, ph := range d.Phases {
		if !slices.Contains(componentPhases, ph.Name) || seenPhase[ph.Name] {
			return nil, fmt.Errorf("phase %q: want each of %v at most once", ph.Name, componentPhases)
		}
		seenPhase[ph.Name] = true
		seenStep := map[string]bool{}
		for _, s := range ph.Steps {
			if s.Name == "" || seenStep[s.Name] {
				return nil, fmt.Errorf("phase %s: step name %q is empty or repeated", ph.Name, s.Name)
			}
			seenStep[s.Name] = true
			if s.Action != "ExecuteBash" {
				return nil, fmt.Errorf("step %s: action %q (only ExecuteBash is used here)", s.Name, s.Action)
			}
			if len(s.Inputs.Commands) == 0 {
				return nil, fmt.Errorf("step %s: no commands", s.Name)
			}
			texts = append(texts, strings.Join(s.Inputs.Commands, "\n"))
		}
	}
	if len(seenPhase) == 0 {
		return nil, errors.New("no phases")
	}
	if err := checkUsed(defaults, texts); err != nil {
		return nil, err
	}
	return &d, nil
}

func (d *componentDocument) defaults() (map[string]string, error) {
	out := map[string]string{}
	for _, entry := range d.Parameters {
		for name, p := range entry {
			if p.Type != "string" {
				return nil, fmt.Errorf("parameter %s: type %q, want string", name, p.Type)
			}
			out[name] = p.Default
		}
	}
	return out, nil
}

func (d *componentDocument) Scripts(params map[string]string) ([]Script, error) {
	defaults, err := d.defaults()
	if err != nil {
		return nil, err
	}
	v, err := values(defaults, params)
	if err != nil {
		return nil, err
	}
	var out []Script
	for _, ph := range d.Phases {
		for _, s := range ph.Steps {
			body, err := substitute(strings.Join(s.Inputs.Commands, "\n"), v)
			if err != nil {
				return nil, fmt.Errorf("step %s: %w", s.Name, err)
			}
			out = append(out, Script{Phase: ph.Name, Step: s.Name, Interpreter: "bash", Body: body})
		}
	}
	return out, nil
}
