// Package image builds the egress-cni DaemonSet image without a container
// daemon: the static binaries in one layer, written as an OCI image
// layout (a directory and a tar of it, which `ctr images import`,
// `skopeo copy oci-archive:` and `crane push` read) and a docker-archive
// tar (`docker load`). The build is reproducible: the same binaries give
// the same digest (fixed timestamps, sorted entries, uid/gid 0, fixed
// modes, no build host in the config).
//
// The image holds only the binaries (no shell, no libc, no iptables):
// the installer, the plugin and egress-node use netlink, and egress-init
// supports its nftables backend only from this image (docs/install.md).
package image

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// DefaultRef is the reference the manifests (install/kubernetes and the
// chart's default values) name; tests hold the three together.
const DefaultRef = "ghcr.io/egress-cni/egress-cni:v0.1.0"

// BinDir is where the binaries live in the image.
const BinDir = "/opt/egress-cni/bin"

// Binaries are the image's programs and the packages they are built from.
var Binaries = []struct{ Name, Package string }{
	{"egress-cni", "./cmd/egress-cni"},
	{"egress-cni-install", "./cmd/egress-cni-install"},
	{"egress-init", "./cmd/init"},
	{"egress-node", "./cmd/egress-node"},
}

// Entrypoint is the image's entrypoint: the installer the DaemonSets run.
var Entrypoint = []string{BinDir + "/egress-cni-install"}

// epoch is every timestamp in the image.
var epoch = time.Unix(0, 0).UTC()

// BuildBinaries builds the image's programs into dir from the module at
// root: static (CGO_ENABLED=0), for linux/arch, with -trimpath and
// without VCS stamps, so that the same sources give the same bytes.
func BuildBinaries(ctx context.Context, root, dir, arch string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, b := range Binaries {
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w",
			"-o", filepath.Join(dir, b.Name), b.Package)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %w\n%s", b.Package, err, out)
		}
	}
	return nil
}

// Build makes the image from the binaries in binDir (every name of
// Binaries must be there) for linux/arch.
func Build(binDir, arch string) (v1.Image, error) {
	layer, err := binaryLayer(binDir)
	if err != nil {
		return nil, err
	}
	img, err := mutate.Append(empty.Image, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History:   v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "egress-cni install/image", Comment: "static binaries in " + BinDir},
	})
	if err != nil {
		return nil, err
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture = arch
	cf.OS = "linux"
	cf.Created = v1.Time{Time: epoch}
	cf.Config = v1.Config{
		Entrypoint: Entrypoint,
		Env:        []string{"PATH=" + BinDir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		User:       "0:0",
		WorkingDir: "/",
		Labels: map[string]string{
			"org.opencontainers.image.title":       "egress-cni",
			"org.opencontainers.image.description": "egress-cni installer, CNI plugin, egress-node and egress-init (nftables backend)",
			"org.opencontainers.image.source":      "https://github.com/egress-cni/egress-cni",
		},
	}
	return mutate.ConfigFile(img, cf)
}

// binaryLayer is one uncompressed tar, entries sorted, every header
// fixed but name, mode and size: opt/, opt/egress-cni/, its bin/ and the
// binaries (0755, root).
func binaryLayer(binDir string) (v1.Layer, error) {
	var buf bytes.Buffer
	w := tar.NewWriter(&buf)
	hdr := func(name string, typ byte, mode int64, size int64) *tar.Header {
		return &tar.Header{Name: name, Typeflag: typ, Mode: mode, Size: size, ModTime: epoch,
			Uid: 0, Gid: 0, Uname: "", Gname: "", Format: tar.FormatPAX}
	}
	for _, d := range []string{"opt/", "opt/egress-cni/", "opt/egress-cni/bin/"} {
		if err := w.WriteHeader(hdr(d, tar.TypeDir, 0o755, 0)); err != nil {
			return nil, err
		}
	}
	names := make([]string, 0, len(Binaries))
	for _, b := range Binaries {
		names = append(names, b.Name)
	}
	sort.Strings(names)
	for _, n := range names {
		p := filepath.Join(binDir, n)
		fi, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("binary %s: %w", n, err)
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("binary %s: not a regular file (%s)", p, fi.Mode())
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		if err := checkStatic(p, b); err != nil {
			return nil, err
		}
		if err := w.WriteHeader(hdr(strings.TrimPrefix(BinDir, "/")+"/"+n, tar.TypeReg, 0o755, int64(len(b)))); err != nil {
			return nil, err
		}
		if _, err := w.Write(b); err != nil {
			return nil, err
		}
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}, tarball.WithMediaType(types.OCILayer))
}

