"""Registry credentials, stored the way Docker stores them.

The file is a Docker ``config.json``::

    {"auths": {"127.0.0.1:5000": {"auth": "<base64 of user:password>"}}}

so a file written by ``docker login`` can be used as is (``LAYERFS_CONFIG=~/.docker``)
and the other way round. Where it lives:

* ``$LAYERFS_CONFIG/config.json`` if ``LAYERFS_CONFIG`` names a directory (like
  ``DOCKER_CONFIG``), or ``$LAYERFS_CONFIG`` itself if it ends in ``.json``;
* otherwise ``~/.config/layerfs/config.json``.

The file is written atomically (a temporary file in the same directory, then
``rename``) with mode 0600, in a 0700 directory, under an ``flock`` so two
logins at once do not lose each other's entry. Keys layerfs does not know
(``credHelpers``, ``proxies``, ...) are kept as they are. Credential helpers
(``credsStore``) are not run: only inline ``auths`` entries are used.

Secrets are never printed: :class:`Credentials` hides the password and
identity token from ``repr``, and nothing here logs them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgument, LayerfsError

CONFIG_ENV = "LAYERFS_CONFIG"
#: The key Docker uses for Docker Hub in ``auths``.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


@dataclass(frozen=True)
class Credentials:
    """A user name and its password (or an identity token from an OAuth login)."""

    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"

    __str__ = __repr__


def config_path() -> Path:
    """Where credentials are kept (see the module docstring)."""
    value = os.environ.get(CONFIG_ENV)
    if value:
        p = Path(value).expanduser()
        return p if p.suffix == ".json" else p / "config.json"
    return Path.home() / ".config" / "layerfs" / "config.json"


def registry_host(server: str) -> str:
    """``https://host:port/v1/`` (as Docker writes keys) or ``host:port`` → ``host:port``;
    every Docker Hub spelling → ``docker.io``."""
    text = server.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    host = text.split("/", 1)[0].lower()
    if not host:
        raise InvalidArgument(f"registry {server!r}: no host name")
    return "docker.io" if host in _HUB_HOSTS else host


def _key_for(host: str) -> str:
    return DOCKER_HUB_KEY if host == "docker.io" else host


class CredentialStore:
    """The credentials in one ``config.json`` (default: :func:`config_path`)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else config_path()

    # -- reading ----------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except PermissionError as err:
            raise LayerfsError(f"{self.path}: cannot read: {err.strerror}") from None
        if not data.strip():
            return {}
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidArgument(f"{self.path} is not valid JSON: {err}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("auths", {}), dict):
            raise InvalidArgument(f"{self.path}: expected a JSON object with an \"auths\" "
                                  f"object (Docker's config.json format)")
        return doc

    def _entry(self, doc: dict[str, Any], host: str) -> tuple[str, dict[str, Any]] | None:
        for key, entry in (doc.get("auths") or {}).items():
            try:
                same = registry_host(key) == host
            except InvalidArgument:
                continue
            if same and isinstance(entry, dict):
                return key, entry
        return None

    def get(self, server: str) -> Credentials | None:
        """The credentials stored for a registry (``host[:port]``), or None."""
        host = registry_host(server)
        found = self._entry(self._read(), host)
        if found is None:
            return None
        key, entry = found
        token = entry.get("identitytoken") or None
        auth = entry.get("auth")
        username, password = entry.get("username") or "", entry.get("password") or ""
        if isinstance(auth, str) and auth:
            try:
                decoded = base64.b64decode(auth, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidArgument(f"{self.path}: the \"auth\" of {key!r} is not "
                                      f"base64 of USER:PASSWORD") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise InvalidArgument(f"{self.path}: the \"auth\" of {key!r} is not "
                                      f"base64 of USER:PASSWORD")
        if not username and not token:
            return None
        return Credentials(str(username), str(password), token)

    def registries(self) -> list[str]:
        """Registries with stored credentials (``host[:port]``)."""
        out = []
        for key in (self._read().get("auths") or {}):
            with contextlib.suppress(InvalidArgument):
                out.append(registry_host(key))
        return sorted(set(out))

    # -- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, doc: dict[str, Any]) -> None:
        data = (json.dumps(doc, indent="\t") + "\n").encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def store(self, server: str, credentials: Credentials) -> None:
        """Save credentials for a registry (replacing any), mode 0600."""
        host = registry_host(server)
        if ":" in credentials.username:
            raise InvalidArgument("a user name cannot contain ':'")
        with self._locked():
            doc = self._read()
            auths = doc.setdefault("auths", {})
            found = self._entry(doc, host)
            if found is not None:
                del auths[found[0]]
            entry: dict[str, Any] = {"auth": base64.b64encode(
                f"{credentials.username}:{credentials.password}".encode()).decode()}
            if credentials.identity_token:
                entry["identitytoken"] = credentials.identity_token
            auths[_key_for(host)] = entry
            self._write(doc)

    def erase(self, server: str) -> bool:
        """Forget a registry's credentials; False if there were none."""
        host = registry_host(server)
        with self._locked():
            doc = self._read()
            removed = False
            while (found := self._entry(doc, host)) is not None:
                del doc["auths"][found[0]]
                removed = True
            if removed:
                self._write(doc)
        return removed


__all__ = ["CONFIG_ENV", "CredentialStore", "Credentials", "config_path", "registry_host"]
