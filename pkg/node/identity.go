package node

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// DefaultStateDir is where the plugin keeps per-pod identity records on
// the host, next to the node config copy (/var/lib/egress-cni/node.json).
const DefaultStateDir = "/var/lib/egress-cni"

// identityDir is the records' directory under a state dir.
const identityDir = "pods"

// Identity is what the CNI plugin records for a pod at ADD, from
// CNI_ARGS, so that the agent can name the pod of a dropped packet: the
// node rules know interfaces, addresses and container IDs, not names.
// DEL removes the record and GC removes those of containers that are
// gone, as they do the pod's registration.
type Identity struct {
	ContainerID string       `json:"containerID"`
	Namespace   string       `json:"namespace"`
	Name        string       `json:"name"`
	UID         string       `json:"uid,omitempty"`
	Port        string       `json:"port"`
	L3          string       `json:"l3"`
	IPs         []netip.Addr `json:"ips"`
	Gateway     bool         `json:"gateway,omitempty"`
	Created     time.Time    `json:"created"`
}

// validContainerID: a record's file is named after it.
func validContainerID(id string) error {
	if id == "" || len(id) > 256 || strings.ContainsAny(id, "/\\\x00") || id == "." || id == ".." || strings.HasPrefix(id, ".") {
		return fmt.Errorf("container ID %q cannot name an identity record", id)
	}
	return nil
}

func identityPath(stateDir, id string) string {
	return filepath.Join(stateDir, identityDir, id+".json")
}

// WriteIdentity stores a pod's identity record, atomically.
func WriteIdentity(stateDir string, id Identity) error {
	if err := validContainerID(id.ContainerID); err != nil {
		return err
	}
	dir := filepath.Join(stateDir, identityDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("could not create the identity directory %s: %w", dir, err)
	}
	b, err := json.Marshal(id)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, ".tmp-")
	if err != nil {
		return fmt.Errorf("could not write the identity record of %s: %w", id.ContainerID, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("could not write the identity record of %s: %w", id.ContainerID, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("could not write the identity record of %s: %w", id.ContainerID, err)
	}
	if err := os.Rename(tmp.Name(), identityPath(stateDir, id.ContainerID)); err != nil {
		return fmt.Errorf("could not write the identity record of %s: %w", id.ContainerID, err)
	}
	return nil
}

// RemoveIdentities deletes the records whose container ID matches and
// returns those IDs. A missing directory is nothing to remove.
func RemoveIdentities(stateDir string, match func(containerID string) bool) ([]string, error) {
	ids, err := listIdentityIDs(stateDir)
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, id := range ids {
		if !match(id) {
			continue
		}
		if err := os.Remove(identityPath(stateDir, id)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("could not remove the identity record of %s: %w", id, err))
			continue
		}
		removed = append(removed, id)
	}
	return removed, errors.Join(errs...)
}

func listIdentityIDs(stateDir string) ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(stateDir, identityDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("could not list identity records: %w", err)
	}
	var ids []string
	for _, e := range ents {
		n := e.Name()
		if id, ok := strings.CutSuffix(n, ".json"); ok && !strings.HasPrefix(n, ".") && e.Type().IsRegular() {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// ReadIdentities reads every record, by container ID. A record that does
// not parse is skipped and reported in the joined error, with the rest
// returned.
func ReadIdentities(stateDir string) (map[string]Identity, error) {
	ids, err := listIdentityIDs(stateDir)
	if err != nil {
		return nil, err
	}
	out := make(map[string]Identity, len(ids))
	var errs []error
	for _, id := range ids {
		b, err := os.ReadFile(identityPath(stateDir, id))
		if errors.Is(err, os.ErrNotExist) {
			continue // removed meanwhile
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var rec Identity
		if err := json.Unmarshal(b, &rec); err != nil {
			errs = append(errs, fmt.Errorf("identity record %s does not parse: %w", identityPath(stateDir, id), err))
			continue
		}
		if rec.ContainerID != id {
			errs = append(errs, fmt.Errorf("identity record %s names another container (%q)", identityPath(stateDir, id), rec.ContainerID))
			continue
		}
		out[id] = rec
	}
	return out, errors.Join(errs...)
}
