"""What the root knows about registry blobs: which blob holds which diff id, and in which
repository of which registry it was seen (table ``registry_blobs``, filled by pulls and
pushes). The staging folder where pulls download blobs is :mod:`layerfs.downloads`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..metastore import now

if TYPE_CHECKING:
    from ..images import ImageStore


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
