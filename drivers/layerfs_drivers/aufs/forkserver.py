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

Fork safety: a :class:`ForkServer` may be used from the process that made it,
from its threads, and from processes forked from it afterwards (the daemon's
workers mount concurrently): each request travels with its own reply channel,
so no caller can read another's answer (``fork_safe`` says so to the daemon).

Lifetime: the zygote is its own session (a Ctrl-C to its owner does not reach
it). When every process holding the request socket (its owner, and children
forked from the owner) has closed it or died, it stops taking requests and
stays only until the servers it started have exited (their mounts unmounted),
reaping them, then exits. Servers keep serving their mounts meanwhile; a
server whose zygote was killed is re-parented like a cold helper's.

Protocol: a SOCK_SEQPACKET socketpair carries requests one way, each one
message ``{"argv": [helper options..., branches..., mountpoint]}`` with, in
SCM_RIGHTS, one end of a new socketpair for the answer: ``{"pid": PID}`` or
``{"error": "..."}``. The zygote serves the requests one at a time, in order.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

MODULE = "layerfs_drivers.aufs.unionfs"
READY_TIMEOUT = 60.0  # seconds a server may take to report its mount live


class ForkServer:
    """The owner's side: starts the zygote and asks it for mounts (thread- and fork-safe).

    Start it early: it spawns a fresh interpreter (never forks its owner, so the
    owner's threads, locks and memory do not matter).
    """

    #: Usable from processes forked after it was made (each request has its own channel).
    fork_safe = True

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
        # Sends block at most this long when the zygote is stuck with a full queue.
        ours.settimeout(timeout + 5)
        self._sock = ours
        self._timeout = timeout
        self._owner = os.getpid()
        self._closed = False

    @property
    def pid(self) -> int:
        """The zygote's process id."""
        return self._proc.pid

    def alive(self) -> bool:
        """Whether mounts may still be asked for (a dead zygote shows at the next request)."""
        if self._closed:
            return False
        # Only the owner can wait for the zygote: in a forked child it is no child.
        return os.getpid() != self._owner or self._proc.poll() is None

    def mount(self, helper: Sequence[str], target: str) -> bool:
        """Mount what the helper command ``helper`` would mount on ``target``.

        Returns True once the mount is live; False if this fork server cannot do
        it (not the union's helper, or the zygote is gone), so the caller runs
        the helper command itself. Raises OSError with the server's message when
        mounting failed.
        """
        if len(helper) < 3 or tuple(helper[1:3]) != ("-m", MODULE) or not self.alive():
            return False
        request = json.dumps({"argv": [*helper[3:], target]}).encode()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with mine:
            try:
                with theirs:
                    self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                     array.array("i", [theirs.fileno()]))])
            except (BrokenPipeError, ConnectionResetError):
                return False  # the zygote is gone: the caller runs the helper
            except TimeoutError as err:
                raise OSError(errno.ETIMEDOUT, "the union fork server takes no requests "
                                               "(its queue is full)") from err
            mine.settimeout(self._timeout + 5)
            try:
                data = mine.recv(1 << 16)
            except TimeoutError as err:
                raise OSError(errno.ETIMEDOUT, f"the union fork server did not answer "
                                               f"within {self._timeout + 5:.0f} s") from err
        if not data:
            raise OSError(errno.EPIPE, "the union fork server exited")
        reply = json.loads(data)
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
        if os.getpid() == self._owner:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(wait)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the zygote --------------------------------------------------------------------------------

def reap_children() -> None:
    """Reap every child of this process that has exited, without waiting."""
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
    # SIGCHLD ignored: the kernel reaps the servers as they exit. (A Python SIGCHLD handler
    # that reaps left a zombie when the signal came between the interpreter's last check
    # and the blocking recvmsg: the handler then waits for the next request.)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()  # objects of the warm-up stay shared with the servers (fewer COW faults)
    spare = _Spare(sock)
    fd_size = array.array("i").itemsize
    while True:
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(fd_size))
        except OSError:
            break
        if not data:
            break
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fd_size])
        if not fds:
            continue  # nowhere to answer
        for extra in fds[1:]:
            os.close(extra)
        try:
            answer = socket.socket(fileno=fds[0])
        except OSError:  # not a socket: nowhere to answer either
            os.close(fds[0])
            continue
        with answer:
            try:
                argv = [str(a) for a in json.loads(data)["argv"]]
            except (ValueError, KeyError, TypeError) as err:
                reply: dict[str, object] = {"error": f"bad request: {err}"}
            else:
                reply = spare.start(argv)
                spare = None
            # A caller that went away misses its answer; the zygote goes on.
            with contextlib.suppress(OSError):
                answer.send(json.dumps(reply).encode(), socket.MSG_NOSIGNAL)
        if spare is None:
            spare = _Spare(sock)  # for the next request, once this one is answered
    if spare is not None:
        spare.discard()
    sock.close()
    # The owner is gone: wait for the servers (their mounts are still live). With SIGCHLD
    # ignored, wait() blocks until every child has exited, then fails with ECHILD.
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
