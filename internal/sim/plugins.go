package sim

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
)

// ReferencePlugins are the primary CNI's plugins every simulated node
// runs: bridge (or ptp, for the routed topology) with host-local IPAM,
// and loopback (which containerd runs as a network of its own).
var ReferencePlugins = []string{"bridge", "host-local", "loopback", "ptp"}

const (
	pluginsModule = "github.com/containernetworking/plugins"
	cniModule     = "github.com/containernetworking/cni"
	stampFile     = ".versions"
)

// pluginVersions returns the versions of containernetworking/plugins and
// cni this binary was built with (the ones go.mod pins).
func pluginVersions() (plugins, cni string, err error) {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "", "", errors.New("no build information in this binary")
	}
	for _, d := range bi.Deps {
		if d.Replace != nil {
			d = d.Replace
		}
		switch d.Path {
		case pluginsModule:
			plugins = d.Version
		case cniModule:
			cni = d.Version
		}
	}
	if plugins == "" || cni == "" {
		// A test binary carries no dependency list: ask the go command
		// about the module of the working directory.
		if plugins, cni = goListVersion(pluginsModule), goListVersion(cniModule); plugins == "" || cni == "" {
			return "", "", fmt.Errorf("build information lacks %s or %s", pluginsModule, cniModule)
		}
	}
	return plugins, cni, nil
}

// goListVersion is the version of mod that the main module of the
// working directory requires, or "".
func goListVersion(mod string) string {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}", mod).Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

// EnsureReferencePlugins makes sure dir holds bridge, host-local,
// loopback and ptp built from the module cache at the versions of
// containernetworking/plugins and cni this binary was built with. A dir
// that already holds them for those versions is used as is (built is
// false). Otherwise they are built with the go command in a throwaway
// module (our go.sum does not cover their extra dependencies), into a
// temporary directory next to dir, and moved in; the version stamp is
// written last, so an interrupted build is redone.
func EnsureReferencePlugins(ctx context.Context, dir string) (built bool, err error) {
	pv, cv, err := pluginVersions()
	if err != nil {
		return false, err
	}
	stamp := fmt.Sprintf("%s %s\n%s %s\n", pluginsModule, pv, cniModule, cv)
	if b, err := os.ReadFile(filepath.Join(dir, stampFile)); err == nil && string(b) == stamp {
		complete := true
		for _, p := range ReferencePlugins {
			if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
				complete = false
			}
		}
		if complete {
			return false, nil
		}
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		if _, serr := os.Stat("/usr/local/go/bin/go"); serr != nil {
			return false, fmt.Errorf("the go command is needed to build the CNI reference plugins: %w", err)
		}
		goBin = "/usr/local/go/bin/go"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return false, err
	}
	_ = os.Remove(filepath.Join(dir, stampFile))
	mod, err := os.MkdirTemp("", "egress-sim-refplugins-")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(mod)
	out, err := os.MkdirTemp(filepath.Dir(filepath.Clean(dir)), ".cni-plugins-build-")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(out)
	gomod := fmt.Sprintf("module egress-cni.sim/refplugins\n\ngo 1.24\n\nrequire (\n\t%s %s\n\t%s %s\n)\n", pluginsModule, pv, cniModule, cv)
	if err := os.WriteFile(filepath.Join(mod, "go.mod"), []byte(gomod), 0o644); err != nil {
		return false, err
	}
	args := []string{"build", "-trimpath", "-o", out + "/"}
	for _, p := range []string{"main/bridge", "ipam/host-local", "main/loopback", "main/ptp"} {
		args = append(args, pluginsModule+"/plugins/"+p)
	}
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Dir = mod
	// -mod=mod lets go record the extra modules' sums in the throwaway
	// go.sum; a GOFLAGS of the caller (-mod=vendor…) must not apply.
	var env []string
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "GOFLAGS=") && !strings.HasPrefix(e, "GOWORK=") && !strings.HasPrefix(e, "CGO_ENABLED=") {
			env = append(env, e)
		}
	}
	cmd.Env = slices.Concat(env, []string{"GOFLAGS=-mod=mod -buildvcs=false", "GOWORK=off", "CGO_ENABLED=0"})
	if b, err := cmd.CombinedOutput(); err != nil {
		return false, fmt.Errorf("go build of the CNI reference plugins %s: %w\n%s", pv, err, b)
	}
	for _, p := range ReferencePlugins {
		if err := os.Rename(filepath.Join(out, p), filepath.Join(dir, p)); err != nil {
			return false, fmt.Errorf("plugin %s: %w", p, err)
		}
	}
	return true, os.WriteFile(filepath.Join(dir, stampFile), []byte(stamp), 0o644)
}
