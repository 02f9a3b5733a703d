package cni

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
)

// openLog returns the invocation's logger. It never fails: a log file
// that cannot be opened falls back to stderr (which the runtime records),
// because logging must never be the reason a pod does not start. It never
// writes to stdout, which carries only the CNI result.
//
// s may be nil when the config did not parse; the log settings are then
// read leniently from stdin so that the parse error itself gets logged
// where the operator looks.
func openLog(s *Settings, stdin []byte) (*slog.Logger, func()) {
	file, level := DefaultLogFile, DefaultLogLevel
	if s != nil {
		file, level = s.LogFile, s.LogLevel
	} else {
		var lenient struct {
			LogFile  *string `json:"logFile"`
			LogLevel *string `json:"logLevel"`
		}
		if json.Unmarshal(stdin, &lenient) == nil {
			if lenient.LogFile != nil {
				file = *lenient.LogFile
			}
			if lenient.LogLevel != nil {
				level = *lenient.LogLevel
			}
		}
	}
	lvl, err := parseLevel(level)
	if err != nil {
		lvl = slog.LevelInfo
	}
	var w io.Writer
	closeFn := func() {}
	switch file {
	case "":
		return slog.New(slog.DiscardHandler), closeFn
	case "stderr":
		w = os.Stderr
	default:
		// O_APPEND makes each record (one write per record) land whole
		// even with many plugin processes logging at once.
		if dir := filepath.Dir(file); dir != "" {
			_ = os.MkdirAll(dir, 0o755)
		}
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err != nil {
			fmt.Fprintf(os.Stderr, "egress-cni: could not open log file %s, logging to stderr: %v\n", file, err)
			w = os.Stderr
		} else {
			w = f
			closeFn = func() { _ = f.Close() }
		}
	}
	h := slog.NewJSONHandler(w, &slog.HandlerOptions{Level: lvl})
	return slog.New(h).With("pid", os.Getpid()), closeFn
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(strings.TrimSpace(s))); err != nil {
		return 0, fmt.Errorf("must be debug, info, warn or error")
	}
	return l, nil
}
