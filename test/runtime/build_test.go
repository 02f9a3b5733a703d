//go:build linux

package runtime_test

// Everything the containerd test runs, built from source on this machine:
// the reference CNI plugins (bridge, host-local, loopback) and egress-cni,
// crictl from the Go module proxy, a recorder that wraps egress-cni, and a
// pause image packed as an OCI image-layout tar (no registry is reachable).

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// crictlVersion is the cri-tools release whose crictl the test drives.
const crictlVersion = "v1.30.0"

// pauseImage is the name the locally built pause image is imported under.
const pauseImage = "egress-cni.test/pause:e2e"

// moduleRoot is the egress-cni module's root.
func moduleRoot(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// goCmd runs the go command in dir with extra environment, bounded in
// time, and returns its trimmed standard output.
func goCmd(t testing.TB, dir string, env []string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go %s (in %s): %v\n%s", strings.Join(args, " "), dir, err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

// outOfModule is the environment of builds that happen outside our
// module (throwaway modules, crictl): they may record sums of their own.
func outOfModule() []string {
	return []string{
		"GOFLAGS=" + strings.TrimSpace(os.Getenv("GOFLAGS")+" -mod=mod -buildvcs=false"),
		"GOWORK=off",
	}
}

// buildPlugins builds bridge, host-local and loopback at the version of
// containernetworking/plugins that our go.mod pins (in a throwaway module,
// as test/netns does), and egress-cni, into dir.
func buildPlugins(t testing.TB, dir string) {
	t.Helper()
	root := moduleRoot(t)
	pluginsV := goCmd(t, root, nil, "list", "-m", "-f", "{{.Version}}", "github.com/containernetworking/plugins")
	cniV := goCmd(t, root, nil, "list", "-m", "-f", "{{.Version}}", "github.com/containernetworking/cni")
	mod := t.TempDir()
	gomod := fmt.Sprintf("module egress-cni.test/refplugins\n\ngo 1.24\n\nrequire (\n\tgithub.com/containernetworking/plugins %s\n\tgithub.com/containernetworking/cni %s\n)\n", pluginsV, cniV)
	if err := os.WriteFile(filepath.Join(mod, "go.mod"), []byte(gomod), 0o644); err != nil {
		t.Fatal(err)
	}
	const p = "github.com/containernetworking/plugins/plugins/"
	goCmd(t, mod, outOfModule(), "build", "-o", dir+"/", p+"main/bridge", p+"ipam/host-local", p+"main/loopback")
	goCmd(t, root, nil, "build", "-o", filepath.Join(dir, "egress-cni"), "./cmd/egress-cni")
	for _, b := range []string{"bridge", "host-local", "loopback", "egress-cni"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			t.Fatalf("plugin %s was not built: %v", b, err)
		}
	}
}

// buildCrictl returns the path of a crictl binary. `go install` of
// cri-tools is refused (its go.mod has replace directives), so the module
// is downloaded through the proxy, copied, stripped of vendor/ and built
// with -mod=mod. The binary is cached next to the Go build cache, so only
// the first run pays the build (about 2.5 minutes on 2 cores).
// EGRESS_CNI_CRICTL names a crictl to use instead.
func buildCrictl(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("EGRESS_CNI_CRICTL"); p != "" {
		return p
	}
	gocache := goCmd(t, "", nil, "env", "GOCACHE")
	cacheDir := filepath.Join(filepath.Dir(gocache), "egress-cni-crictl", crictlVersion)
	bin := filepath.Join(cacheDir, "crictl")
	if fi, err := os.Stat(bin); err == nil && fi.Mode()&0o111 != 0 {
		return bin
	}
	start := time.Now()
	var info struct{ Dir, Error string }
	out := goCmd(t, t.TempDir(), outOfModule(), "mod", "download", "-json", "sigs.k8s.io/cri-tools@"+crictlVersion)
	if err := json.Unmarshal([]byte(out), &info); err != nil || info.Dir == "" {
		t.Fatalf("go mod download cri-tools: %v %s\n%s", err, info.Error, out)
	}
	src := filepath.Join(t.TempDir(), "cri-tools")
	if out, err := exec.Command("cp", "-r", info.Dir, src).CombinedOutput(); err != nil {
		t.Fatalf("copy %s: %v\n%s", info.Dir, err, out)
	}
	if out, err := exec.Command("chmod", "-R", "u+w", src).CombinedOutput(); err != nil {
		t.Fatalf("chmod %s: %v\n%s", src, err, out)
	}
	if err := os.RemoveAll(filepath.Join(src, "vendor")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		t.Fatal(err)
	}
	tmp := bin + ".tmp"
	goCmd(t, src, append(outOfModule(), "CGO_ENABLED=0"), "build", "-o", tmp, "./cmd/crictl")
	if err := os.Rename(tmp, bin); err != nil {
		t.Fatal(err)
	}
	t.Logf("built crictl %s in %s (cached at %s)", crictlVersion, time.Since(start).Round(time.Second), bin)
	return bin
}

// pauseSource is the sandbox's only process: it sleeps until SIGTERM or
// SIGINT (as PID 1 it gets no default handler) and exits 0.
const pauseSource = `package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
	os.Exit(0)
}
`

// recorderSource wraps egress-cni: it appends one JSON line per call
// (command, CNI_NETNS, CNI_ARGS, whether stdin had a prevResult, the
// runtimeConfig) to the record file, then runs the real plugin with the
// same arguments, environment and stdin, and passes its output and exit
// code through unchanged.
const recorderSource = `package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"time"
)

var realPlugin, recordFile string

func main() {
	stdin, _ := io.ReadAll(os.Stdin)
	var conf map[string]any
	_ = json.Unmarshal(stdin, &conf)
	rec := map[string]any{
		"time":          time.Now().UTC().Format(time.RFC3339Nano),
		"command":       os.Getenv("CNI_COMMAND"),
		"containerID":   os.Getenv("CNI_CONTAINERID"),
		"netns":         os.Getenv("CNI_NETNS"),
		"ifname":        os.Getenv("CNI_IFNAME"),
		"args":          os.Getenv("CNI_ARGS"),
		"hasPrevResult": conf["prevResult"] != nil,
		"runtimeConfig": conf["runtimeConfig"],
	}
	cmd := exec.Command(realPlugin, os.Args[1:]...)
	cmd.Stdin = bytes.NewReader(stdin)
	cmd.Stdout = os.Stdout
	cmd.Stderr = os.Stderr
	code := 0
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else {
			code = 1
			rec["error"] = err.Error()
		}
	}
	rec["exitCode"] = code
	if line, err := json.Marshal(rec); err == nil {
		if f, err := os.OpenFile(recordFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
			_, _ = f.Write(append(line, '\n'))
			_ = f.Close()
		} else {
			fmt.Fprintln(os.Stderr, "recorder:", err)
		}
	}
	os.Exit(code)
}
`

// reaperSource runs containerd (its arguments) as its child and is a
// child subreaper: containerd's shims daemonize, so without it they are
// re-parented to PID 1 and, once they exit, stay zombies until PID 1
// reaps them. With it they are re-parented here and reaped at once.
// SIGTERM and SIGINT are forwarded to containerd. It exits when containerd
// has exited and every other child is reaped, or 5s after containerd's
// exit (remaining children then go to PID 1, and the test kills them).
const reaperSource = `package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"
)

const prSetChildSubreaper = 36

func main() {
	if _, _, e := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); e != 0 {
		fmt.Fprintln(os.Stderr, "reaper: prctl(PR_SET_CHILD_SUBREAPER):", e)
		os.Exit(1)
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	cmd := exec.Command(os.Args[1], os.Args[2:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "reaper:", err)
		os.Exit(1)
	}
	main := cmd.Process.Pid
	go func() {
		for s := range sigs {
			_ = syscall.Kill(main, s.(syscall.Signal))
		}
	}()
	code := -1
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, 0, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			break
		}
		if pid == main {
			code = ws.ExitStatus()
			if ws.Signaled() {
				code = 128 + int(ws.Signal())
			}
			go func() {
				time.Sleep(5 * time.Second)
				os.Exit(code)
			}()
		}
	}
	os.Exit(code)
}
`

// buildReaper builds the subreaper that containerd runs under into out.
func buildReaper(t testing.TB, out string) {
	t.Helper()
	buildSmall(t, reaperSource, out, "")
}

// buildSmall builds a single-file, dependency-free Go program, static
// (CGO_ENABLED=0), into out.
func buildSmall(t testing.TB, source, out string, ldflags string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module egress-cni.test/small\n\ngo 1.22\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(source), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"build", "-trimpath", "-o", out}
	if ldflags != "" {
		args = append(args, "-ldflags", ldflags)
	}
	goCmd(t, dir, append(outOfModule(), "CGO_ENABLED=0"), append(args, ".")...)
}

