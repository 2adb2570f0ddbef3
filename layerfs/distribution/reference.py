"""Image references as registries read them: ``[HOST[:PORT]/]REPO[:TAG|@DIGEST]``, and
platforms (``OS/ARCH[/VARIANT]``).

The first component is a registry host if it has a ``.`` or a ``:`` or is
``localhost``; otherwise the image is on Docker Hub (``busybox`` is
``docker.io/library/busybox:latest``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .. import oci
from ..errors import InvalidArgument
from .auth import registry_host

DOCKER_HUB = "docker.io"

# --- references -------------------------------------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
                      r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(?::[0-9]+)?$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class RemoteReference:
    """``registry/repository[:tag][@digest]``, e.g. ``127.0.0.1:5000/lab/app:v1``."""

    registry: str          # host[:port]; "docker.io" for Docker Hub
    repository: str        # "lab/app"; "library/busybox" on Docker Hub
    tag: str | None = None
    digest: str | None = None
    explicit_registry: bool = True

    @classmethod
    def parse(cls, text: str, *, default_tag: str | None = oci.DEFAULT_TAG) -> RemoteReference:
        value = text.strip()
        if not value:
            raise InvalidArgument("empty image reference")
        name, digest = value, None
        if "@" in value:
            name, _, digest = value.partition("@")
            oci.check_digest(digest, f"image reference {text!r}")
        repo, tag = oci.split_reference(name)
        first, sep, rest = repo.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, path, explicit = first, rest, True
        else:
            registry, path, explicit = DOCKER_HUB, repo, False
        registry = registry_host(registry)
        if registry == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        if not _HOST_RE.match(registry) or not _PATH_RE.match(path) or len(path) > 255:
            raise InvalidArgument(f"invalid image reference {text!r}: expected "
                                  f"[HOST[:PORT]/]NAME[:TAG|@DIGEST] with a lowercase name, "
                                  f"e.g. 127.0.0.1:5000/lab/app:v1")
        if tag is not None and not _TAG_RE.match(tag):
            raise InvalidArgument(f"invalid tag in {text!r}: use letters, digits and '_.-' "
                                  f"(at most 128, not starting with '.' or '-')")
        if tag is None and digest is None:
            tag = default_tag
        return cls(registry, path, tag, digest, explicit)

    @property
    def name(self) -> str:
        """The repository as layerfs and Docker name it locally (Docker Hub in short form)."""
        return oci.normalize_repo(f"{self.registry}/{self.repository}")

    @property
    def local_name(self) -> str | None:
        """``name:tag`` for the image store, or None for a pull by digest only."""
        return f"{self.name}:{self.tag}" if self.tag else None

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if there is one, else the tag."""
        return self.digest or self.tag or oci.DEFAULT_TAG

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> Platform:
        if not text:
            host = oci.host_platform()
            return cls(host["os"], host["architecture"])
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"platform {text!r}: expected OS/ARCH[/VARIANT], e.g. "
                                  f"linux/amd64 or linux/arm64/v8")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, p: dict[str, Any]) -> bool:
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        variant = p.get("variant")
        return variant == self.variant or (variant is None and self.architecture == "arm64"
                                           and self.variant == "v8")

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)

