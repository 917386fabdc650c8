package agent

import (
	"fmt"
	"os"
	"strings"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sys/unix"
)

// The values log.level and log.format (and their flags) accept.
var (
	LogLevels  = []string{"debug", "info", "warn", "error"}
	LogFormats = []string{"auto", "json", "console"}
)

// NewLogger builds the daemon's logger. Format "auto" picks JSON under
// systemd (JOURNAL_STREAM or INVOCATION_ID set) or when stderr is not a
// terminal, and a readable console encoding on a terminal. The returned level
// can be changed later (on reload).
func NewLogger(level, format string) (*zap.Logger, zap.AtomicLevel, error) {
	lvl, err := zap.ParseAtomicLevel(level)
	if err != nil {
		return nil, lvl, fmt.Errorf("log level %q is not one of %s", level, strings.Join(LogLevels, ", "))
	}
	if format == "" || format == "auto" {
		format = "console"
		if os.Getenv("JOURNAL_STREAM") != "" || os.Getenv("INVOCATION_ID") != "" || !isTerminal(os.Stderr) {
			format = "json"
		}
	}
	var enc zapcore.Encoder
	switch format {
	case "json":
		ec := zap.NewProductionEncoderConfig()
		ec.EncodeTime = zapcore.ISO8601TimeEncoder
		ec.EncodeDuration = zapcore.StringDurationEncoder // "15s", not 15
		enc = zapcore.NewJSONEncoder(ec)
	case "console":
		ec := zap.NewDevelopmentEncoderConfig()
		ec.EncodeTime = zapcore.TimeEncoderOfLayout("15:04:05.000")
		ec.EncodeLevel = zapcore.CapitalColorLevelEncoder
		if !isTerminal(os.Stderr) {
			ec.EncodeLevel = zapcore.CapitalLevelEncoder
		}
		enc = zapcore.NewConsoleEncoder(ec)
	default:
		return nil, lvl, fmt.Errorf("log format %q is not one of %s", format, strings.Join(LogFormats, ", "))
	}
	core := zapcore.NewCore(enc, zapcore.Lock(os.Stderr), lvl)
	return zap.New(core), lvl, nil
}

// ChangeFields are the fields of a "changed" log line, the same on every
// line so that a fleet's logs can be searched by them (docs/fleet.md).
func ChangeFields(c Change) []zap.Field {
	return []zap.Field{zap.String("eni", c.ENI), zap.String("link", c.Link), zap.Int("table", c.Table),
		zap.String("op", c.Op.Action()), zap.String("object", c.Op.Object()), zap.String("text", c.Text)}
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
