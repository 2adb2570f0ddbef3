"""Resource limits through cgroups, v1 (including the hybrid layout) and v2.

One container gets one cgroup, named ``<parent>/<container id>``:

```
v1 (and hybrid: controllers on v1, an empty cgroup2 at unified/)
  <root>/memory/<parent>/<id>/   memory.limit_in_bytes, memory.memsw.limit_in_bytes, oom_control
  <root>/cpu/<parent>/<id>/      cpu.cfs_quota_us / cpu.cfs_period_us
  <root>/pids/<parent>/<id>/     pids.max
  <root>/devices/<parent>/<id>/  devices.deny "a", then Docker's allow list
v2 (one tree)
  <root>/<parent>/               cgroup.subtree_control "+memory +cpu +pids"
  <root>/<parent>/<id>/          memory.max, memory.swap.max, cpu.max, pids.max, memory.events
```

``root`` is injectable so the v2 path can be exercised against a private
cgroup2 mount (``mount -t cgroup2 none /tmp/x``) on a host whose real
``/sys/fs/cgroup`` is v1. The engine creates the cgroup before the container's
first process exists and that process joins it itself (it writes ``0`` to each
``cgroup.procs``), so nothing in the container ever runs unlimited.

The v1 ``devices`` controller is what makes ``CAP_MKNOD`` safe to keep (Docker's
list: mknod anything, open only null/zero/full/random/urandom/tty/console/ptmx/pts).
v2 has no devices file (it takes an eBPF program); on v2 the engine drops
``CAP_MKNOD`` instead and mounts the rootfs ``nodev``; see docs/runtime.md.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument, LayerfsError, NotFound

DEFAULT_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PARENT = "layerfs"
V1_CONTROLLERS = ("memory", "cpu", "pids", "devices")
V2_CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000

# runc's default device rules (what Docker containers may open; mknod of anything is
# allowed, opening the result is not).
DEVICE_ALLOW = (
    "c *:* m", "b *:* m",
    "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",  # null zero full random urandom
    "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm",             # tty console ptmx pts
)


@dataclass(frozen=True)
class Limits:
    """What to limit; ``None`` means unlimited. ``memory`` also caps swap at zero."""

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None


def detect(root: Path = DEFAULT_ROOT) -> str:
    """``"v2"`` (unified), ``"hybrid"`` (v1 controllers + a cgroup2 mount) or ``"v1"``."""
    if (root / "cgroup.controllers").exists():
        return "v2"
    if not (root / "memory").is_dir() and not (root / "pids").is_dir():
        raise NotFound(f"cgroups: no cgroup hierarchy under {root}")
    if (root / "unified" / "cgroup.controllers").exists():
        return "hybrid"
    return "v1"


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise NotFound(f"cgroup file {path}: missing (controller not enabled?)") from err
    try:
        os.write(fd, value.encode())
    except OSError as err:
        raise LayerfsError(f"cgroup write {value!r} to {path}: {err.strerror}") from err
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


class Cgroup:
    """One container's cgroup: ``paths`` is one directory (v2) or one per v1 controller."""

    def __init__(self, version: int, paths: dict[str, Path]) -> None:
        self.version = version
        self.paths = paths  # controller -> directory; v2 uses the key "unified"

    # --- creation -------------------------------------------------------------------------------
    @classmethod
    def locate(cls, name: str, *, root: Path = DEFAULT_ROOT,
               parent: str = DEFAULT_PARENT) -> Cgroup:
        """The cgroup ``<parent>/<name>`` would be, without creating anything."""
        if not name or "/" in name or name in (".", ".."):
            raise InvalidArgument(f"cgroup name {name!r}: must be one path component")
        if any(p in ("", ".", "..") for p in parent.split("/")):
            raise InvalidArgument(f"cgroup parent {parent!r}: bad path")
        if detect(root) == "v2":
            return cls(2, {"unified": root / parent / name})
        return cls(1, {c: root / c / parent / name for c in V1_CONTROLLERS
                       if (root / c).is_dir()})

    @classmethod
    def create(cls, name: str, limits: Limits = Limits(), *, root: Path = DEFAULT_ROOT,
               parent: str = DEFAULT_PARENT) -> Cgroup:
        """Create ``<parent>/<name>`` with ``limits``; undone (removed) if a limit fails."""
        cg = cls.locate(name, root=root, parent=parent)
        if cg.version == 2:
            cls._prepare_v2_parent(root, parent, limits)
        else:
            missing = [c for c, needed in (("memory", limits.memory), ("cpu", limits.cpus),
                                           ("pids", limits.pids)) if needed and c not in cg.paths]
            if missing:
                raise LayerfsError(f"cgroup v1 under {root}: no {', '.join(missing)} controller")
        created = []
        try:
            for path in cg.paths.values():
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    path.mkdir()
                except FileExistsError:
                    # A leftover of the same container id: it must be empty to be reused.
                    if _read(path / "cgroup.procs").strip():
                        raise LayerfsError(f"cgroup {path} exists and has processes") from None
                created.append(path)
            cg._apply(limits)
        except BaseException:
            cls(cg.version, {str(i): p for i, p in enumerate(created)}).remove()
            raise
        return cg

    @staticmethod
    def _prepare_v2_parent(root: Path, parent: str, limits: Limits) -> None:
        available = set(_read(root / "cgroup.controllers").split())
        wanted = [c for c in V2_CONTROLLERS if c in available]
        missing = [c for c, needed in (("memory", limits.memory), ("cpu", limits.cpus),
                                       ("pids", limits.pids)) if needed and c not in available]
        if missing:
            raise LayerfsError(f"cgroup v2 at {root}: controller(s) {', '.join(missing)} not "
                               f"available (bound to a v1 hierarchy?)")
        node = root
        for part in parent.split("/"):
            # Enable the controllers on the way down; each level must offer them to the next.
            enabled = set(_read(node / "cgroup.subtree_control").split())
            todo = [c for c in wanted if c not in enabled]
            if todo:
                _write(node / "cgroup.subtree_control", " ".join("+" + c for c in todo))
            node = node / part
            node.mkdir(exist_ok=True)
        enabled = set(_read(node / "cgroup.subtree_control").split())
        todo = [c for c in wanted if c not in enabled]
        if todo:
            _write(node / "cgroup.subtree_control", " ".join("+" + c for c in todo))

    def _apply(self, limits: Limits) -> None:
        if self.version == 2:
            path = self.paths["unified"]
            if limits.memory is not None:
                _write(path / "memory.max", str(limits.memory))
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", "0")
            if limits.cpus is not None:
                _write(path / "cpu.max", f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
            if limits.pids is not None:
                _write(path / "pids.max", str(limits.pids))
            return
        if limits.memory is not None:
            mem = self.paths["memory"]
            _write(mem / "memory.limit_in_bytes", str(limits.memory))
            # Without swap accounting the file is absent and there is no swap to cap.
            if (mem / "memory.memsw.limit_in_bytes").exists():
                _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory))
        if limits.cpus is not None:
            cpu = self.paths["cpu"]
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(int(limits.cpus * CPU_PERIOD_US)))
        if limits.pids is not None:
            _write(self.paths["pids"] / "pids.max", str(limits.pids))
        if "devices" in self.paths:
            dev = self.paths["devices"]
            _write(dev / "devices.deny", "a")
            for rule in DEVICE_ALLOW:
                _write(dev / "devices.allow", rule)

    # --- membership ---------------------------------------------------------------------------------
    @property
    def restricts_devices(self) -> bool:
        return "devices" in self.paths

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes ``0`` into to join."""
        return [str(p / "cgroup.procs") for p in self.paths.values()]

    def add(self, pid: int = 0) -> None:
        """Move ``pid`` (0: the calling process) into this cgroup, every controller."""
        for path in self.procs_files():
            _write(Path(path), str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.paths.values():
            try:
                found.update(int(x) for x in _read(path / "cgroup.procs").split())
            except FileNotFoundError:
                continue
        return sorted(found)

    # --- observation ------------------------------------------------------------------------------
    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 if unknown)."""
        try:
            if self.version == 2:
                return _keyed(_read(self.paths["unified"] / "memory.events")).get("oom_kill", 0)
            if "memory" in self.paths:
                return _keyed(_read(self.paths["memory"] / "memory.oom_control")).get("oom_kill", 0)
        except FileNotFoundError:
            pass
        return 0

    def oom_killed(self) -> bool:
        return self.oom_kills() > 0

    def read(self, controller: str, filename: str) -> str:
        """Raw contents of one cgroup file (``controller`` is ignored on v2)."""
        path = self.paths["unified"] if self.version == 2 else self.paths[controller]
        return _read(path / filename)

    def stats(self) -> dict[str, int]:
        """memory (bytes), pids (current tasks), cpu throttling counters, oom kills."""
        out: dict[str, int] = {"oom_kills": self.oom_kills()}
        try:
            if self.version == 2:
                out["memory"] = int(self.read("", "memory.current"))
                out["pids"] = int(self.read("", "pids.current"))
                cpu = _keyed(self.read("", "cpu.stat"))
            else:
                out["memory"] = int(self.read("memory", "memory.usage_in_bytes"))
                out["pids"] = int(self.read("pids", "pids.current"))
                cpu = _keyed(self.read("cpu", "cpu.stat"))
            out["nr_throttled"] = cpu.get("nr_throttled", 0)
        except (FileNotFoundError, KeyError, ValueError):
            pass
        return out

    # --- teardown ------------------------------------------------------------------------------------
    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup (used on leftovers after a runner crash)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self, timeout: float = 2.0) -> None:
        """Remove the cgroup directories; waits for exiting tasks (EBUSY) up to ``timeout``."""
        deadline = time.monotonic() + timeout
        for path in self.paths.values():
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if err.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise LayerfsError(f"cgroup {path}: cannot remove: {err.strerror}") \
                            from err
                    time.sleep(0.005)

    def exists(self) -> bool:
        return any(p.exists() for p in self.paths.values())

    # --- state records ------------------------------------------------------------------------------
    def to_record(self) -> dict[str, object]:
        return {"version": self.version, "paths": {k: str(v) for k, v in self.paths.items()}}

    @classmethod
    def from_record(cls, rec: dict[str, object]) -> Cgroup:
        paths = rec["paths"]
        assert isinstance(paths, dict)
        version = rec["version"]
        assert isinstance(version, int)
        return cls(version, {k: Path(v) for k, v in paths.items()})
