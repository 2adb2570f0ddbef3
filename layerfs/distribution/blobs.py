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


def remove_staged_blobs(images: ImageStore) -> int:
    """Delete staged downloads no pull is using; returns how many files went."""
    removed = 0
    stage = images.scratch / STAGE_DIR
    for lock in list(stage.glob("*.lock")) if stage.is_dir() else []:
        base = lock.name[:-len(".lock")]
        with blob_lock(lock, wait=False) as held:
            if not held:
                continue
            for f in (stage / base, stage / f"{base}.partial"):
                try:
                    f.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    with contextlib.suppress(OSError):
        stage.rmdir()
    return removed

