"""The layerfs side of containerd's testsuite program (gosuite/): a warm fork server.

containerd's suite wants a fresh snapshotter for each of its 21 scenarios. A new
Python process per scenario costs its start-up every time (a second on this host,
~10 s in the qemu guest), so this *zygote* imports layerfs and grpcio once and
forks one server per request, before any thread exists (grpcio's threads start
in the child). The Go program talks to it over a unix socket, one line each way::

    serve ROOT SOCKET   ->  ready            (a server for ROOT listens on SOCKET)
    stop ROOT           ->  stopped 0        (SIGTERM; the child then wipes ROOT and
                                              checks nothing stays mounted)

    python -m tests.engines.suite_helper ZYGOTE_SOCKET DRIVER

prints ``ready`` once it listens. devicemapper roots get the small test pool of
tests/dm_fixtures.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import layerfs.engines.containerd  # noqa: F401  (warm: grpcio imported before any fork)
from layerfs.daemon.union import start_fork_server
from layerfs.engines import serve
from layerfs.engines.sockets import listen_unix
from layerfs.runtime import _sys

from ..dm_fixtures import options_for
from .conftest import wipe_root


def serve_and_wipe(root: Path, sock: str, driver: str, ready_fd: int) -> int:
    """In the forked child: serve ``root`` until SIGTERM, then empty it."""
    def ready() -> None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)

    serve(root, driver, options_for(driver, None), snapshotter_socket=sock, on_ready=ready)
    leaked = wipe_root(root, driver)
    if leaked:
        print(f"suite_helper: mounts left under {root}: {leaked}", file=sys.stderr)
        return 1
    return 0


def main(zygote_socket: str, driver: str) -> int:
    # The suite runs with umask 0 (it checks the modes it creates); layerfs's own
    # directories should not inherit that.
    os.umask(0o022)
    # The FUSE union's servers fork from one warm interpreter shared by every scenario's
    # server, as in the daemon (serve() would otherwise start one per scenario).
    if driver == "aufs":
        start_fork_server()
    listener = listen_unix(Path(zygote_socket))
    children: dict[str, int] = {}
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("rw") as f:
            words = f.readline().split()
            if not words:
                return 0
            if words[0] == "serve" and len(words) == 3:
                read_end, write_end = os.pipe()
                zygote = os.getpid()
                pid = os.fork()
                if pid == 0:  # the child: a server of its own
                    # A stopped session (Ctrl-C, a timeout) kills the zygote: its servers
                    # follow, stopping as on `stop` (SIGTERM), not left serving a gone root.
                    _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGTERM)
                    if os.getppid() != zygote:
                        os._exit(1)
                    listener.close()
                    os.close(read_end)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    code = 1
                    try:
                        code = serve_and_wipe(Path(words[1]), words[2], driver, write_end)
                    finally:
                        os._exit(code)
                os.close(write_end)
                with os.fdopen(read_end) as status:
                    answer = status.readline().strip() or "failed to start"
                children[words[1]] = pid
                f.write(answer + "\n")
            elif words[0] == "stop" and len(words) == 2 and words[1] in children:
                pid = children.pop(words[1])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                _, status_code = os.waitpid(pid, 0)
                f.write(f"stopped {os.waitstatus_to_exitcode(status_code)}\n")
            else:
                f.write(f"error: bad request {' '.join(words)!r}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
