"""Container records in the state directory: list, inspect, kill, remove, crash cleanup.

::

    <state_dir>/
      network.db  network.lock          IPAM (network.py)
      containers/<id>/
        state.json                      the record, replaced atomically
        lock                            flock held by the runner while it owns the container
        container.log                   stdout+stderr of a detached container
        hosts  hostname  resolv.conf    bind-mounted into the container's /etc

``state.json`` is written *before* anything is created on the host (the cgroup
paths, the veth name, the leased address: all derived from the container id)
and updated after (pids with their start times, nft handles), so a runner killed
at any point leaves a record naming exactly what to undo. Liveness is the
``lock`` file: the runner holds an exclusive ``flock`` on it from start to
cleanup (and deletes it then), so "record says creating/running and the lock can
be taken" means the runner died, whatever happened to its pid since.
:func:`cleanup_stale` (called by every ``start``) then kills what is left of the
container and removes its cgroup, veth, nft rules (found by their exact comment)
and leases, never anything matched by a broad pattern.

Everything here works from any process, not only the one that started the container.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InUse, InvalidArgument, LayerfsError, NotFound
from .cgroups import Cgroup


@dataclass
class ContainerInfo:
    """One container as recorded in the state directory (what ``ps`` shows)."""

    id: str
    name: str | None
    status: str              # creating | running | exited | dead (runner gone, not cleaned)
    pid: int | None
    argv: list[str]
    created: float
    address: str | None
    ports: list[str]
    exit: dict[str, Any] | None
    log_path: Path | None
    record: dict[str, Any] = field(repr=False, default_factory=dict)
    directory: Path | None = None     # containers/<id>/ in the state directory


def containers_dir(state_dir: Path) -> Path:
    return state_dir / "containers"


def write_record(cdir: Path, record: dict[str, Any]) -> None:
    tmp = cdir / "state.json.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, cdir / "state.json")


def read_record(cdir: Path) -> dict[str, Any]:
    try:
        with open(cdir / "state.json") as f:
            data: dict[str, Any] = json.load(f)
            return data
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise LayerfsError(f"container state {cdir / 'state.json'}: unreadable: {err}") from err


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot): identifies a process
    across pid reuse. None when there is no such process or it is a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None  # a zombie waiting for its (new) parent: it is not running anything
    return int(fields[19])


def same_process(pid: int | None, start: int | None) -> bool:
    return bool(pid) and start is not None and start_time(pid) == start  # type: ignore[arg-type]


def try_lock(path: Path, create: bool = True, wait: bool = False) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if someone else holds it
    (or, without ``create``, if it does not exist). With ``wait``, block until it is free."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def rmtree(path: Path, ignore_errors: bool = False) -> None:
    """Remove a container directory (a few flat files; no shutil import on ``run --rm``)."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    rmtree(Path(entry.path), ignore_errors)
                else:
                    os.unlink(entry.path)
        os.rmdir(path)
    except OSError:
        if not ignore_errors:
            raise


# --- queries and actions -----------------------------------------------------------------------
def record_info(cdir: Path, record: dict[str, Any], locked: bool | None = None) -> ContainerInfo:
    status = record.get("status", "creating")
    if status in ("creating", "running") and locked is None:
        fd = try_lock(cdir / "lock", create=False)
        if fd is not None:
            os.close(fd)
            status = "dead"
    net = record.get("network") or {}
    log = cdir / "container.log"
    return ContainerInfo(
        id=record.get("id", cdir.name), name=record.get("name"), status=status,
        pid=record.get("pid"), argv=record.get("argv", []), created=record.get("created", 0.0),
        address=net.get("address") or None, ports=record.get("ports", []),
        exit=record.get("exit"), log_path=log if log.exists() else None, record=record,
        directory=cdir)


def _find(state_dir: Path, ref: str) -> Path:
    containers = containers_dir(state_dir)
    if (containers / ref).is_dir():
        return containers / ref
    matches = []
    if containers.is_dir():
        for cdir in containers.iterdir():
            if cdir.name.startswith(ref) or read_record(cdir).get("name") == ref:
                matches.append(cdir)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFound(f"container {ref!r}: no such container in {state_dir}")
    raise InvalidArgument(f"container {ref!r}: ambiguous ({len(matches)} matches)")


