// Runs containerd's snapshotter conformance suite (snapshots/testsuite)
// against layerfs, through containerd's own proxy client (snapshots/proxy):
// exactly the code path containerd uses for a proxy snapshotter plugin.
//
// Built offline in GOPATH mode against Debian's Go packages (see
// tests/engines/gosuite.py). The suite wants a fresh snapshotter per test, so
// the factory starts one layerfs server per test on the root it is given:
//
//	LAYERFS_SUITE_HELPER   JSON argv of the helper: "<argv> serve ROOT SOCKET"
//	                       serves and prints "ready"; "<argv> wipe ROOT" empties it
//	LAYERFS_SUITE_SOCKDIR  a short directory for the sockets (108-byte limit)
//	LAYERFS_SUITE_NAME     the snapshotter's name in the suite's output
package gosuite

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func helper(t *testing.T) []string {
	var argv []string
	if err := json.Unmarshal([]byte(os.Getenv("LAYERFS_SUITE_HELPER")), &argv); err != nil || len(argv) == 0 {
		t.Fatalf("LAYERFS_SUITE_HELPER must be a JSON list (the helper's argv): %v", err)
	}
	return argv
}

func run(argv []string, args ...string) *exec.Cmd {
	cmd := exec.Command(argv[0], append(append([]string{}, argv[1:]...), args...)...)
	cmd.Stderr = os.Stderr
	return cmd
}

func TestLayerfsSnapshotter(t *testing.T) {
	argv := helper(t)
	name := os.Getenv("LAYERFS_SUITE_NAME")
	sockdir := os.Getenv("LAYERFS_SUITE_SOCKDIR")
	testsuite.SnapshotterSuite(t, name, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		dir, err := os.MkdirTemp(sockdir, "s")
		if err != nil {
			return nil, nil, err
		}
		sock := filepath.Join(dir, "snapshots.sock")
		server := run(argv, "serve", root, sock)
		out, err := server.StdoutPipe()
		if err != nil {
			return nil, nil, err
		}
		if err := server.Start(); err != nil {
			return nil, nil, err
		}
		ready := make(chan error, 1)
		go func() {
			line, err := bufio.NewReader(out).ReadString('\n')
			if err == nil && strings.TrimSpace(line) != "ready" {
				err = fmt.Errorf("server said %q instead of ready", line)
			}
			ready <- err
		}()
		stop := func() error {
			_ = server.Process.Signal(syscall.SIGTERM)
			_ = server.Wait()
			defer os.RemoveAll(dir)
			return run(argv, "wipe", root).Run()
		}
		select {
		case err := <-ready:
			if err != nil {
				stop()
				return nil, nil, fmt.Errorf("layerfs server did not start: %w", err)
			}
		case <-time.After(60 * time.Second):
			stop()
			return nil, nil, fmt.Errorf("layerfs server not ready within 60s")
		}
		conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
		if err != nil {
			stop()
			return nil, nil, err
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), name)
		return sn, func() error {
			conn.Close()
			return stop()
		}, nil
	})
}
