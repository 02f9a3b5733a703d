package initcmd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"github.com/egress-cni/egress-cni/pkg/rules"
)

// LogOptions are pilot-agent's logging flags, mapped onto our logger.
// Istio's logger has scopes; egress-init has one, which the "default"
// scope (or "all") sets.
type LogOptions struct {
	// Level is the minimum level; Off means --log_output_level=none.
	Level slog.Level
	Off   bool
	JSON  bool
	// Caller adds the source position (--log_caller=default).
	Caller bool
	// Targets: stdout, stderr or file paths; none means stderr.
	Targets []string
}

// levelNone is above every level we log at.
const levelNone = slog.Level(100)

func parseLevel(field, v string) (slog.Level, error) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error", "fatal":
		return slog.LevelError, nil
	case "none":
		return levelNone, nil
	}
	return 0, &rules.FieldError{Field: field, Value: v, Reason: "level must be debug, info, warn, error, fatal or none"}
}

// scopeLevels parses "<scope>:<level>,..." (a bare level applies to the
// default scope) and returns the level of our scope, if given.
func scopeLevels(field, v string) (lvl slog.Level, ok bool, err error) {
	if strings.TrimSpace(v) == "" {
		return 0, false, nil
	}
	for _, item := range strings.Split(v, ",") {
		scope, level, has := strings.Cut(strings.TrimSpace(item), ":")
		if !has {
			scope, level = "default", scope
		}
		l, err := parseLevel(field, level)
		if err != nil {
			reason := err.Error()
			if fe, ok := errors.AsType[*rules.FieldError](err); ok {
				reason = fe.Reason
			}
			return 0, false, &rules.FieldError{Field: field, Value: item, Reason: reason}
		}
		if scope == "default" || scope == "all" {
			lvl, ok = l, true
		}
	}
	return lvl, ok, nil
}

func parseLogOptions(values map[string]string) (LogOptions, error) {
	o := LogOptions{Level: slog.LevelInfo}
	lvl, ok, err := scopeLevels(optLogOutputLevel, values[optLogOutputLevel])
	if err != nil {
		return o, err
	}
	if ok {
		o.Level, o.Off = lvl, lvl == levelNone
	}
	if _, _, err := scopeLevels(optLogStacktraceLevel, values[optLogStacktraceLevel]); err != nil {
		return o, err
	}
	if o.JSON, err = boolOpt(values, optLogAsJSON); err != nil {
		return o, err
	}
	for _, s := range strings.Split(values[optLogCaller], ",") {
		if s = strings.TrimSpace(s); s == "default" || s == "all" {
			o.Caller = true
		}
	}
	for _, t := range strings.Split(values[optLogTarget], ",") {
		if t = strings.TrimSpace(t); t != "" {
			o.Targets = append(o.Targets, t)
		}
	}
	if v := strings.TrimSpace(values[optVKlog]); v != "" {
		if _, err := strconv.Atoi(v); err != nil {
			return o, &rules.FieldError{Field: optVKlog, Value: v, Reason: "must be an integer"}
		}
	}
	return o, nil
}

// logger builds the logger. stdout and stderr are the process's (or the
// test's) streams; file targets are opened for appending and returned
// for closing.
func (o LogOptions) logger(stdout, stderr io.Writer) (*slog.Logger, []io.Closer, error) {
	var ws []io.Writer
	var closers []io.Closer
	for _, t := range o.Targets {
		switch t {
		case "stdout":
			ws = append(ws, stdout)
		case "stderr":
			ws = append(ws, stderr)
		default:
			f, err := os.OpenFile(t, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
			if err != nil {
				return nil, closers, fmt.Errorf("--%s %s: %w", optLogTarget, t, err)
			}
			ws = append(ws, f)
			closers = append(closers, f)
		}
	}
	if len(ws) == 0 {
		ws = []io.Writer{stderr}
	}
	w := io.MultiWriter(ws...)
	lvl := o.Level
	if o.Off {
		lvl = levelNone
	}
	hopts := &slog.HandlerOptions{Level: lvl, AddSource: o.Caller}
	var h slog.Handler
	if o.JSON {
		h = slog.NewJSONHandler(w, hopts)
	} else {
		h = &textHandler{w: w, level: lvl}
	}
	return slog.New(h), closers, nil
}

// textHandler writes "egress-init: <message> key=value ...", the plain
// form egress-init has always printed.
type textHandler struct {
	w     io.Writer
	level slog.Level
	attrs []slog.Attr
}

func (h *textHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level }

func (h *textHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString("egress-init: ")
	if r.Level >= slog.LevelWarn {
		b.WriteString(strings.ToLower(r.Level.String()))
		b.WriteString(": ")
	}
	b.WriteString(r.Message)
	write := func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	}
	for _, a := range h.attrs {
		write(a)
	}
	r.Attrs(write)
	b.WriteByte('\n')
	_, err := io.WriteString(h.w, b.String())
	return err
}

func (h *textHandler) WithAttrs(as []slog.Attr) slog.Handler {
	n := *h
	n.attrs = append(append([]slog.Attr{}, h.attrs...), as...)
	return &n
}

func (h *textHandler) WithGroup(string) slog.Handler { return h }
