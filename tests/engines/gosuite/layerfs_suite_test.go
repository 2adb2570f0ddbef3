// Runs containerd's snapshotter conformance suite (snapshots/testsuite)
// against layerfs, through containerd's own proxy client (snapshots/proxy):
// exactly the code path containerd uses for a proxy snapshotter plugin.
//
// Built offline in GOPATH mode against Debian's Go packages (see
// tests/engines/gosuite.py). The suite wants a fresh snapshotter per scenario,
// so the factory asks layerfs's warm fork server (tests/engines/suite_helper.py)
// for a server on the root the scenario gets, one line each way:
//
//	serve ROOT SOCKET -> ready        stop ROOT -> stopped 0
//
//	LAYERFS_SUITE_ZYGOTE   the fork server's socket
//	LAYERFS_SUITE_SOCKDIR  a short directory for the servers' sockets (108-byte limit)
//	LAYERFS_SUITE_NAME     the snapshotter's name in the suite's output
package gosuite

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

// ask sends one request line to the fork server and returns its one-line answer.
func ask(zygote, request string, timeout time.Duration) (string, error) {
	conn, err := net.DialTimeout("unix", zygote, timeout)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintf(conn, "%s\n", request); err != nil {
		return "", err
	}
	answer, err := bufio.NewReader(conn).ReadString('\n')
	return strings.TrimSpace(answer), err
}

func TestLayerfsSnapshotter(t *testing.T) {
	zygote := os.Getenv("LAYERFS_SUITE_ZYGOTE")
	name := os.Getenv("LAYERFS_SUITE_NAME")
	sockdir := os.Getenv("LAYERFS_SUITE_SOCKDIR")
	if zygote == "" || sockdir == "" {
		t.Fatal("LAYERFS_SUITE_ZYGOTE and LAYERFS_SUITE_SOCKDIR must be set (see gosuite.py)")
	}
	testsuite.SnapshotterSuite(t, name, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		dir, err := os.MkdirTemp(sockdir, "s")
		if err != nil {
			return nil, nil, err
		}
		sock := filepath.Join(dir, "snapshots.sock")
		stop := func() error {
			defer os.RemoveAll(dir)
			answer, err := ask(zygote, "stop "+root, 5*time.Minute)
			if err == nil && answer != "stopped 0" {
				err = fmt.Errorf("layerfs server for %s: %s", root, answer)
			}
			return err
		}
		answer, err := ask(zygote, "serve "+root+" "+sock, 5*time.Minute)
		if err != nil || answer != "ready" {
			stop()
			return nil, nil, fmt.Errorf("layerfs server did not start: %q %v", answer, err)
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
