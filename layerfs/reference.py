"""Image references: ``[HOST[:PORT]/]NAME[:TAG][@DIGEST]``, the one grammar for them.

Two readings of the same grammar:

* :func:`parse_reference` reads a *local* image name (``layerfs tag``, ``load``,
  ``import``): ``NAME[:TAG]``, normalised to ``name:tag``, Docker Hub names in their short
  form (``docker.io/library/busybox`` is ``busybox``).
* :class:`RemoteReference` reads a reference the way a registry client does: the first
  component is a registry host if it has a ``.`` or a ``:`` or is ``localhost`` (an IPv6
  host is written in brackets, ``[::1]:5000/app``); otherwise the image is on Docker Hub
  (``busybox`` is ``docker.io/library/busybox:latest``).

Names are lowercase path components separated by ``/`` (at most 255 characters); tags
are up to 128 letters, digits and ``_.-``, not starting with ``.`` or ``-``; digests are
checked by :func:`layerfs.digests.check_digest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .digests import check_digest
from .errors import InvalidArgument

DEFAULT_TAG = "latest"
DOCKER_HUB = "docker.io"
_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_HOST = rf"(?:\[[0-9a-fA-F:]+\]|{_LABEL}(?:\.{_LABEL})*)(?::[0-9]+)?"
_HOST_RE = re.compile(rf"^{_HOST}$")
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MAX_NAME = 255


def split_reference(text: str) -> tuple[str, str | None]:
    """``name[:tag]`` → (name, tag or None). A ``:`` before the last ``/`` is a port."""
    colon = text.rfind(":")
    if colon > text.rfind("/") and not text[colon:].endswith("]"):
        return text[:colon], text[colon + 1:]
    return text, None


def split_host(name: str) -> tuple[str | None, str]:
    """``host/path`` → (host, path) when the first component names a host (it has a ``.``
    or a ``:``, or is ``localhost``, as Docker decides); otherwise (None, name)."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, name


def valid_name(name: str) -> bool:
    """Whether ``[HOST[:PORT]/]PATH`` is a well-formed repository name."""
    host, path = split_host(name)
    return ((host is None or _HOST_RE.match(host) is not None)
            and _PATH_RE.match(path) is not None and len(name) <= MAX_NAME)


def normalize_repo(repo: str) -> str:
    """Docker Hub names in their short form: ``docker.io/library/x`` → ``x``."""
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/",
                   "index.docker.io/"):
        if repo.startswith(prefix) and len(repo) > len(prefix):
            return repo[len(prefix):]
    return repo


def is_tag(text: str) -> bool:
    return _TAG_RE.match(text) is not None


def _check_tag(tag: str, text: str) -> None:
    if not is_tag(tag):
        raise InvalidArgument(f"invalid tag in {text!r}: use letters, digits and '_.-' "
                              f"(at most 128, not starting with '.' or '-')")


def parse_reference(text: str, *, default_tag: str = DEFAULT_TAG) -> str:
    """Validate a local image name ``NAME[:TAG]`` and return it normalised as ``name:tag``."""
    if "@" in text:
        raise InvalidArgument(f"image name {text!r}: digest references (NAME@sha256:...) are "
                              f"not supported here; use NAME[:TAG] or an image id")
    repo, tag = split_reference(text)
    repo = normalize_repo(repo)
    if not valid_name(repo):
        raise InvalidArgument(f"invalid image name {text!r}: use lowercase letters, digits and "
                              f"'._-' separated by '/', e.g. busybox or lab/busybox:1.36")
    tag = default_tag if tag is None else tag
    _check_tag(tag, text)
    return f"{repo}:{tag}"


def looks_like_reference(text: str) -> bool:
    try:
        parse_reference(text)
    except InvalidArgument:
        return False
    return True


def registry_host(server: str) -> str:
    """``https://host:port/v1/`` (as Docker writes credential keys) or ``host:port`` →
    ``host:port``; every Docker Hub spelling → ``docker.io``."""
    text = server.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    host = text.split("/", 1)[0].lower()
    if not host:
        raise InvalidArgument(f"registry {server!r}: no host name")
    return DOCKER_HUB if host in _HUB_HOSTS else host


@dataclass(frozen=True)
class RemoteReference:
    """``registry/repository[:tag][@digest]``, e.g. ``127.0.0.1:5000/lab/app:v1``."""

    registry: str          # host[:port]; "docker.io" for Docker Hub
    repository: str        # "lab/app"; "library/busybox" on Docker Hub
    tag: str | None = None
    digest: str | None = None
    explicit_registry: bool = True

    @classmethod
    def parse(cls, text: str, *, default_tag: str | None = DEFAULT_TAG) -> RemoteReference:
        value = text.strip()
        if not value:
            raise InvalidArgument("empty image reference")
        name, digest = value, None
        if "@" in value:
            name, _, digest = value.partition("@")
            check_digest(digest, f"image reference {text!r}")
        repo, tag = split_reference(name)
        host, path = split_host(repo)
        explicit = host is not None
        registry = registry_host(host or DOCKER_HUB)
        if registry == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        if not _HOST_RE.match(registry) or not _PATH_RE.match(path) or len(path) > MAX_NAME:
            raise InvalidArgument(f"invalid image reference {text!r}: expected "
                                  f"[HOST[:PORT]/]NAME[:TAG|@DIGEST] with a lowercase name, "
                                  f"e.g. 127.0.0.1:5000/lab/app:v1")
        if tag is not None:
            _check_tag(tag, text)
        if tag is None and digest is None:
            tag = default_tag
        return cls(registry, path, tag, digest, explicit)

    @property
    def name(self) -> str:
        """The repository as layerfs and Docker name it locally (Docker Hub in short form)."""
        return normalize_repo(f"{self.registry}/{self.repository}")

    @property
    def local_name(self) -> str | None:
        """``name:tag`` for the image store, or None for a pull by digest only."""
        return f"{self.name}:{self.tag}" if self.tag else None

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out
