"""What the root knows about registry blobs: which blob holds which diff id, and in which
repository of which registry it was seen (table ``registry_blobs``, filled by pulls and
pushes), and the staging folder where pulls download blobs (``ROOT/tmp/registry-blobs``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..metastore import now
from .errors import Cancelled

if TYPE_CHECKING:
    from ..images import ImageStore


#: Staged blobs older than this are removed by the next pull (their pull is long gone).
STAGE_MAX_AGE = 24 * 3600
STAGE_DIR = "registry-blobs"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS registry_blobs (
    diff_id     TEXT NOT NULL,
    digest      TEXT NOT NULL,
    media_type  TEXT NOT NULL,
    size        INTEGER NOT NULL,
    registry    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    seen        REAL NOT NULL,
    PRIMARY KEY (diff_id, digest, registry, repository)
);
CREATE INDEX IF NOT EXISTS registry_blobs_digest ON registry_blobs(digest)
"""



# --- the blob <-> diff id table ----------------------------------------------------------

def ensure_schema(images: ImageStore) -> None:
    images.store.extend_schema(_SCHEMA)


def record_blobs(images: ImageStore, registry: str, repository: str,
                  rows: Sequence[tuple[str, str, str, int]]) -> None:
    """Remember that ``repository`` on ``registry`` has blob ``digest`` for ``diff_id``."""
    with images.store.transaction() as db:
        for diff_id, digest, media_type, size in rows:
            db.execute("INSERT OR REPLACE INTO registry_blobs (diff_id, digest, media_type, "
                       "size, registry, repository, seen) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (diff_id, digest, media_type, size, registry, repository, now()))


def known_blobs(images: ImageStore, diff_id: str, registry: str) -> list[Any]:
    with images.store._lock:
        return images.store.db.execute(
            "SELECT digest, media_type, size, repository FROM registry_blobs WHERE diff_id = ? "
            "AND registry = ? ORDER BY seen DESC", (diff_id, registry)).fetchall()


def compression_of(media_type: str) -> str:
    if media_type.endswith(("+gzip", ".gzip")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    return "none"


@contextlib.contextmanager
def blob_lock(path: Path, cancelled: threading.Event | None = None, *,
               wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on a staged blob's lock file (yields False if ``wait`` is
    False and someone else holds it). Guards against the file being replaced while we
    waited, so a lock file can be removed by whoever holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        yield False
                        return
                    if cancelled is not None and cancelled.wait(0.05):
                        raise Cancelled() from None
                    if cancelled is None:
                        time.sleep(0.05)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return
        finally:
            os.close(fd)



def staged_blobs(images: ImageStore) -> list[Path]:
    """Files under the root's blob staging folder (partial and finished downloads)."""
    stage = images.scratch / STAGE_DIR
    if not stage.is_dir():
        return []
    return sorted(p for p in stage.iterdir() if not p.name.endswith(".lock"))


def staged_downloads(images: ImageStore) -> Iterator[tuple[Path, str, list[Path]]]:
    """Each download of the staging folder: its lock file, blob digest and data files."""
    stage = images.scratch / STAGE_DIR
    for lock in sorted(stage.glob("*.lock")) if stage.is_dir() else []:
        if lock.is_symlink() or not lock.is_file():
            continue            # not a pull's (pulls make regular files): never followed
        base = lock.name[:-len(".lock")]
        yield lock, base.replace("-", ":", 1), [stage / base, stage / f"{base}.partial"]


def discard_download(lock: Path, files: Sequence[Path]) -> None:
    """Delete a download's files, then its lock file (the caller holds the lock)."""
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()


def _size_of(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


@dataclass(frozen=True)
class StagedUsage:
    """The staging folder for ``system df``: downloads, and those a running pull holds."""

    downloads: int
    size: int
    in_use: int
    in_use_size: int


def staged_usage(images: ImageStore) -> StagedUsage:
    downloads = size = in_use = in_use_size = 0
    for lock, _digest, files in staged_downloads(images):
        bytes_ = _size_of(files)
        downloads, size = downloads + 1, size + bytes_
        with blob_lock(lock, wait=False) as held:
            if not held:
                in_use, in_use_size = in_use + 1, in_use_size + bytes_
    return StagedUsage(downloads, size, in_use, in_use_size)


def remove_staged_blobs(images: ImageStore) -> tuple[list[str], int]:
    """Delete the staged downloads no pull is using (those of a pull killed with -9, or
    kept by ``pull --resume``): the digests whose files went, and the bytes freed."""
    removed: list[str] = []
    freed = 0
    for lock, digest, files in staged_downloads(images):
        with blob_lock(lock, wait=False) as held:
            if not held:
                continue
            freed += _size_of(files)
            discard_download(lock, files)
            removed.append(digest)
    with contextlib.suppress(OSError):
        (images.scratch / STAGE_DIR).rmdir()
    return removed, freed