// checkStatic refuses an ELF binary with a program interpreter (a
// dynamically linked one: the image has no libc).
func checkStatic(path string, b []byte) error {
	if !bytes.HasPrefix(b, []byte("\x7fELF")) {
		return fmt.Errorf("binary %s: not an ELF executable", path)
	}
	if bytes.Contains(b[:min(len(b), 4096)], []byte("/lib64/ld-linux")) || bytes.Contains(b[:min(len(b), 4096)], []byte("/lib/ld-")) {
		return fmt.Errorf("binary %s: dynamically linked (build it with CGO_ENABLED=0): the image has no libc", path)
	}
	return nil
}

// Result names what Write wrote.
type Result struct {
	Ref         string // the image reference, e.g. DefaultRef
	Digest      v1.Hash
	Layout      string // OCI image layout directory
	LayoutTar   string // the same layout as a tar (ctr images import)
	DockerTar   string // docker-archive (docker load)
	Size        int64  // compressed size: manifest, config and layers
	ContentSize int64  // uncompressed layer bytes
}

// Write writes img, named ref, into dir: dir/oci (an OCI image layout
// whose index names the image with org.opencontainers.image.ref.name =
// the tag and io.containerd.image.name = ref), dir/egress-cni-image.tar
// (that layout as a tar), dir/egress-cni-image.docker.tar and
// dir/egress-cni-image.digest (ref@digest).
func Write(img v1.Image, ref, dir string) (*Result, error) {
	tag, err := name.NewTag(ref, name.StrictValidation)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w", ref, err)
	}
	digest, err := img.Digest()
	if err != nil {
		return nil, err
	}
	res := &Result{Ref: ref, Digest: digest, Layout: filepath.Join(dir, "oci"),
		LayoutTar: filepath.Join(dir, "egress-cni-image.tar"), DockerTar: filepath.Join(dir, "egress-cni-image.docker.tar")}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.RemoveAll(res.Layout); err != nil {
		return nil, err
	}
	p, err := layout.Write(res.Layout, empty.Index)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	if err := p.AppendImage(img,
		layout.WithAnnotations(map[string]string{
			"org.opencontainers.image.ref.name": tag.TagStr(),
			"io.containerd.image.name":          tag.Name(),
		}),
		layout.WithPlatform(v1.Platform{OS: cf.OS, Architecture: cf.Architecture})); err != nil {
		return nil, err
	}
	if err := tarDir(res.Layout, res.LayoutTar); err != nil {
		return nil, err
	}
	if err := tarball.WriteToFile(res.DockerTar, tag, img); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "egress-cni-image.digest"), []byte(tag.Context().Name()+"@"+digest.String()+"\n"), 0o644); err != nil {
		return nil, err
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	res.Size = m.Config.Size
	for _, l := range m.Layers {
		res.Size += l.Size
	}
	raw, _ := img.RawManifest()
	res.Size += int64(len(raw))
	layers, err := img.Layers()
	if err != nil {
		return nil, err
	}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			return nil, err
		}
		n, err := io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return nil, err
		}
		res.ContentSize += n
	}
	return res, nil
}

// tarDir writes the directory tree at dir as a tar at out: entries
// sorted, mtime 0, uid/gid 0, directories 0755 and files 0644.
func tarDir(dir, out string) error {
	var paths []string
	err := filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(paths)
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	w := tar.NewWriter(f)
	for _, p := range paths {
		rel, _ := filepath.Rel(dir, p)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		h := &tar.Header{Name: filepath.ToSlash(rel), ModTime: epoch, Format: tar.FormatPAX}
		switch {
		case fi.IsDir():
			h.Name += "/"
			h.Typeflag, h.Mode = tar.TypeDir, 0o755
		case fi.Mode().IsRegular():
			h.Typeflag, h.Mode, h.Size = tar.TypeReg, 0o644, fi.Size()
		default:
			return fmt.Errorf("%s: unexpected file type %s in the layout", p, fi.Mode())
		}
		if err := w.WriteHeader(h); err != nil {
			return err
		}
		if h.Typeflag == tar.TypeReg {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if _, err := w.Write(b); err != nil {
				return err
			}
		}
	}
	if err := w.Close(); err != nil {
		return err
	}
	return f.Close()
}

// HostArch is the architecture images are built for by default.
func HostArch() string { return runtime.GOARCH }
