"""Container lifecycle in the runner: start, wait, kill, exec, detached mode.

The state directory (records, locks, logs) and crash cleanup are in
:mod:`layerfs.runtime.state`. The start path, in the runner::

    record intent ─ cgroup mkdir+limits ─ [lease address + ports] ─ fork into new pid+net ns
      ─ while the child builds its mounts: move it into the cgroup, [veth + addresses
        + nft rules] ─ "go" ─ read the exec-error pipe to EOF (the main process exec'd)
      ─ record running

docs/runtime.md has the whole design.

With ``network="none"`` this spawns no helper process at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import AlreadyExists, InUse, InvalidArgument, LayerfsError, NotFound
from . import _sys, helper, seccomp, security
from .cgroups import DEFAULT_PARENT, DEFAULT_ROOT, Cgroup, Limits
from .init import InitPlan, container_main, userns_main
from .namespaces import (
    ForkInto,
    MountPlan,
    close_sources,
    join_namespaces,
    open_namespaces,
    open_sources,
)
from .spec import DEFAULT_PATH, ContainerSpec
from .state import (
    ContainerInfo,
    cleanup_stale,
    containers_dir,
    inspect,
    record_info,
    rmtree,
    same_process,
    start_time,
    try_lock,
    write_record,
)
from .stdio import Relay, make_relay

if TYPE_CHECKING:
    from .network import NetworkConfig

Stdio = int | IO[Any] | None


@dataclass(frozen=True)
class RuntimeConfig:
    """Host-side settings shared by all containers of one state directory.

    ``network`` is a :class:`layerfs.runtime.network.NetworkConfig` (imported only
    when bridge networking is used); ``None`` means the default ``layerfs0`` bridge.
    With ``die_with_runner`` the container is SIGKILLed when the process that
    started it dies (a liveness pipe, see ``pid1.c``; not
    ``PR_SET_PDEATHSIG``, which follows the forking *thread*); a detached
    container's runner is its monitor process.
    """

    cgroup_root: Path = DEFAULT_ROOT
    cgroup_parent: str = DEFAULT_PARENT
    network: NetworkConfig | None = None
    die_with_runner: bool = True

    def network_config(self) -> NetworkConfig:
        if self.network is None:
            from .network import NetworkConfig
            return NetworkConfig()
        return self.network


@dataclass(frozen=True)
class ExitStatus:
    """How the container's main process ended: ``code`` is the shell-style exit code
    (128+N when killed by signal N, so an OOM kill reads 137)."""

    code: int
    signal: int | None = None
    oom_killed: bool = False

    @classmethod
    def from_wait(cls, status: int, oom_killed: bool = False) -> ExitStatus:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return cls(128 + sig, sig, oom_killed)
        return cls(os.WEXITSTATUS(status), None, oom_killed)


_alive: tuple[int, int] | None = None
_alive_lock = threading.Lock()


def _forget_alive_pipe() -> None:
    global _alive
    _alive = None  # a forked child is another runner: it makes its own pipe


os.register_at_fork(after_in_child=_forget_alive_pipe)


def _runner_alive_fd() -> int:
    """Read end of this process's liveness pipe (pid1.c watches it).

    The write end is never closed: it closes when the process dies. Both ends are
    CLOEXEC and every child the runtime forks closes them, so only this process
    keeps the pipe alive (a child forked by someone else without closing fds, e.g.
    multiprocessing's fork start method, would keep containers alive too).
    """
    global _alive
    with _alive_lock:
        if _alive is None:
            _alive = _pipe()
        return _alive[0]


def _high_fd(fd: int) -> int:
    """Keep pipe ends off 0-2 (they are about to become the container's stdio)."""
    if fd > 2:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return new


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    return _high_fd(r), _high_fd(w)


def _fileno(stream: Stdio, default: int) -> int:
    if stream is None:
        return default
    if isinstance(stream, int):
        return stream
    return stream.fileno()


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _child_error(data: bytes, spec: ContainerSpec) -> LayerfsError:
    try:
        msg = json.loads(data.decode().splitlines()[0])
    except (ValueError, IndexError):
        return LayerfsError(f"container {spec.short_id}: setup failed: {data[:200]!r}")
    where = f"container {spec.short_id}: {msg['stage']}"
    text = msg["message"]
    if msg["stage"] == "exec" and msg.get("errno") == errno.ENOENT:
        return NotFound(f"{where}: executable {spec.argv[0]!r} not found in {spec.rootfs}")
    if msg.get("errno") == errno.ENOENT:
        return NotFound(f"{where}: {text}")
    if msg["stage"] == "workdir" or (msg["stage"] == "exec" and msg.get("filename") == spec.cwd):
        return InvalidArgument(f"{where}: working directory {spec.cwd!r}: {text}")
    return LayerfsError(f"{where}: {text}")


def _hosts_file(spec: ContainerSpec, address: str | None) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if address:
        lines.append(f"{address}\t{spec.hostname}")
    else:
        lines[0] += f" {spec.hostname}"
    return "\n".join(lines) + "\n"


# --- the running container ------------------------------------------------------------------------
class RunningContainer:
    """A container started by this process. :meth:`wait` reaps it and frees everything."""

    def __init__(self, spec: ContainerSpec, state_dir: Path, cdir: Path, record: dict[str, Any],
                 cgroup: Cgroup, lock_fd: int) -> None:
        self.spec = spec
        self.id = spec.id
        self.state_dir = state_dir
        self._cdir = cdir
        self._record = record
        self.cgroup = cgroup
        self._lock_fd = lock_fd
        self.pid: int = 0            # host pid of the container's PID 1
        self._waiter: int = 0        # the child of ours to waitpid (PID 1, or the userns relay)
        self._status_r: int = -1
        self._attachment: Any = None
        self._relay: Relay | None = None
        self._status: ExitStatus | None = None
        self._released = False

    def __repr__(self) -> str:
        return f"<RunningContainer {self.spec.short_id} pid={self.pid}>"

    @property
    def address(self) -> str | None:
        return self._attachment.address if self._attachment else None

    @property
    def log_path(self) -> Path:
        return self._cdir / "container.log"

    def info(self) -> ContainerInfo:
        return record_info(self._cdir, self._record, locked=True)

    def stats(self) -> dict[str, int]:
        return self.cgroup.stats()

    # --- signals and exit ------------------------------------------------------------------------
    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Signal PID 1, which forwards it to the main process (SIGKILL ends everything)."""
        if self._status is not None or self.pid <= 0:
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def poll(self) -> ExitStatus | None:
        if self._status is None:
            pid, status = os.waitpid(self._waiter, os.WNOHANG)
            if pid == 0:
                return None
            self._finish(status)
        return self._status

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait for the container to exit, then release its cgroup, network and leases.

        Raises :class:`TimeoutError` after ``timeout`` seconds (the container keeps running).
        """
        if self._status is None:
            if timeout is not None:
                import select

                pidfd = os.pidfd_open(self._waiter)
                try:
                    if not select.select([pidfd], [], [], timeout)[0]:
                        raise TimeoutError(f"container {self.spec.short_id} still running after "
                                           f"{timeout} s")
                finally:
                    os.close(pidfd)
            while True:
                try:
                    _, status = os.waitpid(self._waiter, 0)
                    break
                except InterruptedError:
                    continue
            self._finish(status)
        assert self._status is not None
        return self._status

    def _finish(self, init_status: int) -> None:
        raw = b""
        if self._status_r >= 0:
            os.set_blocking(self._status_r, False)
            try:
                raw = _read_all(self._status_r)
            except BlockingIOError:
                raw = b""
            os.close(self._status_r)
            self._status_r = -1
        status = int(raw.split()[0]) if raw.strip() else init_status
        self._status = ExitStatus.from_wait(status, self.cgroup.oom_killed())
        if self._relay is not None:
            self._relay.stop()       # all the output is out before wait() returns
        self.release()

    def release(self) -> None:
        """Free the host resources (idempotent); called by :meth:`wait`."""
        if self._released:
            return
        self._released = True
        errors = []
        if self._attachment is not None:
            from .network import detach
            try:
                detach(self._attachment, self.state_dir)
            except LayerfsError as err:
                errors.append(str(err))
        try:
            self.cgroup.kill_all()
            self.cgroup.remove()
        except LayerfsError as err:
            errors.append(str(err))
        self._record["status"] = "exited"
        self._record["finished"] = time.time()
        if self._status is not None:
            self._record["exit"] = {"code": self._status.code, "signal": self._status.signal,
                                    "oom_killed": self._status.oom_killed}
        if errors:
            self._record["cleanup_errors"] = errors
        with contextlib.suppress(OSError):
            write_record(self._cdir, self._record)
        # No lock file = nothing to check for cleanup_stale (it skips such entries).
        with contextlib.suppress(OSError):
            os.unlink(self._cdir / "lock")
        os.close(self._lock_fd)
        if errors:
            raise LayerfsError(f"container {self.spec.short_id}: cleanup: " + "; ".join(errors))

    # --- exec ----------------------------------------------------------------------------------------
    def exec(self, argv: Sequence[str], **kwargs: Any) -> ExecProcess:
        """Run ``argv`` inside this container; see :func:`exec_in`."""
        return exec_in(self, argv, **kwargs)

    def __enter__(self) -> RunningContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is None:
            self.kill(signal.SIGKILL)
            self.wait()


# --- start ------------------------------------------------------------------------------------------
def start(spec: ContainerSpec, state_dir: str | os.PathLike[str],
          config: RuntimeConfig | None = None, *, stdin: Stdio = None, stdout: Stdio = None,
          stderr: Stdio = None, log: bool = False, clean_stale: bool = True,
          passthrough: bool = False) -> RunningContainer:
    """Start ``spec`` and return once its main process has exec'd.

    stdio: an int or file object is where the container's stdin comes from and its
    output goes, through pipes that a thread of this process relays
    (:mod:`layerfs.runtime.stdio`; ``passthrough=True`` hands the descriptors
    themselves to the container). ``None`` is this process's 0, 1, 2; with
    ``log=True`` stdout and stderr are also written to ``container.log`` in the
    container's state directory, and ``None`` means stdin from /dev/null and output
    only to the log (detached mode). Raises
    :class:`NotFound` (rootfs, executable, volume source), :class:`AlreadyExists`
    (id taken), :class:`InUse` (host port taken), :class:`InvalidArgument` or
    :class:`LayerfsError`; nothing is left behind on failure.
    """
    try:
        return _start(spec, Path(state_dir), config or RuntimeConfig(), (stdin, stdout, stderr),
                      log, clean_stale, passthrough)
    except LayerfsError:
        raise
    except FileNotFoundError as err:
        raise NotFound(f"container {spec.short_id}: {err.strerror}: {err.filename}") from err
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        raise LayerfsError(f"container {spec.short_id}: {err.strerror or err}{where}") from err


def _start(spec: ContainerSpec, state: Path, config: RuntimeConfig,
           stdio: tuple[Stdio, Stdio, Stdio], log: bool, clean_stale: bool,
           passthrough: bool) -> RunningContainer:
    if not spec.rootfs.is_dir():
        raise NotFound(f"container {spec.short_id}: rootfs {spec.rootfs} is not a directory")
    containers = containers_dir(state)
    containers.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        cleanup_stale(state, raise_errors=False)
    cdir = containers / spec.id
    try:
        cdir.mkdir(mode=0o700)
    except FileExistsError:
        raise AlreadyExists(f"container {spec.id}: already exists in {state}") from None
    # Blocking: a concurrent cleanup_stale may be looking at this new directory right
    # now (it lets go at once: there is no record yet, so nothing is stale).
    lock_fd = try_lock(cdir / "lock", wait=True)
    assert lock_fd is not None

    cgroup = Cgroup.locate(spec.id, root=config.cgroup_root, parent=config.cgroup_parent)
    record: dict[str, Any] = {
        "id": spec.id, "name": spec.name, "status": "creating", "created": time.time(),
        "rootfs": str(spec.rootfs), "argv": list(spec.argv), "hostname": spec.hostname,
        "network_mode": spec.network, "runner_pid": os.getpid(),
        "cgroup": cgroup.to_record(), "network": None, "pid": None, "pid_start": None,
        "waiter": None, "ports": [str(p) for p in spec.ports],
        # what `exec` from another process needs to match the main process
        "env": spec.environment(), "cwd": spec.cwd, "user": list(spec.user),
        "groups": list(spec.groups),
    }
    container: RunningContainer | None = None
    try:
        netcfg = None
        attachment = None
        if spec.network == "bridge":
            from . import network
            netcfg = config.network_config()
            network.ensure_bridge(netcfg, state)
            attachment = network.Attachment(spec.id, netcfg.bridge, netcfg.table,
                                            network.veth_name(spec.id), "", 0, "")
            record["network"] = attachment.to_record()
        write_record(cdir, record)       # intent: everything below is named in the record

        cgroup = Cgroup.create(spec.id, Limits(spec.memory, spec.cpus, spec.pids_limit),
                               root=config.cgroup_root, parent=config.cgroup_parent)
        container = RunningContainer(spec, state, cdir, record, cgroup, lock_fd)
        if netcfg is not None:
            from . import network
            attachment = network.plan(netcfg, state, spec.id, spec.ports)
            container._attachment = attachment
            record["network"] = attachment.to_record()
            write_record(cdir, record)
        _launch(container, config, netcfg, *stdio, log, passthrough)
    except BaseException:
        if container is None:
            with contextlib.suppress(LayerfsError):
                Cgroup.from_record(record["cgroup"]).remove()
            rmtree(cdir, ignore_errors=True)
            os.close(lock_fd)
        else:
            if container._waiter:
                container.kill(signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(container._waiter, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(container._waiter, 0)
                container._status = ExitStatus(255)
            if container._relay is not None:
                container._relay.stop(grace=0)
            with contextlib.suppress(LayerfsError):
                container.release()
            rmtree(cdir, ignore_errors=True)
        raise
    return container


def _resolv_conf(mode: str, dns: Sequence[str]) -> str:
    """The container's /etc/resolv.conf: the host's, minus loopback resolvers in bridge mode
    (they would be the container's own loopback), Google's if none is left (as Docker)."""
    try:
        with open("/etc/resolv.conf") as f:
            host = f.read()
    except OSError:
        host = ""
    if mode != "bridge":
        return host
    if dns:
        return "".join(f"nameserver {d}\n" for d in dns)
    lines = [ln for ln in host.splitlines()
             if not (ln.split()[:1] == ["nameserver"] and len(ln.split()) > 1 and
                     (ln.split()[1].startswith("127.") or ln.split()[1] == "::1"))]
    if not any(ln.startswith("nameserver") for ln in lines):
        lines += ["nameserver 8.8.8.8", "nameserver 8.8.4.4"]
    return "\n".join(lines) + "\n"


def _etc_files(spec: ContainerSpec, cdir: Path, address: str | None, netcfg: Any) -> dict[str, str]:
    files = {"/etc/hostname": f"{spec.hostname}\n", "/etc/hosts": _hosts_file(spec, address),
             "/etc/resolv.conf": _resolv_conf(spec.network, netcfg.dns if netcfg else ())}
    if spec.network == "host":
        files["/etc/hosts"] = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() \
            else files["/etc/hosts"]
    out = {}
    for target, text in files.items():
        path = cdir / os.path.basename(target)
        path.write_text(text)
        out[target] = str(path)
    return out


def _launch(c: RunningContainer, config: RuntimeConfig, netcfg: Any, stdin: Stdio,
            stdout: Stdio, stderr: Stdio, log: bool, passthrough: bool) -> None:
    spec = c.spec
    uns = spec.userns
    bridge = spec.network == "bridge"
    caps = _container_caps(spec, c.cgroup.restricts_devices)
    seccomp_filter = _seccomp_filter(spec, caps, c.state_dir)
    if seccomp_filter is not None:
        # `exec` from any process applies the same filter: it reads it from here.
        (c._cdir / SECCOMP_FILE).write_bytes(seccomp_filter.to_bytes())
    c._record.update(caps=sorted(security.cap_name(n) for n in caps),
                     seccomp=seccomp_filter is not None,
                     no_new_privileges=spec.no_new_privileges)
    address = c._attachment.address if c._attachment else None
    mounts = MountPlan(rootfs=str(spec.rootfs), volumes=spec.volumes,
                       etc_files=_etc_files(spec, c._cdir, address, netcfg),
                       read_only=spec.read_only, userns=uns,
                       host_sysfs=uns and spec.network == "host")
    own_ns = _sys.CLONE_NEWNS | _sys.CLONE_NEWUTS | _sys.CLONE_NEWIPC
    fork_ns = _sys.CLONE_NEWPID | (_sys.CLONE_NEWNET if spec.network != "host" else 0)
    child_fds: list[int] = []     # the child's ends: closed here right after the fork
    our_fds: list[int] = []       # ours: closed when start() returns or fails
    try:
        open_sources(mounts)
        if log:
            relay: Relay | None = Relay(
                None if stdin is None else _fileno(stdin, 0),
                None if stdout is None else _fileno(stdout, 1),
                None if stderr is None else _fileno(stderr, 2), c.log_path)
        else:
            relay = make_relay(_fileno(stdin, 0), _fileno(stdout, 1), _fileno(stderr, 2), None,
                               passthrough)
        c._relay = relay
        stdio = relay.child_stdio if relay is not None else \
            (_fileno(stdin, 0), _fileno(stdout, 1), _fileno(stderr, 2))
        err_r, err_w = _pipe()
        our_fds.append(err_r)
        child_fds.append(err_w)
        status_r, status_w = _pipe()
        c._status_r = status_r  # kept until wait()
        child_fds.append(status_w)
        go_r, go_w = _pipe()
        our_fds.append(go_w)
        child_fds.append(go_r)
        ready_r, ready_w = _pipe() if uns else (-1, -1)
        if uns:
            our_fds.append(ready_r)
            child_fds.append(ready_w)
        plan = InitPlan(
            argv=spec.argv, env=spec.environment(), cwd=spec.cwd, uid=spec.user[0],
            gid=spec.user[1], groups=tuple(spec.groups), caps=caps,
            hostname=spec.hostname or "", mounts=mounts, unshare=own_ns, stdio=stdio,
            err_w=err_w, status_w=status_w, go_r=go_r, ready_w=ready_w,
            go_waits=0 if uns and not bridge else 1, loopback=spec.network != "host",
            alive_r=_runner_alive_fd() if config.die_with_runner else -1,
            userns_unshare=fork_ns, seccomp=seccomp_filter,
            no_new_privs=spec.no_new_privileges, helper_fd=helper.helper_fd())
        netns_fd = -1
        if uns:
            pid = os.fork()
            if pid == 0:
                _in_child(userns_main, plan)
            c._waiter = pid
        else:
            with ForkInto(new=fork_ns) as ns:
                if bridge:
                    netns_fd = ns.netns_fd()
                    our_fds.append(netns_fd)
                pid = os.fork()
                if pid == 0:
                    _in_child(container_main, plan)
            c._waiter = c.pid = pid
        for fd in child_fds:
            os.close(fd)
        child_fds.clear()
        if relay is not None:
            relay.start()
        close_sources(mounts)
        # While the child builds its mounts, move it into the cgroup (before it forks
        # anything of the container's; see init.container_main).
        c.cgroup.add(c._waiter)
        if uns:
            c.pid = _userns_handshake(c, ready_r, go_w, err_r)
            if bridge:
                netns_fd = os.open(f"/proc/{c.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                our_fds.append(netns_fd)
        c._record.update(pid=c.pid, pid_start=start_time(c.pid), waiter=c._waiter,
                         waiter_start=start_time(c._waiter))
        if bridge:
            from . import network
            try:
                network.attach(netcfg, c._attachment, c.pid, netns_fd)
            finally:
                c._record["network"] = c._attachment.to_record()
        if not uns or bridge:
            try:
                os.write(go_w, b"G")
            except BrokenPipeError:
                pass  # the child died; its error (if any) is in err_r
        failure = _read_all(err_r)
        if failure:
            raise _child_error(failure, spec)
        c._record["status"] = "running"
        write_record(c._cdir, c._record)
    finally:
        for fd in (*child_fds, *our_fds):
            os.close(fd)
        close_sources(mounts)


SECCOMP_FILE = "seccomp.bpf"


def _container_caps(spec: ContainerSpec, restricts_devices: bool) -> frozenset[int]:
    caps = security.container_caps(spec.cap_add, spec.cap_drop)
    if not restricts_devices and security.CAP_MKNOD in caps:
        # cgroup v2 has no device allow-list here (it takes an eBPF program): with
        # CAP_MKNOD a container could make and open a node of any host device.
        if any(a.upper().removeprefix("CAP_") in ("MKNOD", "ALL") for a in spec.cap_add):
            raise InvalidArgument(f"container {spec.short_id}: --cap-add MKNOD needs the "
                                  f"cgroup v1 devices controller (layerfs has no v2 device "
                                  f"filter)")
        caps = caps - {security.CAP_MKNOD}
    return caps


def _seccomp_filter(spec: ContainerSpec, caps: frozenset[int],
                    state: Path) -> seccomp.CompiledFilter | None:
    if spec.seccomp == "unconfined":
        return None
    profile = (seccomp.default_profile_bytes() if spec.seccomp == "default"
               else spec.seccomp)
    assert isinstance(profile, bytes)
    return seccomp.filter_for(profile, caps, state / "seccomp")


def _in_child(fn: Any, plan: InitPlan) -> None:
    try:
        fn(plan)
    finally:
        os._exit(1)


def _userns_handshake(c: RunningContainer, ready_r: int, go_w: int, err_r: int) -> int:
    """Write the id maps once the relay has unshared its user namespace; get PID 1's pid."""
    spec = c.spec
    if os.read(ready_r, 1) != b"U":
        raise _child_error(_read_all(err_r), spec)
    relay = c._waiter
    with open(f"/proc/{relay}/uid_map", "w") as f:
        f.write("".join(m.line() for m in spec.uid_map))
    with open(f"/proc/{relay}/gid_map", "w") as f:
        f.write("".join(m.line() for m in spec.gid_map))
    os.write(go_w, b"G")
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(ready_r, 64)
        if not chunk:
            raise _child_error(_read_all(err_r), spec)
        line += chunk
    return int(line[1:].strip())


# --- exec -----------------------------------------------------------------------------------------
class ExecProcess:
    """A process started in a running container by :func:`exec_in` (a child of ours)."""

    def __init__(self, pid: int, relay: Relay | None = None) -> None:
        self.pid = pid
        self.status: ExitStatus | None = None
        self._relay = relay

    def wait(self, timeout: float | None = None) -> ExitStatus:
        if self.status is None:
            if timeout is not None:
                import select

                pidfd = os.pidfd_open(self.pid)
                try:
                    if not select.select([pidfd], [], [], timeout)[0]:
                        raise TimeoutError(f"exec process {self.pid} still running")
                finally:
                    os.close(pidfd)
            _, status = os.waitpid(self.pid, 0)
            self.status = ExitStatus.from_wait(status)
            if self._relay is not None:
                self._relay.stop()
        return self.status

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def exec_in(container: RunningContainer | ContainerInfo, argv: Sequence[str], *,
            env: dict[str, str] | None = None, cwd: str | None = None,
            user: tuple[int, int] | None = None, stdin: Stdio = None, stdout: Stdio = None,
            stderr: Stdio = None, passthrough: bool = False) -> ExecProcess:
    """Start ``argv`` in the namespaces and cgroup of a running container.

    The process joins the container's cgroup (while its paths are still the
    host's), then its user, ipc, uts, net, cgroup and mount namespaces (setns),
    and is forked straight into its pid namespace; it gets the same capabilities,
    ``no_new_privs`` and fd hygiene as the main process. ``env`` defaults to the
    container's environment and ``cwd``/``user`` to the spec's. stdio is relayed
    through pipes unless ``passthrough`` (see :func:`start`).
    """
    if isinstance(container, RunningContainer):
        record = container._record
        spec_env, spec_cwd, spec_user = (container.spec.environment(), container.spec.cwd,
                                         container.spec.user)
        groups = tuple(container.spec.groups)
        procs = container.cgroup.procs_files()
        cdir = container._cdir
    else:
        record = container.record
        spec_env = record.get("env") or {"PATH": DEFAULT_PATH}
        spec_cwd = record.get("cwd", "/")
        spec_user = (int(record.get("user", (0, 0))[0]), int(record.get("user", (0, 0))[1]))
        groups = tuple(int(g) for g in record.get("groups", ()))
        cg = Cgroup.from_record(record["cgroup"])
        procs = cg.procs_files()
        cdir = container.directory or Path("/nonexistent")
    pid, start_ = record.get("pid"), record.get("pid_start")
    if not same_process(pid, start_) or not isinstance(pid, int):
        raise NotFound(f"container {record.get('id', '?')[:12]}: not running")
    if isinstance(argv, str) or not argv:
        raise InvalidArgument(f"exec argv {argv!r}: must be a non-empty list")
    uid, gid = user or spec_user
    if "caps" in record:
        caps = frozenset(security.cap_number(n) for n in record["caps"])
    else:   # recorded by a layerfs before --cap-add: Docker's defaults
        restricts = Cgroup.from_record(record["cgroup"]).restricts_devices
        caps = security.DEFAULT_CAPS - (set() if restricts else {security.CAP_MKNOD})
    filt = None
    if record.get("seccomp"):
        try:
            filt = seccomp.CompiledFilter.from_bytes((cdir / SECCOMP_FILE).read_bytes())
        except (OSError, ValueError) as err:
            raise LayerfsError(f"exec in {record.get('id', '?')[:12]}: its seccomp filter "
                               f"{cdir / SECCOMP_FILE} is unreadable: {err}") from None
    nnp = bool(record.get("no_new_privileges", True))
    kinds = ["user", "ipc", "uts", "net", "cgroup", "mnt", "pid"]
    fds = open_namespaces(pid, kinds)
    shim = helper.helper_fd()
    err_r, err_w = _pipe()
    given = (_fileno(stdin, 0), _fileno(stdout, 1), _fileno(stderr, 2))
    try:
        relay = make_relay(*given, None, passthrough)
    except BaseException:
        for fd in (err_r, err_w, *fds.values()):
            os.close(fd)
        raise
    stdio = relay.child_stdio if relay is not None else given
    try:
        pid_fd = {"pid": fds.pop("pid")} if "pid" in fds else {}
        try:
            with ForkInto(join=pid_fd):
                child = os.fork()
                if child == 0:
                    _exec_child(fds, procs, stdio, err_w, list(argv), env or spec_env,
                                cwd or spec_cwd, uid, gid, groups, caps, filt, nnp, shim)
        finally:
            for fd in pid_fd.values():
                os.close(fd)
        os.close(err_w)
        err_w = -1
        if relay is not None:
            relay.start()
        failure = _read_all(err_r)
        if failure:
            os.waitpid(child, 0)
            msg = json.loads(failure.decode().splitlines()[0])
            if msg.get("errno") == errno.ENOENT and msg["stage"] == "exec":
                raise NotFound(f"exec in {record['id'][:12]}: {argv[0]!r} not found")
            raise LayerfsError(f"exec in {record['id'][:12]}: {msg['stage']}: {msg['message']}")
        proc, relay = ExecProcess(child, relay), None
        return proc
    finally:
        if relay is not None:            # not handed to an ExecProcess: it failed
            relay.stop(grace=0)
        os.close(err_r)
        if err_w >= 0:
            os.close(err_w)
        for fd in fds.values():
            os.close(fd)


def _exec_child(fds: dict[str, int], procs: list[str], stdio: tuple[int, int, int], err_w: int,
                argv: list[str], env: dict[str, str], cwd: str, uid: int, gid: int,
                groups: tuple[int, ...], caps: frozenset[int],
                filt: seccomp.CompiledFilter | None, nnp: bool, shim: int) -> None:
    from .init import report

    stage = "setup"
    try:
        _sys.prctl(_sys.PR_SET_DUMPABLE, 0)
        os.setsid()
        tmp = [os.dup(fd) for fd in stdio]
        for i, fd in enumerate(tmp):
            os.dup2(fd, i, inheritable=True)
        _sys.close_all_except({err_w, shim, *fds.values()})
        for path in procs:
            with open(path, "w") as f:
                f.write("0")
        stage = "namespaces"
        join_namespaces(fds)
        stage = "exec"
        security.become(uid, gid, groups, caps, cwd, keep_fds=frozenset({err_w, shim}),
                        seccomp=filt, no_new_privs=nnp)
        helper.exec_through(shim, err_w, argv, env)
    except BaseException as err:
        report(err_w, stage, err)
    os._exit(127)


# --- detached containers --------------------------------------------------------------------------------
def run_detached(spec: ContainerSpec, state_dir: str | os.PathLike[str],
                 config: RuntimeConfig | None = None) -> ContainerInfo:
    """Start ``spec`` under a monitor process that outlives the caller (``run -d``).

    The monitor (double-forked, its own session) starts the container with
    ``log=True``, waits for it and releases everything when it exits; the caller
    gets the record once the main process has exec'd, or the start error.
    """
    r, w = _pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            _sys.close_all_except({w})
            try:
                c = start(spec, state_dir, config, log=True)
            except BaseException as err:
                os.write(w, json.dumps({"type": type(err).__name__, "message": str(err)})
                         .encode())
                os._exit(1)
            os.write(w, b"{}")
            os.close(w)
            with contextlib.suppress(BaseException):
                c.wait()
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = _read_all(r)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    msg = json.loads(data.decode() or '{"type": "LayerfsError", "message": "monitor died"}')
    if msg:
        kinds = {"NotFound": NotFound, "AlreadyExists": AlreadyExists, "InUse": InUse,
                 "InvalidArgument": InvalidArgument}
        raise kinds.get(msg["type"], LayerfsError)(msg["message"])
    return inspect(state_dir, spec.id)


@contextlib.contextmanager
def running(spec: ContainerSpec, state_dir: str | os.PathLike[str],
            config: RuntimeConfig | None = None, **kwargs: Any) -> Iterator[RunningContainer]:
    """``with running(spec, dir) as c:`` — SIGKILLed and cleaned up on leaving the block."""
    c = start(spec, state_dir, config, **kwargs)
    with c:
        yield c


__all__ = ["ExecProcess", "ExitStatus", "RunningContainer", "RuntimeConfig", "exec_in",
           "run_detached", "running", "start"]
