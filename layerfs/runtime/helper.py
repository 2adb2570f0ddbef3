"""The container helper (``pid1.c``, built as ``layerfs-init``), as a sealed memfd.

Every program a container runs is exec'd through this helper, and the container's
PID 1 *is* this helper once the main process has started, so no process in the
container ever has the host's python as its ``/proc/self/exe`` when it execs: a
``#!/proc/self/exe`` script gets this helper, which refuses to run it
(CVE-2019-5736 overwrote runc's binary that way).

It is executed from a memfd, not from its file in the package: a container
process that reaches it (``/proc/self/exe`` during an exec, ``/proc/1/exe`` with
CAP_SYS_PTRACE) reaches an anonymous copy whose contents cannot change:
``F_SEAL_WRITE|F_SEAL_GROW|F_SEAL_SHRINK`` (and ``F_SEAL_EXEC`` where the kernel
has it), then ``F_SEAL_SEAL``. Writes fail with EPERM by design, whether or not
the copy is being executed at that moment. Like runc, each process makes the copy
once (~0.8 MB, static glibc) and keeps the descriptor (``O_CLOEXEC``; forked
children use it, exec'd programs never see it).
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from ..errors import LayerfsError

HELPER_PATH = Path(__file__).with_name("layerfs-init")
_MFD_EXEC = 0x10            # Linux 6.3+: an executable memfd, explicitly (not in os yet)
_F_SEAL_EXEC = 0x20         # Linux 6.3+: no chmod of the exec bits
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

_fd = -1
_identity: tuple[int, int] = (0, 0)
_lock = threading.Lock()


def helper_fd() -> int:
    """This process's sealed copy of the helper (made on first use; made again if a
    forked child closed every descriptor, as the detached monitors do)."""
    global _fd, _identity
    with _lock:
        if _fd >= 0:
            try:
                st = os.fstat(_fd)
                if (st.st_dev, st.st_ino) == _identity:
                    return _fd
            except OSError:
                pass
        _fd = _make()
        st = os.fstat(_fd)
        _identity = (st.st_dev, st.st_ino)
        return _fd


def _make() -> int:
    try:
        data = HELPER_PATH.read_bytes()
    except OSError as err:
        raise LayerfsError(f"the container helper {HELPER_PATH} is missing ({err.strerror}): "
                           f"it is built from pid1.c when layerfs is installed (needs cc and "
                           f"a static libc: scripts/setup)") from None
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        fd = os.memfd_create("layerfs-init", flags | _MFD_EXEC)
    except OSError:
        fd = os.memfd_create("layerfs-init", flags)       # before Linux 6.3
    try:
        if fd <= 2:   # stay off the descriptors that become the container's stdio
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(fd)
            fd = high
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        # Execute-only: PID 1 execs it with no capability but CAP_KILL, so it cannot
        # read the file, and the kernel makes the new PID 1 non-dumpable from the
        # exec on (would_dump): no window in which the container could open
        # /proc/1/{exe,mem,environ} before pid1.c sets it itself.
        os.fchmod(fd, 0o111)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _F_SEAL_EXEC)
        except OSError:
            pass                                          # before Linux 6.3
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def resolve(name: str, path: str) -> str:
    """The file ``execvp`` would run for ``name`` with ``PATH=path``, in this (the
    container's) mount namespace; ``FileNotFoundError``/``PermissionError`` as execvp."""
    if "/" in name:
        return name
    denied = None
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = candidate
    if denied is not None:
        raise PermissionError(13, "Permission denied", denied)
    raise FileNotFoundError(2, "No such file or directory", name)


def exec_through(fd: int, err_w: int, argv: list[str], env: dict[str, str]) -> None:
    """Replace this process with ``argv`` via the helper in ``fd``; on failure the helper
    writes the error to ``err_w`` (which it makes close-on-exec first)."""
    target = resolve(argv[0], env.get("PATH", ""))
    os.set_inheritable(err_w, True)
    os.execve(fd, ["layerfs-exec", str(err_w), target, *argv], env)