def list_containers(state_dir: str | os.PathLike[str]) -> list[ContainerInfo]:
    """Every container recorded under ``state_dir``, oldest first."""
    containers = containers_dir(Path(state_dir))
    if not containers.is_dir():
        return []
    infos = [record_info(cdir, rec) for cdir in containers.iterdir()
             if cdir.is_dir() and (rec := read_record(cdir))]
    return sorted(infos, key=lambda i: i.created)


def inspect(state_dir: str | os.PathLike[str], ref: str) -> ContainerInfo:
    """One container by id, id prefix or name."""
    cdir = _find(Path(state_dir), ref)
    return record_info(cdir, read_record(cdir))


def kill(state_dir: str | os.PathLike[str], ref: str, sig: int = signal.SIGTERM) -> None:
    """Signal a container started by any process (checked against pid reuse)."""
    info = inspect(state_dir, ref)
    rec = info.record
    if info.status != "running" or not same_process(rec.get("pid"), rec.get("pid_start")):
        raise NotFound(f"container {info.id[:12]}: not running")
    os.kill(rec["pid"], sig)


def remove(state_dir: str | os.PathLike[str], ref: str) -> None:
    """Delete an exited container's record and log (refused while it runs)."""
    state = Path(state_dir)
    cdir = _find(state, ref)
    fd = try_lock(cdir / "lock")
    # The runner writes "exited" just before it lets go of the lock: give it a moment.
    deadline = time.monotonic() + 5
    while fd is None and read_record(cdir).get("status") == "exited" and \
            time.monotonic() < deadline:
        time.sleep(0.01)
        fd = try_lock(cdir / "lock")
    if fd is None:
        raise InUse(f"container {cdir.name[:12]}: still running; kill it first")
    try:
        record = read_record(cdir)
        if record.get("status") in ("creating", "running"):
            _cleanup_record(state, cdir, record)
        rmtree(cdir)
    finally:
        os.close(fd)


def cleanup_stale(state_dir: str | os.PathLike[str], *, raise_errors: bool = True) -> list[str]:
    """Undo what runners that died (kill -9) left behind; returns the container ids cleaned.

    A container is stale when its record says creating/running and nobody holds
    its lock. Its processes are killed (PID 1 checked against its recorded start
    time, then whatever is still in its cgroup), then its nft rules (exact
    comment), veth (exact name), leases (exact owner) and cgroup (exact paths)
    are removed and the record is marked exited. A container whose cleanup
    fails keeps its record (and is retried next time); the errors are raised at
    the end unless ``raise_errors`` is false (:func:`start` must not fail because
    of someone else's leftovers).
    """
    state = Path(state_dir)
    containers = containers_dir(state)
    cleaned: list[str] = []
    errors: list[str] = []
    if not containers.is_dir():
        return cleaned
    for cdir in containers.iterdir():
        fd = try_lock(cdir / "lock", create=False)
        if fd is None:
            continue
        try:
            record = read_record(cdir)
            if record.get("status") not in ("creating", "running"):
                continue
            _cleanup_record(state, cdir, record)
            cleaned.append(cdir.name)
        except LayerfsError as err:
            errors.append(str(err))
        finally:
            os.close(fd)
    if errors and raise_errors:
        raise LayerfsError("; ".join(errors))
    return cleaned


def _cleanup_record(state: Path, cdir: Path, record: dict[str, Any]) -> None:
    errors = []
    for key in ("pid", "waiter"):
        pid = record.get(key)
        if pid and same_process(pid, record.get(f"{key}_start")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    cgroup = Cgroup.from_record(record["cgroup"]) if record.get("cgroup") else None
    if cgroup is not None:
        cgroup.kill_all()
    pid = record.get("pid")
    deadline = time.monotonic() + 5
    while pid and same_process(pid, record.get("pid_start")) and time.monotonic() < deadline:
        time.sleep(0.01)
    if record.get("network"):
        from .network import Attachment, detach
        try:
            detach(Attachment.from_record(record["network"]), state, verify=True)
        except LayerfsError as err:
            errors.append(str(err))
    if cgroup is not None:
        try:
            cgroup.remove(timeout=5)
        except LayerfsError as err:
            errors.append(str(err))
    if errors:
        record["cleanup_errors"] = errors  # still "running": retried by the next cleanup
        write_record(cdir, record)
        raise LayerfsError(f"container {cdir.name[:12]}: stale cleanup: " + "; ".join(errors))
    record["status"] = "exited"
    record["finished"] = time.time()
    record["exit"] = {"code": None, "signal": None, "oom_killed": False,
                      "reason": "runner died; cleaned up by cleanup_stale"}
    write_record(cdir, record)
