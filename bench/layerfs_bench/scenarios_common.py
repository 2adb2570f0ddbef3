"""What the bench scenarios (:mod:`.scenarios`) build with: sizes, files of random
data (no holes, incompressible), layer tars from a dict, one-byte appends, stat
probes that tolerate a missing path, the aufs FUSE union's counters, and the
driver's stack limit. Shared by every scenario family module."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from layerfs.layers import LayerStore

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FIXED_MTIME = 1_700_000_000
CHUNK = os.urandom(MiB)  # written over and over: incompressible, no holes


# --- helpers -------------------------------------------------------------------------------------

def human(n: int) -> str:
    """4096 -> 4K, 1048576 -> 1M (the size labels of tables and charts)."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def write_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(CHUNK))
            f.write(CHUNK[:n])
            left -= n


def tar_bytes(dirs: Iterable[str], files: dict[str, bytes]) -> bytes:
    """An uncompressed layer tar of ``dirs`` (created first) and ``files``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(set(dirs)):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def apply_bytes(store: LayerStore, data: bytes, parent: str | None) -> str:
    return store.apply(io.BytesIO(data), parent).id


def append_byte(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def append_byte_fsync(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
    finally:
        os.close(fd)


def stat_maybe(path: Path) -> None:
    try:
        os.stat(path)
    except FileNotFoundError:
        pass


def stat_arg(arg: Any) -> None:
    """A stat probe's op: its argument is a path, or (path, counters) when counting."""
    stat_maybe(arg[0] if isinstance(arg, tuple) else arg)


def union_counters(mnt: Path) -> dict[str, int] | None:
    """The aufs FUSE filesystem's lookup counters (``user.layerfs.stats``), or None."""
    try:
        data = json.loads(os.getxattr(mnt, "user.layerfs.stats"))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) \
        else None


def max_stack(store: LayerStore) -> int | None:
    return store.driver.capabilities.max_depth



def now_ns() -> int:
    return time.perf_counter_ns()
