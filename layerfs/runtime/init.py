"""The container's first process: it builds the container, then becomes its PID 1.

The engine ``os.fork()``\\s the runner into a new PID (and network) namespace; the
child, already PID 1 and already holding the runner's imported modules (a fork costs
~1 ms, ``execve`` of a fresh Python ~20 ms), runs :func:`container_main`. Once the
main process is started, PID 1 execs ``layerfs-init`` (pid1.c, from the sealed memfd
of :mod:`.helper`), and the main process execs its command through the same helper:
no process of the container ever execs with the host's python as ``/proc/self/exe``
(docs/security.md)::

    runner ──fork──> PID 1 (this module)
                      setsid, stdio, close fds, join cgroup, unshare mnt/uts/ipc/cgroup,
                      hostname, lo up, mounts + pivot_root, [wait for the network],
                      load the seccomp filter
                      ──fork──> main process: drop privileges (security.become)
                                 ── execve(helper: layerfs-exec) ── execve(argv)
                      block signals, keep CAP_KILL ── execve(helper: layerfs-init),
                      which tells the main process it runs (before that execs its program):
                      reap every child, forward signals to the main process,
                      when it exits: report its wait status, exit (the kernel kills the rest)

With a user namespace there is one more hop: the forked child first unshares the
user namespace, waits for the runner to write its id maps, then creates the PID
and network namespaces and forks PID 1; it stays outside as a relay that exits
with PID 1's status (:func:`userns_main`).

Pipes to the runner (all numbers are the runner's fds, inherited by fork):

* ``err_w``   setup or exec failure as one JSON line; EOF without data = exec succeeded
  (the main process holds it until the helper's last ``execve``, which closes it);
* ``status_w`` the main process's raw wait status, written by PID 1 before it exits;
* ``go_r``    one byte per wait point: cgroup joined and id maps written (userns relay),
  cgroup joined and network ready (PID 1);
* ``ready_w`` userns only: ``U`` once unshared, then ``P<pid>`` of PID 1 (host pid).

Nothing here may raise into the runner's code: every path ends in ``os._exit``.
"""

from __future__ import annotations

import json
import os
import select
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from . import _sys, helper, security
from .namespaces import MountPlan, setup_mounts

if TYPE_CHECKING:
    from .seccomp import CompiledFilter

INIT_NAME = "layerfs-init"

# Synchronous faults: never blocked (a fault while blocked kills the process anyway).
_FAULTS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
           signal.SIGTRAP, signal.SIGSYS, signal.SIGKILL, signal.SIGSTOP}

# Forwarded to the main process; the rest are synchronous faults, job control, or
# cannot be caught.
FORWARDED_SIGNALS = tuple(
    s for s in signal.Signals
    if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
                 signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGTRAP, signal.SIGSYS,
                 signal.SIGTTIN, signal.SIGTTOU))


