// Command build makes the egress-cni DaemonSet image without a container
// daemon (`make image`): it builds the static binaries, then writes the
// image as an OCI layout, its tar and a docker-archive under -out, and
// prints ref@digest, the size and the time it took.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/egress-cni/egress-cni/install/image"
)

func main() {
	out := flag.String("out", "bin/image", "output directory")
	ref := flag.String("ref", image.DefaultRef, "image reference (registry/repository:tag)")
	arch := flag.String("arch", image.HostArch(), "GOARCH of the binaries and the image")
	binDir := flag.String("bin-dir", "", "use the binaries in this directory instead of building them")
	flag.Parse()
	if err := run(*out, *ref, *arch, *binDir); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(out, ref, arch, binDir string) error {
	start := time.Now()
	if binDir == "" {
		root, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			return fmt.Errorf("go env GOMOD: %w", err)
		}
		binDir = filepath.Join(out, "bin")
		if err := image.BuildBinaries(context.Background(), filepath.Dir(strings.TrimSpace(string(root))), binDir, arch); err != nil {
			return err
		}
	}
	built := time.Since(start)
	img, err := image.Build(binDir, arch)
	if err != nil {
		return err
	}
	res, err := image.Write(img, ref, out)
	if err != nil {
		return err
	}
	fmt.Printf("%s@%s\n", ref, res.Digest)
	fmt.Printf("  OCI layout   %s\n  OCI tar      %s\n  docker tar   %s\n", res.Layout, res.LayoutTar, res.DockerTar)
	fmt.Printf("  size %.1f MiB compressed, %.1f MiB unpacked; binaries %s, image %s\n",
		float64(res.Size)/(1<<20), float64(res.ContentSize)/(1<<20), built.Round(time.Millisecond), (time.Since(start) - built).Round(time.Millisecond))
	return nil
}