// buildRecorder builds the egress-cni wrapper into out.
func buildRecorder(t testing.TB, out, realPlugin, recordFile string) {
	t.Helper()
	buildSmall(t, recorderSource, out, fmt.Sprintf("-X main.realPlugin=%s -X main.recordFile=%s", realPlugin, recordFile))
}

// buildPauseImage builds the pause binary and packs it into an OCI
// image-layout tar at out, named pauseImage (the io.containerd.image.name
// annotation, which `ctr images import` uses).
func buildPauseImage(t testing.TB, out string) {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "pause")
	buildSmall(t, pauseSource, bin, "-s -w")
	pause, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	// The layer: an uncompressed tar holding /pause, so its digest is
	// also its diff ID.
	var layer bytes.Buffer
	lw := tar.NewWriter(&layer)
	epoch := time.Unix(0, 0)
	if err := lw.WriteHeader(&tar.Header{Name: "pause", Mode: 0o755, Size: int64(len(pause)), ModTime: epoch, Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	if _, err := lw.Write(pause); err != nil {
		t.Fatal(err)
	}
	if err := lw.Close(); err != nil {
		t.Fatal(err)
	}
	type desc struct {
		MediaType   string            `json:"mediaType"`
		Digest      string            `json:"digest"`
		Size        int               `json:"size"`
		Annotations map[string]string `json:"annotations,omitempty"`
		Platform    map[string]string `json:"platform,omitempty"`
	}
	blobs := map[string][]byte{}
	put := func(mediaType string, b []byte) desc {
		sum := sha256.Sum256(b)
		d := "sha256:" + hex.EncodeToString(sum[:])
		blobs[d] = b
		return desc{MediaType: mediaType, Digest: d, Size: len(b)}
	}
	mustJSON := func(v any) []byte {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	layerDesc := put("application/vnd.oci.image.layer.v1.tar", layer.Bytes())
	config := put("application/vnd.oci.image.config.v1+json", mustJSON(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       map[string]any{"Entrypoint": []string{"/pause"}},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{layerDesc.Digest}},
	}))
	manifest := put("application/vnd.oci.image.manifest.v1+json", mustJSON(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        config,
		"layers":        []desc{layerDesc},
	}))
	manifest.Annotations = map[string]string{
		"io.containerd.image.name":          pauseImage,
		"org.opencontainers.image.ref.name": "e2e",
	}
	manifest.Platform = map[string]string{"architecture": runtime.GOARCH, "os": "linux"}
	index := mustJSON(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests":     []desc{manifest},
	})

	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := tar.NewWriter(f)
	add := func(name string, b []byte) {
		if err := w.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: epoch, Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	add("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`))
	add("index.json", index)
	for d, b := range blobs {
		add("blobs/sha256/"+strings.TrimPrefix(d, "sha256:"), b)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}