@dataclass
class InitPlan:
    """Everything the forked child needs; built by the engine before the fork."""

    argv: Sequence[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    caps: frozenset[int]
    hostname: str
    mounts: MountPlan
    unshare: int                              # namespaces PID 1 creates itself (not cgroup)
    stdio: tuple[int, int, int] = (0, 1, 2)
    err_w: int = -1
    status_w: int = -1
    go_r: int = -1
    ready_w: int = -1
    go_waits: int = 1                         # bytes PID 1 waits for on go_r
    loopback: bool = True
    alive_r: int = -1                         # read end of the runner's liveness pipe
    userns_unshare: int = 0                   # userns relay: namespaces created before PID 1
    seccomp: CompiledFilter | None = None     # loaded by PID 1; the main process inherits it
    helper_fd: int = -1                       # helper.helper_fd(): the sealed layerfs-init
    no_new_privs: bool = True


def report(fd: int, stage: str, err: BaseException) -> None:
    """Send one failure to the runner (best effort: the pipe may be gone). Never raises:
    every caller is about to ``os._exit`` and must get there."""
    try:
        filename = getattr(err, "filename", None)
        if isinstance(filename, bytes):  # os.execvpe reports the path it tried as bytes
            filename = os.fsdecode(filename)
        msg = {"stage": stage, "type": type(err).__name__, "message": str(err),
               "errno": getattr(err, "errno", None),
               "filename": None if filename is None else str(filename)}
        os.write(fd, (json.dumps(msg) + "\n").encode())
    except BaseException:
        try:
            os.write(fd, json.dumps({"stage": stage, "type": "Error", "message": repr(err),
                                     "errno": None, "filename": None}).encode() + b"\n")
        except BaseException:
            pass


def _wait_go(fd: int, count: int) -> None:
    for _ in range(count):
        if os.read(fd, 1) != b"G":
            raise ConnectionAbortedError("runner went away before the container was ready")


def _prepare_process(plan: InitPlan) -> None:
    _sys.prctl(_sys.PR_SET_DUMPABLE, 0)
    _sys.set_process_name(INIT_NAME)
    os.setsid()
    # stdio first (the targets may be any fd number), then close everything else.
    tmp = [os.dup(fd) for fd in plan.stdio]
    for i, fd in enumerate(tmp):
        os.dup2(fd, i, inheritable=True)
    _sys.close_all_except({plan.err_w, plan.status_w, plan.go_r, plan.ready_w, plan.alive_r,
                           plan.helper_fd, *plan.mounts.fds()})


def container_main(plan: InitPlan, *, prepared: bool = False) -> NoReturn:
    """PID 1: set the container up, start the main process, reap, report. Never returns."""
    stage = "setup"
    try:
        if not prepared:
            _prepare_process(plan)
        stage = "namespaces"
        _sys.unshare(plan.unshare)
        _sys.sethostname(plan.hostname)
        if plan.loopback:
            _sys.loopback_up()
        stage = "mounts"
        setup_mounts(plan.mounts)
        stage = "workdir"
        if not os.path.isdir(plan.cwd):
            os.makedirs(plan.cwd, 0o755, exist_ok=True)
        # The runner moves us into the cgroup (a v1 migration waits for an RCU grace
        # period, ~5-8 ms here, which overlaps with the work above) and sets up the network.
        stage = "network"
        _wait_go(plan.go_r, plan.go_waits)
        os.close(plan.go_r)
        _sys.unshare(_sys.CLONE_NEWCGROUP)  # after joining: the container's cgroup is its root
        # Last: nothing below needs a call the filter refuses. The main process inherits
        # it through fork (PID 1 still has CAP_SYS_ADMIN here, so this works with
        # no_new_privs off too, and setuid programs then work as with Docker).
        stage = "seccomp"
        if plan.seccomp is not None:
            security.load_seccomp(plan.seccomp)
    except BaseException as err:
        report(plan.err_w, stage, err)
        os._exit(1)

    main_pid = [0]

    def forward(sig: int, _frame: object) -> None:
        if main_pid[0] > 0:  # 0 in the main process itself until it execs
            try:
                os.kill(main_pid[0], sig)
            except ProcessLookupError:
                pass

    for sig in FORWARDED_SIGNALS:
        try:
            signal.signal(sig, forward)
        except (OSError, ValueError):
            continue

    # The main process runs its program only once PID 1 is the helper: until then PID 1 is
    # a copy of the runner's python, and the program would see the host's python command
    # line (or, mid-exec, none) as /proc/1/cmdline. The helper closes init_w when it runs.
    init_r, init_w = os.pipe()
    try:
        pid = os.fork()  # fails with EAGAIN if pids_limit leaves no room for the main process
    except OSError as err:
        report(plan.err_w, "fork", err)
        os._exit(1)
    if pid == 0:
        os.close(init_w)
        _exec_main(plan, init_r)
    os.close(init_r)
    main_pid[0] = pid
    os.close(plan.err_w)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")  # the OOM killer should pick the culprit, not the reaper
    except OSError:
        pass  # needs CAP_SYS_RESOURCE in the initial user namespace
    _become_init(plan, pid, init_w)


def _become_init(plan: InitPlan, main_pid: int, init_w: int) -> NoReturn:
    """Replace this copy of the runner's python with the helper as PID 1 (pid1.c): it
    reaps, forwards signals, follows the runner's liveness pipe and reports the status.
    Signals are blocked first and stay pending across the exec, so none is lost."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - _FAULTS)
        security.harden_init()
        inherited = [fd for fd in (plan.status_w, plan.alive_r, init_w) if fd >= 0]
        _sys.close_all_except({*inherited, plan.helper_fd})
        for fd in inherited:
            os.set_inheritable(fd, True)
        os.execve(plan.helper_fd, [INIT_NAME],
                  {"LAYERFS_INIT": f"{main_pid} {plan.status_w} {plan.alive_r} {init_w}"})
    except BaseException:
        pass
    # Without its init the container cannot be run as designed: end it, say so.
    try:
        os.kill(main_pid, signal.SIGKILL)
        os.write(plan.status_w, f"{255 << 8}\n".encode())
    finally:
        os._exit(255)


#: How long the main process waits for PID 1 to become the helper: an exec of a small
#: static binary takes a millisecond; a helper built before this handshake never says so.
INIT_WAIT_MS = 2000


def _exec_main(plan: InitPlan, init_r: int) -> NoReturn:
    try:
        security.become(plan.uid, plan.gid, plan.groups, plan.caps, plan.cwd,
                        keep_fds=frozenset({plan.err_w, plan.helper_fd, init_r}),
                        no_new_privs=plan.no_new_privs)
        poller = select.poll()
        poller.register(init_r, select.POLLIN)
        poller.poll(INIT_WAIT_MS)   # EOF (or nothing, from an old helper): go on
        os.close(init_r)
        helper.exec_through(plan.helper_fd, plan.err_w, list(plan.argv), plan.env)
    except BaseException as err:
        report(plan.err_w, "exec", err)
    finally:
        os._exit(127)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def userns_main(plan: InitPlan) -> NoReturn:
    """The relay for user-namespace containers (see the module doc)."""
    try:
        _prepare_process(plan)
        _sys.unshare(_sys.CLONE_NEWUSER)
        os.write(plan.ready_w, b"U")
        _wait_go(plan.go_r, 1)
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        _sys.unshare(plan.userns_unshare)
    except BaseException as err:
        report(plan.err_w, "user namespace", err)
        os._exit(1)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(plan.ready_w)
        except BaseException as err:
            report(plan.err_w, "setup", err)
            os._exit(1)
        plan.ready_w = -1
        container_main(plan, prepared=True)
    os.write(plan.ready_w, f"P{pid}\n".encode())
    for fd in (plan.ready_w, plan.err_w, plan.status_w, plan.go_r, *plan.mounts.fds()):
        os.close(fd)
    if plan.alive_r >= 0:
        os.close(plan.alive_r)  # PID 1 watches the runner; the relay follows PID 1
    def forward(sig: int, _frame: object) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        try:
            signal.signal(sig, forward)
        except (OSError, ValueError):
            continue
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        os._exit(255)
    if os.WIFSIGNALED(status):
        # Die the same way, so the runner sees what happened to PID 1 (the relay is not
        # a PID 1 itself, so a default-handled signal does kill it).
        died_by = os.WTERMSIG(status)
        if died_by != signal.SIGKILL:
            signal.signal(died_by, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [died_by])
        os.kill(os.getpid(), died_by)
    os._exit(_exit_code(status))
