// Package netns runs code inside a network namespace given by path. It is
// a thin layer over containernetworking/plugins' pkg/ns, which owns the
// setns and OS-thread locking; we add only error classification.
package netns

import (
	"errors"
	"fmt"

	"github.com/containernetworking/plugins/pkg/ns"
)

// Do runs fn on a locked OS thread inside the network namespace at path
// (for example /var/run/netns/NAME or /proc/PID/ns/net). An empty path
// means the caller's current namespace. Processes that fn starts with
// os/exec inherit the namespace, so iptables-restore runs there too.
func Do(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	netNS, err := ns.GetNS(path)
	if err != nil {
		var notExist ns.NSPathNotExistErr
		var notNS ns.NSPathNotNSErr
		// A path that is no longer a namespace mount (the runtime removed
		// the bind mount but left the file) is as gone as a missing one.
		if errors.As(err, &notExist) || errors.As(err, &notNS) {
			return &NotExistError{Path: path, Err: err}
		}
		return fmt.Errorf("could not open network namespace %s: %w", path, err)
	}
	defer netNS.Close()
	return netNS.Do(func(ns.NetNS) error { return fn() })
}

// NotExistError says the namespace path does not exist (any more). A CNI
// DEL treats it as success: there is nothing left to clean up.
type NotExistError struct {
	Path string
	Err  error
}

func (e *NotExistError) Error() string {
	return fmt.Sprintf("network namespace %s does not exist: %v", e.Path, e.Err)
}

func (e *NotExistError) Unwrap() error { return e.Err }

// IsNotExist reports whether err says the namespace is gone.
func IsNotExist(err error) bool {
	var e *NotExistError
	return errors.As(err, &e)
}
