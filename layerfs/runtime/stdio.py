"""The container's stdin, stdout and stderr: pipes relayed by the runner, as Docker does.

Handing the caller's own file descriptors to the container gives it the caller's
*files*: ``layerfs run … >> out.log`` let the container read ``out.log``'s earlier
contents and overwrite them in place (reopening ``/proc/self/fd/1`` gets round
``O_APPEND``), learn the host path, or, on a terminal, push input into the
caller's shell (TIOCSTI). So the container gets pipes, and a thread of the runner
copies::

    caller's stdin ──▶ [in pipe] ──▶ container fd 0        (only what the caller gives)
    container fd 1 ──▶ [out pipe] ──▶ caller's stdout  (+ container.log)
    container fd 2 ──▶ [err pipe] ──▶ caller's stderr  (+ container.log)

``/dev/null`` is handed over as it is (nothing to learn or overwrite there), and
``passthrough=True`` (``--stdio-passthrough``) hands over the caller's descriptors
as before, for callers who want that and know what it means. One thread per
container polls every pipe: stdin is written without blocking, so a container
that does not read its stdin while it writes a lot of output cannot deadlock the
relay. The relay ends when both output pipes reach EOF (every process of the
container has exited) or when :meth:`Relay.stop` is called.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import stat
import threading
from pathlib import Path

_CHUNK = 1 << 16


def is_dev_null(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def _same_file(a: int, b: int) -> bool:
    """Whether two of the caller's descriptors write to the same file or pipe."""
    if a == b:
        return True
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:      # the caller's descriptor is non-blocking: wait for room
            select.select([], [fd], [])


class Relay:
    """Pipes for one container (or ``exec`` process), and the thread that copies.

    ``stdin``/``stdout``/``stderr`` are the caller's descriptors (``None``: no stdin,
    respectively output not forwarded); ``log_path`` also receives stdout and stderr.
    :attr:`child_stdio` are the three descriptors to give the container; after the
    fork, :meth:`start` closes them here and starts copying.
    """

    def __init__(self, stdin: int | None, stdout: int | None, stderr: int | None,
                 log_path: Path | None = None) -> None:
        self._opened: list[int] = []            # everything this relay must close
        self._in_src, self._in_w = -1, -1
        self._log = -1
        self._thread: threading.Thread | None = None
        try:
            if stdin is None or is_dev_null(stdin):
                child_in = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                self._opened.append(child_in)
            else:
                child_in, self._in_w = self._pipe()
                self._in_src = self._dup(stdin)
            self._outputs: dict[int, int | None] = {}      # our read end -> caller's fd
            child_out: list[int] = []
            for dest in (stdout, stderr):
                if dest is not None and is_dev_null(dest) and log_path is None:
                    child_out.append(dest)
                elif child_out and dest is not None and stdout is not None and \
                        _same_file(dest, stdout) and child_out[0] != stdout:
                    # stdout and stderr are one file (``2>&1``, ``&> log``): one pipe, so
                    # the container's writes keep their order, as they would unrelayed.
                    child_out.append(child_out[0])
                else:
                    r, w = self._pipe()
                    self._outputs[r] = None if dest is None else self._dup(dest)
                    child_out.append(w)
            self.child_stdio = (child_in, child_out[0], child_out[1])
            # The child's ends that are ours to close once it has them.
            self._child = list({fd for fd in self.child_stdio if fd in self._opened})
            if log_path is not None:
                self._log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND |
                                    os.O_CLOEXEC, 0o640)
                self._opened.append(self._log)
            self._stop_r, self._stop_w = self._pipe()
        except BaseException:
            self.close()
            raise

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        self._opened += [r, w]
        return r, w

    def _dup(self, fd: int) -> int:
        """Our own copy of a caller's descriptor: the caller may close theirs once the
        container has started (as it could when the container got it directly)."""
        dup = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        self._opened.append(dup)
        return dup

    def start(self) -> None:
        """The child has its ends: close them here and start copying."""
        for fd in self._child:
            self._close(fd)
        self._child = []
        if not self._outputs:             # only /dev/null: nothing to copy
            self.close()
            return
        if self._in_w >= 0:
            os.set_blocking(self._in_w, False)
        self._thread = threading.Thread(target=self._run, name="layerfs-stdio", daemon=True)
        self._thread.start()

    def _close(self, fd: int) -> None:
        if fd in self._opened:
            self._opened.remove(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        pending = b""                 # read from the caller, not yet taken by the container
        in_src, in_w = self._in_src, self._in_w
        outputs = dict(self._outputs)
        dead: set[int] = set()        # caller's descriptors that failed (EPIPE): log only
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        for r in outputs:
            poller.register(r, select.POLLIN)
        watching_src = False
        try:
            while outputs:
                want_src = in_w >= 0 and in_src >= 0 and not pending
                if want_src != watching_src:
                    if want_src:
                        poller.register(in_src, select.POLLIN)
                    else:
                        poller.unregister(in_src)
                    watching_src = want_src
                if in_w >= 0 and pending:
                    poller.register(in_w, select.POLLOUT)
                events = poller.poll()
                if in_w >= 0 and pending:
                    poller.unregister(in_w)
                for fd, _ in events:
                    if fd == self._stop_r:
                        return
                    if fd in outputs:
                        data = os.read(fd, _CHUNK)
                        if not data:
                            poller.unregister(fd)
                            del outputs[fd]
                            continue
                        dest = outputs[fd]
                        if dest is not None and dest not in dead:
                            try:
                                _write_all(dest, data)
                            except OSError:
                                dead.add(dest)     # e.g. our stdout's reader went away
                        if self._log >= 0:
                            _write_all(self._log, data)
                    elif fd == in_src:
                        try:
                            data = os.read(in_src, _CHUNK)
                        except OSError:
                            data = b""
                        if data:
                            pending = data
                        else:                       # the caller's input ended: so does the
                            poller.unregister(in_src)   # container's
                            watching_src = False
                            in_src = -1
                            self._close(in_w)
                            in_w = -1
                    elif fd == in_w:
                        try:
                            pending = pending[os.write(in_w, pending):]
                        except BlockingIOError:
                            pass
                        except OSError as err:     # EPIPE: the container closed its stdin
                            if err.errno not in (errno.EPIPE, errno.EBADF):
                                raise
                            pending = b""
                            if watching_src:
                                poller.unregister(in_src)
                                watching_src = False
                            in_src = -1
                            self._close(in_w)
                            in_w = -1
                        if in_w >= 0 and not pending and in_src < 0:
                            self._close(in_w)
                            in_w = -1
        finally:
            for fd in list(self._opened):
                if fd != self._stop_w:
                    self._close(fd)

    def stop(self, grace: float = 2.0) -> None:
        """Wait up to ``grace`` seconds for the output to end, then stop copying."""
        if self._thread is not None:
            self._thread.join(grace)
            if self._thread.is_alive():
                with contextlib.suppress(OSError):
                    os.write(self._stop_w, b"x")
                self._thread.join()
            self._thread = None
        self.close()

    def close(self) -> None:
        """Close everything still open (also the child's ends, if :meth:`start` was not
        reached). Only after the thread is gone, or when it never started."""
        if self._thread is not None and self._thread.is_alive():
            return
        for fd in list(self._opened):
            self._close(fd)


def make_relay(stdin: int | None, stdout: int | None, stderr: int | None,
               log_path: Path | None, passthrough: bool) -> Relay | None:
    """A :class:`Relay`, or ``None`` when the caller asked for its own descriptors."""
    if passthrough:
        return None
    return Relay(stdin, stdout, stderr, log_path)
