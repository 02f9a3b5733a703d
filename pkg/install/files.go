package install

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/egress-cni/egress-cni/internal/flock"
)

// tempPattern names our temporary files. No config extension, so a
// runtime listing the directory never reads a half-written file, and the
// watcher ignores them.
const tempPattern = ".egress-cni-*.tmp"

// errChanged says a file changed between our read and our rename; the
// caller re-reads and tries again.
var errChanged = errors.New("file changed while we were writing it")

// writeAtomic writes data to path through a temporary file in the same
// directory: write, chmod, chown, fsync, rename, fsync the directory. A
// reader sees the old or the new content, never a mix. When expect is
// non-nil the current content must still equal it just before the
// rename, or nothing is written and errChanged is returned: a primary CNI
// that rewrote the file meanwhile wins, and the watcher brings us back.
func writeAtomic(path string, data []byte, mode fs.FileMode, owner *syscall.Stat_t, expect []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, tempPattern)
	if err != nil {
		return fmt.Errorf("could not create temporary file in %s: %w", dir, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("could not write %s: %w", tmp, err)
	}
	if err := f.Chmod(mode.Perm()); err != nil {
		return fmt.Errorf("could not chmod %s: %w", tmp, err)
	}
	if owner != nil {
		// Best effort: keep the owner of the file we replace.
		_ = f.Chown(int(owner.Uid), int(owner.Gid))
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("could not sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("could not close %s: %w", tmp, err)
	}
	if expect != nil {
		cur, err := os.ReadFile(path)
		if err != nil || !bytes.Equal(cur, expect) {
			return errChanged
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("could not rename %s to %s: %w", tmp, path, err)
	}
	ok = true
	syncDir(dir)
	return nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}

// statOwner returns the file's mode and owner.
func statOwner(path string) (fs.FileMode, *syscall.Stat_t, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, nil, err
	}
	st, _ := fi.Sys().(*syscall.Stat_t)
	return fi.Mode(), st, nil
}

// copyBinary installs src at dst with mode 0755, atomically. It writes
// nothing when dst already has the same content and mode.
func copyBinary(src, dst string) (bool, error) {
	want, err := os.ReadFile(src)
	if err != nil {
		return false, fmt.Errorf("could not read plugin binary: %w", err)
	}
	if fi, err := os.Stat(dst); err == nil && fi.Mode().Perm() == 0o755 && fi.Size() == int64(len(want)) {
		if got, err := os.ReadFile(dst); err == nil && bytes.Equal(got, want) {
			return false, nil
		}
	}
	if err := writeAtomic(dst, want, 0o755, nil, nil); err != nil {
		return false, fmt.Errorf("could not install plugin binary: %w", err)
	}
	return true, nil
}

// acquire takes the lock that serialises installers on one node (an old
// and a new DaemonSet pod during an update, or two DaemonSets). The lock
// file lives outside the CNI config directory so that the runtime and the
// watcher never see it.
func acquire(path string) (*flock.Lock, error) { return flock.Acquire(path) }
