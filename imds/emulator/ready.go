package emulator

import (
	"bufio"
	"fmt"
	"io"
	"strings"
)

// ReadyLine is what cmd/imds-emulator prints on stdout (and writes to its
// --ready-file) once it serves: "ready listen=<base URL> control=<addr>".
func ReadyLine(baseURL, control string) string {
	return fmt.Sprintf("ready listen=%s control=%s", baseURL, control)
}

// ParseReadyLine reads a ReadyLine back: the IMDS base URL and the control
// address to give DialControl ("" when the process runs without one).
func ParseReadyLine(line string) (baseURL, control string, err error) {
	fields := strings.Fields(line)
	if len(fields) != 3 || fields[0] != "ready" {
		return "", "", fmt.Errorf("parsing emulator ready line %q: want \"ready listen=URL control=ADDR\"", line)
	}
	baseURL, ok1 := strings.CutPrefix(fields[1], "listen=")
	control, ok2 := strings.CutPrefix(fields[2], "control=")
	if !ok1 || !ok2 || baseURL == "" {
		return "", "", fmt.Errorf("parsing emulator ready line %q: want \"ready listen=URL control=ADDR\"", line)
	}
	return baseURL, control, nil
}

// WaitReady reads r (the emulator process's stdout) until the ready line and
// returns what it announces. It fails if r ends first.
func WaitReady(r io.Reader) (baseURL, control string, err error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "ready ") {
			return ParseReadyLine(sc.Text())
		}
	}
	if err := sc.Err(); err != nil {
		return "", "", fmt.Errorf("waiting for emulator ready line: %w", err)
	}
	return "", "", fmt.Errorf("waiting for emulator ready line: output ended first")
}
