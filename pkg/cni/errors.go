package cni

import (
	"errors"

	"github.com/containernetworking/cni/pkg/types"
)

// codedError carries the CNI error code an error should be reported with,
// while keeping the typed cause (*ConfigError, *rules.DriftError…)
// reachable with errors.As for tests and logs.
type codedError struct {
	code    uint
	err     error
	details string
}

func (e *codedError) Error() string { return e.err.Error() }
func (e *codedError) Unwrap() error { return e.err }

// withCode wraps err so that the caller reports it with code.
func withCode(code uint, err error, details string) error {
	return &codedError{code: code, err: err, details: details}
}

// Code returns the CNI error code err will be reported with.
func Code(err error) uint {
	var te *types.Error
	if errors.As(err, &te) {
		return te.Code
	}
	var ce *codedError
	if errors.As(err, &ce) {
		return ce.code
	}
	return types.ErrInternal
}

// toCNIError converts err into the *types.Error that skel prints, so the
// runtime sees our code rather than 999 for everything.
func toCNIError(err error) error {
	if err == nil {
		return nil
	}
	var te *types.Error
	if errors.As(err, &te) {
		return te
	}
	var ce *codedError
	if errors.As(err, &ce) {
		return types.NewError(ce.code, err.Error(), ce.details)
	}
	return types.NewError(types.ErrInternal, err.Error(), "")
}
