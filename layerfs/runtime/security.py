"""Privileges of container processes: capabilities, ids, no_new_privs, file descriptors.

Both the container's main process and ``exec`` processes pass through
:func:`become`, the last step before ``execve``:

1. close every fd except stdio and the exec-error pipe: a leaked host fd is a way
   out (runc CVE-2024-21626 was an fd to the host cgroupfs, reached as the process
   cwd through ``/proc/self/fd/N``), and it is done *before* the working directory
   is resolved;
2. drop the bounding set to Docker's default capabilities, clear ambient caps;
3. set groups, gid, uid; a non-root user ends with no effective capabilities;
4. set ``no_new_privs`` (setuid binaries and file caps grant nothing) and, for
   processes that did not inherit it, load the seccomp filter;
5. ``chdir`` into the working directory, resolved inside the container root.

Capabilities: Docker's default set, changed by ``--cap-add``/``--cap-drop`` with
Docker's rules (:func:`container_caps`). PID 1 keeps only ``CAP_KILL`` (to forward
signals to a non-root child) before it execs the helper (:func:`harden_init`), so
container processes can neither ptrace it nor open its ``/proc/1/{mem,exe,root,fd}``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import InvalidArgument
from . import _sys

if TYPE_CHECKING:
    from .seccomp import CompiledFilter

# capability numbers (linux/capability.h), in order: CAPABILITIES[n] is the name of cap n
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
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


def cap_number(name: str) -> int:
    """``"NET_ADMIN"``, ``"cap_net_admin"`` → 12; :class:`InvalidArgument` for an unknown name."""
    key = name.strip().upper()
    key = key[4:] if key.startswith("CAP_") else key
    try:
        return CAPABILITIES.index(key)
    except ValueError:
        raise InvalidArgument(f"capability {name!r}: unknown (use names like NET_ADMIN or "
                              f"CAP_NET_ADMIN, or ALL)") from None


def cap_name(number: int) -> str:
    return "CAP_" + CAPABILITIES[number]


def container_caps(cap_add: Sequence[str] = (), cap_drop: Sequence[str] = (),
                   base: frozenset[int] = DEFAULT_CAPS) -> frozenset[int]:
    """The bounding set of a container: Docker's rules for ``--cap-add``/``--cap-drop``.

    ``ALL`` in ``cap_add`` starts from every capability, ``ALL`` in ``cap_drop`` from
    none; otherwise from ``base`` (Docker's 14). Then the others are added, then dropped.
    """
    every = frozenset(range(len(CAPABILITIES)))
    adds = {a.strip().upper().removeprefix("CAP_") for a in cap_add}
    drops = {d.strip().upper().removeprefix("CAP_") for d in cap_drop}
    if "ALL" in adds and "ALL" in drops:
        raise InvalidArgument("--cap-add ALL and --cap-drop ALL together: choose one")
    caps = set(every if "ALL" in adds else () if "ALL" in drops else base)
    caps |= {cap_number(a) for a in adds - {"ALL"}}
    caps -= {cap_number(d) for d in drops - {"ALL"}}
    return frozenset(caps)


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


def load_seccomp(filt: CompiledFilter) -> None:
    """Install ``filt`` on this (single-threaded) process; its children inherit it."""
    _sys.seccomp_set_filter(filt.bpf, filt.flags)


def become(uid: int, gid: int, groups: tuple[int, ...], caps: frozenset[int], cwd: str,
           keep_fds: frozenset[int] = frozenset(), seccomp: CompiledFilter | None = None,
           no_new_privs: bool = True) -> None:
    """Turn the calling (forked, single-threaded) process into the container's process.

    ``seccomp`` is for processes that did not inherit the container's filter (``exec``);
    without ``no_new_privs`` it is loaded while this process still has CAP_SYS_ADMIN
    (seccomp(2) wants one or the other), as runc does.
    """
    _sys.close_all_except(set(keep_fds))
    reset_signals()
    if seccomp is not None and not no_new_privs:
        load_seccomp(seccomp)
    drop_bounding(caps)
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    # To a non-zero uid this clears the permitted and effective capabilities; to 0 it
    # is a no-op, except after joining a user namespace, where it makes us its root.
    os.setresuid(uid, uid, uid)
    if uid == 0:
        mask = cap_mask(caps)
        _sys.capset(mask, mask, 0)
    if no_new_privs:
        _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
        if seccomp is not None:
            load_seccomp(seccomp)
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
