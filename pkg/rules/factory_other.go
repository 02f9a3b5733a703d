//go:build !linux

package rules

import (
	"errors"
	"fmt"
	"runtime"
)

// errNotLinux is what every backend constructor returns off Linux: the
// backends program Linux network namespaces, and nothing else can hold
// the rules.
var errNotLinux = fmt.Errorf("the %s, %s and %s backends program Linux network namespaces; not available on %s: %w",
	BackendNFTables, BackendIPTablesNFT, BackendIPTablesLegacy, runtime.GOOS, errors.ErrUnsupported)

// NewBackend fails off Linux; see the package documentation.
func NewBackend(BackendName, BackendOptions) (Backend, error) { return nil, errNotLinux }

// Detect fails off Linux; see the package documentation.
func Detect() (BackendName, error) { return "", errNotLinux }
