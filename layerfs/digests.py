"""Content digests, as OCI images use them: ``sha256:<64 hex>`` (or sha512).

The one place that checks what a digest looks like and whether bytes match one: image
ids, diff ids, chain ids, blob names in archives and registries all go through here.
"""

from __future__ import annotations

import hashlib
import re
from typing import IO, Any

from .errors import InvalidArgument

_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_HEX64_RE = re.compile(r"^[a-f0-9]{64}$")


def is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST_RE.match(value) is not None


def is_sha256_hex(text: str) -> bool:
    """64 lowercase hex digits: a sha256 digest without its ``sha256:``."""
    return _HEX64_RE.match(text) is not None


def check_digest(value: object, what: str) -> str:
    """``value`` if it is a well-formed ``sha256:``/``sha512:`` digest, else InvalidArgument."""
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        raise InvalidArgument(f"{what}: {value!r} is not a sha256/sha512 digest")
    return value


def hasher_for(digest: str) -> Any:
    """A fresh hashlib object of ``digest``'s algorithm."""
    return hashlib.new(digest.split(":", 1)[0])


def verify_bytes(data: bytes, digest: str, what: str) -> None:
    """InvalidArgument unless ``data`` hashes to ``digest``."""
    h = hasher_for(digest)
    h.update(data)
    got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
    if got != digest:
        raise InvalidArgument(f"{what}: digest mismatch: expected {digest}, got {got}")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Chain ids of a layer stack (OCI image spec): ``C0 = D0``, ``Cn = sha256(Cn-1 + " " + Dn)``.

    The chain id names a layer *together with everything below it*: the same
    diff applied on two different parents gives two different layers on disk.
    """
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out


def short_id(digest: str, n: int = 12) -> str:
    return digest.split(":", 1)[-1][:n]


class HashingWriter:
    """Writes through to ``f``, hashing (sha256) and counting what passes: a compressed
    blob's digest and size, known once it is written."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()
