"""Registry credentials, stored the way Docker stores them, and the HTTP auth flow that
uses them (:class:`RegistryAuth`: Basic, or Bearer tokens for the scopes needed).

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
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..errors import InvalidArgument, LayerfsError
from ..reference import registry_host
from . import limits
from .errors import RegistryError, Unauthorized, error_detail, transfer_error, transport_message

log = logging.getLogger(__name__)

CONFIG_ENV = "LAYERFS_CONFIG"
#: The key Docker uses for Docker Hub in ``auths``.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"


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
        except RecursionError:
            raise InvalidArgument(f"{self.path}: JSON nested too deep") from None
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


# --- answering a registry's challenges ------------------------------------------------------

_PARAM_RE = re.compile(r'\s*([a-zA-Z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*,?')


def parse_challenges(headers: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """``WWW-Authenticate`` values → ``[(scheme, {param: value})]`` (scheme lowercased)."""
    out: list[tuple[str, dict[str, str]]] = []
    for header in headers:
        text = header.strip()
        while text:
            m = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", text)
            if m is None:
                break
            scheme, text = m.group(1).lower(), text[m.end():]
            params: dict[str, str] = {}
            while True:
                pm = _PARAM_RE.match(text)
                if pm is None or not pm.group(0).strip():
                    break
                value = pm.group(2) if pm.group(2) is not None else pm.group(3)
                params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
                text = text[pm.end():]
                # A following "Scheme param=..." starts another challenge.
                if re.match(r"[A-Za-z][A-Za-z0-9_-]*\s+[a-zA-Z0-9_.-]+\s*=", text):
                    break
            out.append((scheme, params))
            text = text.lstrip(", ")
    return out


def _basic(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


#: Docker Hub's registry and token service are on different hosts, over HTTPS.
_KNOWN_REALMS = {"registry-1.docker.io": "auth.docker.io"}


class RegistryAuth(httpx.Auth):
    """Answers the registry's challenges: Basic, or Bearer tokens for the needed scopes.

    After the first challenge the scheme is known and later requests carry the
    credentials or a cached token up front (no 401 round trip per request, and
    upload bodies are sent once). Thread-safe: parallel downloads share it.

    Credentials go only where they cannot be read on the way: over HTTPS, or over
    plain HTTP to the registry host itself when the user marked it ``insecure``. A
    token realm on another host gets them only over HTTPS (with a warning, once); a
    plain-HTTP realm elsewhere is asked for an anonymous token instead.
    """

    def __init__(self, host: str, credentials: Credentials | None,
                 token_client: Callable[[], httpx.Client], *, insecure: bool = False,
                 deadline: float = 300.0) -> None:
        self.host = host
        self.credentials = credentials
        self._token_client = token_client
        self.insecure = insecure
        self.deadline = deadline
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self.scheme: str | None = None
        self.params: dict[str, str] = {}
        self.scopes: set[str] = set()
        self._token: str | None = None
        self._token_scopes: frozenset[str] = frozenset()
        self._token_expiry = 0.0
        self.token_requests = 0

    def add_scope(self, scope: str) -> None:
        with self._lock:
            self.scopes.add(scope)

    def _ours(self, request: httpx.Request) -> bool:
        url = httpx.URL(f"{request.url.scheme}://{self.host}/")
        return (request.url.host, request.url.port) == (url.host, url.port)

    def _same_host(self, url: httpx.URL) -> bool:
        ours = httpx.URL(f"{url.scheme}://{self.host}/")
        return (url.host, url.port) == (ours.host, ours.port)

    def credentials_for(self, url: httpx.URL) -> Credentials | None:
        """The credentials if they may be sent to ``url`` (see the class doc), else None."""
        if self.credentials is None:
            return None
        if url.scheme == "https":
            where = url.netloc.decode()
            if not self._same_host(url) and _KNOWN_REALMS.get(self.host) != url.host and \
                    where not in self._warned:
                self._warned.add(where)
                log.warning("%s: sending the credentials to the token service on another "
                            "host, %s (HTTPS)", self.host, where)
            return self.credentials
        if url.scheme == "http" and self.insecure and self._same_host(url):
            return self.credentials
        if str(url) not in self._warned:
            self._warned.add(str(url))
            log.warning("%s: not sending the credentials to %s: plain HTTP%s", self.host,
                        url.copy_with(query=None), "" if self._same_host(url) else
                        " on another host")
        return None

    def _apply(self, request: httpx.Request) -> None:
        creds = self.credentials_for(request.url) if self.scheme == "basic" else None
        if creds is not None:
            request.headers["Authorization"] = _basic(creds)
        elif self.scheme == "bearer":
            token = self._current_token(set())
            if token:
                request.headers["Authorization"] = f"Bearer {token}"

    def _current_token(self, extra: set[str], *, refresh: bool = False) -> str | None:
        with self._lock:
            wanted = frozenset(self.scopes | extra)
            fresh = self._token is not None and time.time() < self._token_expiry - 5
            if not refresh and fresh and wanted <= self._token_scopes:
                return self._token
            self._token = self._fetch_token(wanted | self._token_scopes if fresh else wanted)
            return self._token

    def _fetch_token(self, scopes: frozenset[str]) -> str:
        realm = self.params.get("realm")
        if not realm:
            raise Unauthorized(f"{self.host}: the registry asks for a bearer token but names "
                               f"no realm to get it from")
        params: list[tuple[str, str | int | float | bool | None]] = []
        if self.params.get("service"):
            params.append(("service", self.params["service"]))
        params += [("scope", s) for s in sorted(scopes)]
        client = self._token_client()
        self.token_requests += 1
        try:
            realm_url = httpx.URL(realm)
        except httpx.InvalidURL:
            raise Unauthorized(f"{self.host}: the token realm {realm!r} is not a URL") \
                from None
        creds = self.credentials_for(realm_url)
        withheld = creds is None and self.credentials is not None
        what = f"{self.host}: token service {realm}"
        with limits.deadline(self.deadline, f"no token within {self.deadline:g} s") \
                as current:
            try:
                if creds is not None and creds.identity_token:
                    form = {"grant_type": "refresh_token",
                            "refresh_token": creds.identity_token,
                            "client_id": "layerfs", "scope": " ".join(sorted(scopes))}
                    if self.params.get("service"):
                        form["service"] = self.params["service"]
                    request = client.build_request("POST", realm_url, data=form)
                else:
                    headers = {"Authorization": _basic(creds)} if creds is not None else {}
                    request = client.build_request("GET", realm_url, params=params,
                                                   headers=headers)
                r = client.send(request, stream=True)
                try:
                    if r.status_code in (401, 403):
                        sent = "credentials" if creds else "anonymous request" + (
                            " (the credentials were withheld: plain HTTP)" if withheld
                            else "")
                        raise Unauthorized(f"{self.host}: the token service {realm} "
                                           f"refused the {sent} (HTTP {r.status_code})"
                                           f"{error_detail(r)}")
                    if r.status_code != 200:
                        raise RegistryError(f"{what} answered HTTP {r.status_code}"
                                            f"{error_detail(r)}")
                    body = limits.read_body(r, limits.TOKEN_BODY_MAX, what)
                finally:
                    r.close()
            except httpx.HTTPError as err:
                final = transfer_error(err, what, current)
                if final is not None:
                    raise final from err
                raise RegistryError(f"{self.host}: cannot reach the token service {realm}: "
                                    f"{transport_message(err)}") from err
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError, RecursionError):
            token, expires = None, 0.0
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.host}: the token service {realm} sent no token")
        self._token_scopes = scopes
        self._token_expiry = time.time() + max(expires, 10.0)
        return token

    def auth_flow(self, request: httpx.Request
                  ) -> Generator[httpx.Request, httpx.Response, None]:
        if not self._ours(request):
            yield request
            return
        if "Authorization" not in request.headers:
            self._apply(request)
        response = yield request
        if response.status_code != 401:
            return
        challenges = dict(parse_challenges(response.headers.get_list("www-authenticate")))
        if "bearer" in challenges:
            sent_bearer = request.headers.get("Authorization", "").startswith("Bearer ")
            with self._lock:
                self.scheme, self.params = "bearer", challenges["bearer"]
            extra = set(challenges["bearer"].get("scope", "").split())
            if sent_bearer and extra <= self._token_scopes and \
                    challenges["bearer"].get("error") == "insufficient_scope":
                return  # a valid token without the rights: nothing more to try
            token = self._current_token(extra, refresh=sent_bearer)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request
        elif "basic" in challenges:
            sent_basic = request.headers.get("Authorization", "").startswith("Basic ")
            with self._lock:
                self.scheme, self.params = "basic", challenges["basic"]
            creds = self.credentials_for(request.url)
            if creds is None or sent_basic:
                return
            request.headers["Authorization"] = _basic(creds)
            yield request


__all__ = ["CONFIG_ENV", "CredentialStore", "Credentials", "RegistryAuth", "config_path",
           "parse_challenges", "registry_host"]
