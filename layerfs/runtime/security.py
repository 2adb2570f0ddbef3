"""Privileges of container processes: capabilities, ids, no_new_privs, file descriptors.

Both the container's main process and ``exec`` processes pass through
:func:`become`, the last step before ``execve``:

1. close every fd except stdio and the exec-error pipe: a leaked host fd is a way
   out (runc CVE-2024-21626 was an fd to the host cgroupfs, reached as the process
   cwd through ``/proc/self/fd/N``), and it is done *before* the working directory
   is resolved;
2. drop the bounding set to Docker's default capabilities, clear ambient caps;
3. set groups, gid, uid; a non-root user ends with no effective capabilities;
4. set ``no_new_privs`` (setuid binaries and file caps grant nothing);
5. ``chdir`` into the working directory, resolved inside the container root.

The init that stays PID 1 keeps only ``CAP_KILL`` (to forward signals to a
non-root child) and is made non-dumpable, so container processes can neither
ptrace it nor open its ``/proc/1/{mem,exe,root,fd}`` (it is a copy of the
runner's Python, whose memory and binary must stay out of reach).
"""

from __future__ import annotations

import os
import signal

from . import _sys

# capability numbers (linux/capability.h)
CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_KILL = 0, 1, 3, 4, 5
CAP_SETGID, CAP_SETUID, CAP_SETPCAP, CAP_NET_BIND_SERVICE, CAP_NET_RAW = 6, 7, 8, 10, 13
CAP_SYS_CHROOT, CAP_MKNOD, CAP_AUDIT_WRITE, CAP_SETFCAP = 18, 27, 29, 31
CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYS_RESOURCE = 21, 19, 24

# Docker's default set (moby oci/caps/defaults.go).
DEFAULT_CAPS = frozenset({
    CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FSETID, CAP_FOWNER, CAP_MKNOD, CAP_NET_RAW, CAP_SETGID,
    CAP_SETUID, CAP_SETFCAP, CAP_SETPCAP, CAP_NET_BIND_SERVICE, CAP_SYS_CHROOT, CAP_KILL,
    CAP_AUDIT_WRITE,
})

# Signals whose disposition Python changes at startup (SIG_IGN survives execve).
_PYTHON_IGNORED = ("SIGPIPE", "SIGXFSZ", "SIGXFZ")


def cap_mask(caps: frozenset[int] | set[int]) -> int:
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    return mask


def drop_bounding(keep: frozenset[int] | set[int]) -> None:
    for cap in range(_sys.last_cap() + 1):
        if cap not in keep:
            _sys.prctl(_sys.PR_CAPBSET_DROP, cap)
    _sys.prctl(_sys.PR_CAP_AMBIENT, _sys.PR_CAP_AMBIENT_CLEAR_ALL)


def reset_signals() -> None:
    """Default dispositions and an empty mask, as a fresh process would have."""
    for name in _PYTHON_IGNORED:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def become(uid: int, gid: int, groups: tuple[int, ...], caps: frozenset[int], cwd: str,
           keep_fds: frozenset[int] = frozenset()) -> None:
    """Turn the calling (forked, single-threaded) process into the container's process."""
    _sys.close_all_except(set(keep_fds))
    reset_signals()
    drop_bounding(caps)
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    # To a non-zero uid this clears the permitted and effective capabilities; to 0 it
    # is a no-op, except after joining a user namespace, where it makes us its root.
    os.setresuid(uid, uid, uid)
    if uid == 0:
        mask = cap_mask(caps)
        _sys.capset(mask, mask, 0)
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    os.chdir(cwd)
    # A cwd outside the root would show as "(unreachable)/..." (CVE-2024-21626's symptom).
    if not os.getcwd().startswith("/"):
        raise PermissionError(1, "working directory is outside the container root", cwd)


def harden_init() -> None:
    """PID 1 keeps CAP_KILL only, cannot gain privileges, cannot be inspected."""
    _sys.prctl(_sys.PR_SET_DUMPABLE, 0)
    drop_bounding(frozenset({CAP_KILL}))
    mask = 1 << CAP_KILL
    _sys.capset(mask, mask, 0)
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
