package image

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	"sigs.k8s.io/yaml"
)

// fakeBinaries writes an ELF-looking file per binary, with content.
func fakeBinaries(t *testing.T, content string) string {
	t.Helper()
	dir := t.TempDir()
	for _, b := range Binaries {
		if err := os.WriteFile(filepath.Join(dir, b.Name), []byte("\x7fELF"+content+b.Name), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func digestOf(t *testing.T, binDir string) string {
	t.Helper()
	img, err := Build(binDir, "amd64")
	if err != nil {
		t.Fatal(err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

func TestReproducible(t *testing.T) {
	a := fakeBinaries(t, "one")
	b := fakeBinaries(t, "one")
	// Other mtimes and modes on disk must not matter.
	past := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	for _, bin := range Binaries {
		p := filepath.Join(b, bin.Name)
		if err := os.Chtimes(p, past, past); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if da, db := digestOf(t, a), digestOf(t, b); da != db {
		t.Errorf("same binaries, different digests: %s, %s", da, db)
	}
	if da, dc := digestOf(t, a), digestOf(t, fakeBinaries(t, "two")); da == dc {
		t.Errorf("different binaries, same digest %s", da)
	}
}

func TestLayerAndConfig(t *testing.T) {
	img, err := Build(fakeBinaries(t, "x"), "arm64")
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != "arm64" || !cf.Created.Time.Equal(epoch) || cf.Config.User != "0:0" ||
		strings.Join(cf.Config.Entrypoint, " ") != BinDir+"/egress-cni-install" {
		t.Errorf("config: %+v", cf)
	}
	mt, _ := img.MediaType()
	if mt != "application/vnd.oci.image.manifest.v1+json" {
		t.Errorf("manifest media type %s", mt)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %d: %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if !h.ModTime.Equal(epoch) || h.Uid != 0 || h.Gid != 0 || h.Mode != 0o755 {
			t.Errorf("%s: mtime %s uid %d gid %d mode %o", h.Name, h.ModTime, h.Uid, h.Gid, h.Mode)
		}
	}
	want := "opt/ opt/egress-cni/ opt/egress-cni/bin/ opt/egress-cni/bin/egress-cni opt/egress-cni/bin/egress-cni-install opt/egress-cni/bin/egress-init opt/egress-cni/bin/egress-node"
	if strings.Join(names, " ") != want {
		t.Errorf("layer entries:\n %s\nwant\n %s", strings.Join(names, " "), want)
	}
}

func TestRefusals(t *testing.T) {
	dir := fakeBinaries(t, "x")
	if err := os.Remove(filepath.Join(dir, "egress-node")); err != nil {
		t.Fatal(err)
	}
	if _, err := Build(dir, "amd64"); err == nil || !strings.Contains(err.Error(), "binary egress-node") {
		t.Errorf("missing binary: %v", err)
	}
	dir = fakeBinaries(t, "x")
	if err := os.WriteFile(filepath.Join(dir, "egress-cni"), []byte("\x7fELF....../lib64/ld-linux-x86-64.so.2"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Build(dir, "amd64"); err == nil || !strings.Contains(err.Error(), "dynamically linked") {
		t.Errorf("dynamic binary: %v", err)
	}
	img, err := Build(fakeBinaries(t, "x"), "amd64")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Write(img, "ghcr.io/egress-cni/egress-cni@sha256:00", t.TempDir()); err == nil || !strings.Contains(err.Error(), "image reference") {
		t.Errorf("reference without a tag: %v", err)
	}
}

// The layout names the image as the manifests do, and two writes of the
// same image give the same bytes.
func TestWrite(t *testing.T) {
	img, err := Build(fakeBinaries(t, "x"), "amd64")
	if err != nil {
		t.Fatal(err)
	}
	var tars [][]byte
	for range 2 {
		dir := t.TempDir()
		res, err := Write(img, DefaultRef, dir)
		if err != nil {
			t.Fatal(err)
		}
		d, _ := img.Digest()
		if res.Digest != d {
			t.Errorf("result digest %s, image %s", res.Digest, d)
		}
		var index struct {
			Manifests []struct {
				Digest      string
				Annotations map[string]string
			}
		}
		b, err := os.ReadFile(filepath.Join(res.Layout, "index.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &index); err != nil || len(index.Manifests) != 1 {
			t.Fatalf("index.json %s: %v", b, err)
		}
		m := index.Manifests[0]
		if m.Digest != d.String() || m.Annotations["io.containerd.image.name"] != DefaultRef || m.Annotations["org.opencontainers.image.ref.name"] != "v0.1.0" {
			t.Errorf("index entry %+v, want %s named %s", m, d, DefaultRef)
		}
		ref, err := os.ReadFile(filepath.Join(dir, "egress-cni-image.digest"))
		if err != nil || string(ref) != "ghcr.io/egress-cni/egress-cni@"+d.String()+"\n" {
			t.Errorf("digest file %q (%v)", ref, err)
		}
		lt, err := os.ReadFile(res.LayoutTar)
		if err != nil {
			t.Fatal(err)
		}
		dt, err := os.ReadFile(res.DockerTar)
		if err != nil {
			t.Fatal(err)
		}
		tars = append(tars, lt, dt)
	}
	if !bytes.Equal(tars[0], tars[2]) {
		t.Error("two writes of the same image gave different layout tars")
	}
	if !bytes.Equal(tars[1], tars[3]) {
		t.Error("two writes of the same image gave different docker-archive tars")
	}
}

// The reference the builder names the image with is the one both
// DaemonSets run.
func TestManifestsNameTheImage(t *testing.T) {
	for _, f := range []string{"daemonset.yaml", "daemonset-egress.yaml"} {
		b, err := os.ReadFile(filepath.Join("..", "kubernetes", f))
		if err != nil {
			t.Fatal(err)
		}
		var ds appsv1.DaemonSet
		if err := yaml.UnmarshalStrict(b, &ds); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, c := range ds.Spec.Template.Spec.Containers {
			if c.Image != DefaultRef {
				t.Errorf("%s: container %s runs %s, the image is built as %s", f, c.Name, c.Image, DefaultRef)
			}
			if len(c.Command) == 0 || c.Command[0] != Entrypoint[0] {
				t.Errorf("%s: command %v, the image's entrypoint is %v", f, c.Command, Entrypoint)
			}
		}
	}
}

// The real binaries, built twice into different directories, give the
// same image digest.
func TestRealBuildReproducible(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries twice")
	}
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Dir(strings.TrimSpace(string(out)))
	var digests []string
	for range 2 {
		dir := t.TempDir()
		if err := BuildBinaries(context.Background(), root, dir, HostArch()); err != nil {
			t.Fatal(err)
		}
		digests = append(digests, digestOf(t, dir))
	}
	if digests[0] != digests[1] {
		t.Errorf("two builds of the same sources: %v", digests)
	}
}
