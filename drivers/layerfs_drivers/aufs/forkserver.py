"""Union mounts without a cold start: a fork server (zygote) for the FUSE union servers.

A cold mount runs ``python -m layerfs_drivers.aufs.unionfs`` (the driver's mount
helper): a new interpreter, imports, a fork to daemonize. A long-lived process
(the ``layerfs daemon``, the bench) instead keeps one :class:`ForkServer`: a
child interpreter started once, single-threaded, with the union filesystem
already imported. For each mount it forks one server, which mounts, answers
the kernel's FUSE_INIT and reports back; :meth:`ForkServer.mount` returns once
the mount is live (or raises the server's error). The fork server reaps the
servers when they exit (after their filesystem is unmounted), so none is left
a zombie, whatever the init of the machine does.

Wiring it into the mount module (what a long-lived process does at its start)::

    from layerfs import mount as mountlib
    from layerfs_drivers.aufs.forkserver import ForkServer

    forker = ForkServer()                  # starts the zygote; returns at once
    mountlib.set_fuse_forker(forker)       # aufs mounts now fork from it
    ...
    mountlib.set_fuse_forker(None)
    forker.close()

(:meth:`layerfs_drivers.aufs.driver.AufsDriver.make_fuse_forker` makes one
without naming this module.) Without a forker the mount module runs the helper
command, so everything works the same, only slower to mount.

Lifetime: the zygote is its own session (a Ctrl-C to its owner does not reach
it). When its owner closes the socket or dies, it stops taking requests and
stays only until the servers it started have exited (their mounts unmounted),
reaping them, then exits. Servers keep serving their mounts meanwhile; a
server whose zygote was killed is re-parented like a cold helper's.

Protocol (a SOCK_SEQPACKET socketpair, one JSON message each way per mount):
``{"id": N, "argv": [helper options..., branches..., mountpoint]}`` →
``{"id": N, "pid": PID}`` or ``{"id": N, "error": "..."}``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence

MODULE = "layerfs_drivers.aufs.unionfs"
READY_TIMEOUT = 60.0  # seconds a server may take to report its mount live


class ForkServer:
    """The owner's side: starts the zygote and asks it for mounts (thread-safe).

    Start it early: it spawns a fresh interpreter (never forks its owner, so the
    owner's threads, locks and memory do not matter).
    """

    def __init__(self, *, timeout: float = READY_TIMEOUT) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, cwd="/", start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._timeout = timeout
        self._lock = threading.Lock()
        self._serial = 0
        self._closed = False

    @property
    def pid(self) -> int:
        """The zygote's process id."""
        return self._proc.pid

    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    def mount(self, helper: Sequence[str], target: str) -> bool:
        """Mount what the helper command ``helper`` would mount on ``target``.

        Returns True once the mount is live; False if this fork server cannot do
        it (not the union's helper, or the zygote is gone), so the caller runs
        the helper command itself. Raises OSError with the server's message when
        mounting failed.
        """
        if len(helper) < 3 or tuple(helper[1:3]) != ("-m", MODULE) or not self.alive():
            return False
        with self._lock:
            self._serial += 1
            ident = self._serial
            request = json.dumps({"id": ident, "argv": [*helper[3:], target]}).encode()
            try:
                self._sock.settimeout(self._timeout + 5)
                self._sock.send(request)
                while True:
                    data = self._sock.recv(1 << 16)
                    if not data:
                        raise OSError(errno.EPIPE, "the union fork server exited")
                    reply = json.loads(data)
                    if reply.get("id") == ident:
                        break  # earlier ids: answers to requests that timed out
            except (BrokenPipeError, ConnectionResetError):
                return False
            except TimeoutError as err:
                raise OSError(errno.ETIMEDOUT, f"the union fork server did not answer "
                                               f"within {self._timeout + 5:.0f} s") from err
        if "error" in reply:
            raise OSError(errno.EIO, str(reply["error"]))
        return True

    def close(self, wait: float = 5.0) -> None:
        """Stop taking requests. The zygote exits once the servers it started are gone;
        waits up to ``wait`` seconds for that (to reap it), else leaves it to finish."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(wait)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the zygote --------------------------------------------------------------------------------

def reap_children(signum: int = 0, frame: object = None) -> None:
    """Reap every child that has exited, without waiting (also a SIGCHLD handler)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class _Spare:
    """A server forked ahead of time, waiting for its arguments: the fork (and the copying
    of the pages it touches first) is off the path of the next mount request."""

    def __init__(self, sock: socket.socket) -> None:
        from . import unionfs

        argv_r, self.argv_w = os.pipe()
        self.ready_r, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.argv_w)
                os.close(self.ready_r)
                sock.close()
                for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
                    signal.signal(signum, signal.SIG_DFL)
                unionfs.warm_up(touch=True)
                data = b""
                while chunk := os.read(argv_r, 1 << 16):
                    data += chunk
                if not data:
                    os._exit(0)  # the fork server is closing: never used
                os.close(argv_r)
                unionfs.serve_forked(json.loads(data), ready_w)
            finally:
                os._exit(1)
        os.close(argv_r)
        os.close(ready_w)

    def start(self, argv: list[str]) -> dict[str, object]:
        """Hand the spare its mount; wait for the mount to be live (or the error)."""
        try:
            os.write(self.argv_w, json.dumps(argv).encode())
        finally:
            os.close(self.argv_w)
        chunks = []
        try:
            poller = select.poll()
            poller.register(self.ready_r, select.POLLIN)
            while True:
                if not poller.poll(READY_TIMEOUT * 1000):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    return {"error": f"the union server did not report its mount live "
                                     f"within {READY_TIMEOUT:.0f} s"}
                chunk = os.read(self.ready_r, 4096)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self.ready_r)
        msg = b"".join(chunks)
        if msg[:1] == b"R":
            return {"pid": self.pid}
        return {"error": msg[1:].decode(errors="replace")
                or "the server exited before mounting"}

    def discard(self) -> None:
        os.close(self.argv_w)  # it reads EOF and exits (reaped like any other)
        os.close(self.ready_r)


def serve(fd: int) -> int:
    """The zygote's loop on socket ``fd``, until its owner is gone."""
    import gc

    from . import unionfs  # imported once, here, for every server

    unionfs.warm_up()
    sock = socket.socket(fileno=fd)
    spare: _Spare | None
    signal.signal(signal.SIGCHLD, reap_children)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()  # objects of the warm-up stay shared with the servers (fewer COW faults)
    spare = _Spare(sock)
    while True:
        try:
            data = sock.recv(1 << 20)
        except OSError:
            break
        if not data:
            break
        try:
            request = json.loads(data)
            argv = [str(a) for a in request["argv"]]
            ident = request.get("id")
        except (ValueError, KeyError, TypeError) as err:
            reply: dict[str, object] = {"error": f"bad request: {err}"}
            ident = None
        else:
            reply = spare.start(argv)
            spare = None
        reply["id"] = ident
        try:
            sock.send(json.dumps(reply).encode())
        except OSError:
            break
        if spare is None:
            spare = _Spare(sock)  # for the next request, once this one is answered
    if spare is not None:
        spare.discard()
    sock.close()
    # The owner is gone: wait for the servers (their mounts are still live).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
