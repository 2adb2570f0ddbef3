"""Pulling images from and pushing them to registries (the OCI distribution API).

Speaks the registry HTTP API v2 (CNCF Distribution, Docker Hub, GHCR, Harbor, ...)
through :mod:`httpx`:

* **References**: ``[HOST[:PORT]/]REPO[:TAG|@DIGEST]``, as Docker reads them: the
  first component is a registry host if it has a ``.`` or a ``:`` or is
  ``localhost``; otherwise the image is on Docker Hub (``busybox`` is
  ``docker.io/library/busybox:latest``).
* **Manifests**: OCI image manifests and indexes, Docker v2 schema 2 manifests
  and manifest lists. An index resolves to one platform (this host's, or
  ``platform=``). Every manifest, config and layer is checked against its digest.
* **Auth**: the registry's ``WWW-Authenticate`` challenge decides. ``Basic``:
  the stored credentials go with every request. ``Bearer``: a token for the
  scopes the operation needs is fetched from the challenge's realm (with the
  credentials, if any) and cached until it expires or more scopes are needed.
  Credentials come from :mod:`layerfs.auth` (Docker's ``config.json`` format).
* **TLS**: verified against the system CAs plus ``ca=`` (a PEM file). With
  ``insecure=True``, and only for the host of the reference, the certificate is
  not checked and plain HTTP is tried when the host does not speak TLS;
  every other host (a token realm, a blob redirect) is still verified.

**Pull** (:func:`pull`): the layers whose chain id is not stored yet are
downloaded in parallel (``max_concurrent`` at a time, bottom first) into
staged files under the root (``ROOT/tmp/registry-blobs``), while the image
store applies them in order *from those same files as they grow*, so
extracting overlaps downloading. A download cut off mid-blob is resumed with
an HTTP ``Range`` request; a pull that died (Ctrl-C, kill, network gone)
leaves its ``.partial`` files, and the next pull of the same blob continues
from where it stopped (re-hashing what is already there). Each blob is
checked against its digest and size; a mismatch deletes the staged file and
fails the pull. The image becomes visible only when every layer is applied
(:meth:`ImageStore.load_images`): a failed pull leaves no image and no layer
behind. Two pulls (even in two processes) that need the same blob download it
once: a per-blob ``flock`` serialises the downloads and the second finds the
finished file (or the layer already applied).

**Push** (:func:`push`): for each layer, a blob the registry already has
(``HEAD``) is skipped, a blob known to be in another repository of the same
registry is cross-mounted (``POST ...?mount=&from=``), and only the rest is
compressed (gzip by default, zstd or none for OCI) and uploaded, in parallel.
The config is pushed verbatim, so the image id is the same everywhere. Which
blob holds which diff id, and where it was seen, is kept in the root's
database (table ``registry_blobs``), filled by pulls and pushes.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import urljoin

import httpx

from . import __version__, oci
from .auth import Credentials, CredentialStore, registry_host
from .driver import scratch_prefix
from .errors import InvalidArgument, LayerfsError, NotFound
from .store import now

if TYPE_CHECKING:
    from .images import Image, ImageLayer, ImageStore, Progress

log = logging.getLogger(__name__)

USER_AGENT = f"layerfs/{__version__} (+httpx/{httpx.__version__})"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
MT_DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
MT_DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_ACCEPT = ", ".join([oci.MT_OCI_INDEX, oci.MT_DOCKER_LIST, oci.MT_OCI_MANIFEST,
                             oci.MT_DOCKER_MANIFEST])
CONFIG_TYPES = {oci.MT_OCI_CONFIG, oci.MT_DOCKER_CONFIG}
#: Manifests are read whole into memory: refuse absurd ones.
MAX_MANIFEST = 4 << 20
#: Staged blobs older than this are removed by the next pull (their pull is long gone).
STAGE_MAX_AGE = 24 * 3600
STAGE_DIR = "registry-blobs"
CHUNK = 1 << 20

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


# --- errors -----------------------------------------------------------------------------------

class RegistryError(LayerfsError):
    """The registry refused or failed a request (the message carries its error code)."""


class Unauthorized(RegistryError):
    """Authentication is missing or was refused (HTTP 401/403)."""


class _Cancelled(Exception):
    """A download stopped because its pull is over."""


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


# --- options, challenges, auth -------------------------------------------------------------

@dataclass
class RegistryOptions:
    """How to reach a registry. ``insecure`` relaxes TLS for the reference's host only."""

    ca: str | os.PathLike[str] | None = None
    insecure: bool = False
    credentials: Credentials | None = None          # else: from the credential store
    credential_store: CredentialStore | None = None  # default: layerfs.auth.config_path()
    retries: int = 5
    max_concurrent: int = 3
    timeout: float = 60.0


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


class RegistryAuth(httpx.Auth):
    """Answers the registry's challenges: Basic, or Bearer tokens for the needed scopes.

    After the first challenge the scheme is known and later requests carry the
    credentials or a cached token up front (no 401 round trip per request, and
    upload bodies are sent once). Thread-safe: parallel downloads share it.
    """

    def __init__(self, host: str, credentials: Credentials | None,
                 token_client: Callable[[], httpx.Client]) -> None:
        self.host = host
        self.credentials = credentials
        self._token_client = token_client
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

    def _apply(self, request: httpx.Request) -> None:
        if self.scheme == "basic" and self.credentials is not None:
            request.headers["Authorization"] = _basic(self.credentials)
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
        creds = self.credentials
        try:
            if creds is not None and creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "client_id": "layerfs", "scope": " ".join(sorted(scopes))}
                if self.params.get("service"):
                    form["service"] = self.params["service"]
                r = client.post(realm, data=form)
            else:
                headers = {"Authorization": _basic(creds)} if creds is not None else {}
                r = client.get(realm, params=params, headers=headers)
        except httpx.TransportError as err:
            raise RegistryError(f"{self.host}: cannot reach the token service {realm}: "
                                f"{_transport_message(err)}") from err
        if r.status_code in (401, 403):
            raise Unauthorized(f"{self.host}: the token service {realm} refused the "
                               f"{'credentials' if creds else 'anonymous request'} "
                               f"(HTTP {r.status_code}){_error_detail(r)}")
        if r.status_code != 200:
            raise RegistryError(f"{self.host}: token service {realm} answered HTTP "
                                f"{r.status_code}{_error_detail(r)}")
        try:
            doc = r.json()
            token = doc.get("token") or doc.get("access_token")
            expires = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
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
            if self.credentials is None or sent_basic:
                return
            request.headers["Authorization"] = _basic(self.credentials)
            yield request


# --- talking to one registry ----------------------------------------------------------------

def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _ssl_error(err: BaseException) -> ssl.SSLError | None:
    for e in _chain(err):
        if isinstance(e, ssl.SSLError):
            return e
    return None


def _transport_message(err: BaseException) -> str:
    tls = _ssl_error(err)
    if tls is not None:
        reason = (tls.reason or "").lower().replace("_", " ")
        return f"TLS: {getattr(tls, 'verify_message', None) or reason or tls}"
    for e in _chain(err):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    text = str(err) or type(err).__name__
    return text


def _error_detail(r: httpx.Response) -> str:
    """The registry's JSON error (``{"errors": [{"code", "message"}]}``) as ``: CODE: msg``."""
    try:
        body = r.read()[:65536]
        doc = json.loads(body) if body else None
    except (ValueError, httpx.HTTPError):
        return ""
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"]:
        parts = []
        for e in doc["errors"][:3]:
            if isinstance(e, dict):
                code = str(e.get("code") or "").lower().replace("_", " ")
                msg = str(e.get("message") or "")
                parts.append(f"{code}: {msg}" if code and msg and code != msg else code or msg)
        return ": " + "; ".join(p for p in parts if p) if parts else ""
    if isinstance(doc, dict) and (doc.get("details") or doc.get("message")):
        return f": {doc.get('details') or doc.get('message')}"
    return ""


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    digest: str
    doc: dict[str, Any]


class Registry:
    """One registry host: an :class:`httpx.Client` with its TLS and auth settings.

    ``with Registry("127.0.0.1:5000", options) as reg: reg.ping(); ...``
    """

    def __init__(self, host: str, options: RegistryOptions | None = None) -> None:
        self.options = options or RegistryOptions()
        self.host = registry_host(host)
        self.api_host = DOCKER_HUB_API if self.host == DOCKER_HUB else self.host
        opts = self.options
        credentials = opts.credentials
        if credentials is None:
            store = opts.credential_store or CredentialStore()
            credentials = store.get(self.host)
        self.credentials = credentials
        self._verify = self._ssl_context(opts.ca)
        timeout = httpx.Timeout(opts.timeout, connect=min(opts.timeout, 15.0))
        limits = httpx.Limits(max_connections=max(8, opts.max_concurrent * 2),
                              max_keepalive_connections=max(8, opts.max_concurrent * 2))
        mounts: dict[str, httpx.BaseTransport | None] = {}
        if opts.insecure:
            # Only this host skips certificate checks; everything else stays verified.
            mounts[f"https://{self.api_host}"] = httpx.HTTPTransport(verify=False,
                                                                     limits=limits)
        self._token_http: httpx.Client | None = None
        self.auth = RegistryAuth(self.api_host, credentials, self._token_client)
        self.client = httpx.Client(verify=self._verify, mounts=mounts, auth=self.auth,
                                   timeout=timeout, limits=limits, follow_redirects=True,
                                   headers={"User-Agent": USER_AGENT}, trust_env=False)
        self.base: str | None = None
        self.requests = 0

    @staticmethod
    def _ssl_context(ca: str | os.PathLike[str] | None) -> ssl.SSLContext:
        ctx = httpx.create_ssl_context()
        if ca is not None:
            path = Path(ca)
            try:
                if path.is_dir():
                    ctx.load_verify_locations(capath=str(path))
                else:
                    ctx.load_verify_locations(cafile=str(path))
            except FileNotFoundError:
                raise NotFound(f"CA file {path}: no such file") from None
            except ssl.SSLError as err:
                raise InvalidArgument(f"CA file {path}: not a PEM certificate: "
                                      f"{err.reason or err}") from None
        return ctx

    def _token_client(self) -> httpx.Client:
        if self._token_http is None:
            self._token_http = httpx.Client(verify=self._verify, timeout=self.client.timeout,
                                            headers={"User-Agent": USER_AGENT},
                                            follow_redirects=True, trust_env=False)
        return self._token_http

    def close(self) -> None:
        self.client.close()
        if self._token_http is not None:
            self._token_http.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level --------------------------------------------------------------------------
    def _connect_error(self, err: httpx.TransportError, url: str) -> RegistryError:
        tls = _ssl_error(err)
        if tls is not None and isinstance(tls, ssl.SSLCertVerificationError):
            return RegistryError(
                f"{self.host}: TLS certificate not trusted ({_transport_message(err)[5:]}): "
                f"pass --ca FILE with the registry's CA certificate, or --insecure to skip "
                f"the check for this host")
        if tls is not None:
            hint = "" if self.options.insecure else \
                "; if it serves plain HTTP, pass --insecure to allow that for this host"
            return RegistryError(f"{self.host}: TLS handshake failed "
                                 f"({_transport_message(err)}){hint}")
        return RegistryError(f"{self.host}: cannot reach {url}: {_transport_message(err)}")

    def url(self, path: str) -> str:
        if self.base is None:
            self.ping()
        assert self.base is not None
        return f"{self.base}{path}"

    def request(self, method: str, path: str, *, what: str, expect: Sequence[int] = (200,),
                headers: dict[str, str] | None = None, content: Any = None,
                params: dict[str, str] | None = None, retry: bool = True,
                url: str | None = None) -> httpx.Response:
        """One request with retries (transport errors, 5xx, 429) for idempotent methods.

        A status not in ``expect`` raises a one-line error naming ``what``."""
        target = url or self.url(path)
        attempts = 1 + (self.options.retries if retry else 0)
        delay = 0.2
        for attempt in range(attempts):
            try:
                self.requests += 1
                r = self.client.request(method, target, headers=headers, content=content,
                                        params=params)
            except httpx.TransportError as err:
                if attempt + 1 < attempts and _ssl_error(err) is None:
                    log.debug("%s %s: %s; retrying", method, target, err)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                raise self._connect_error(err, target) from err
            if r.status_code in expect:
                return r
            if r.status_code in (429, 500, 502, 503, 504) and attempt + 1 < attempts:
                r.close()
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            raise self.status_error(r, what)
        raise AssertionError("unreachable")  # pragma: no cover

    def status_error(self, r: httpx.Response, what: str) -> RegistryError:
        detail = _error_detail(r)
        code = r.status_code
        if code == 401:
            hint = f"; log in with `layerfs login {self.host}`" if self.credentials is None \
                else " (check the user name and password stored for this registry)"
            return Unauthorized(f"{what}: unauthorized (HTTP 401){detail}{hint}")
        if code == 403:
            return Unauthorized(f"{what}: access denied (HTTP 403){detail}")
        if code == 404:
            return _NotFoundRegistry(f"{what}: not found (HTTP 404){detail}")
        return RegistryError(f"{what}: HTTP {code}{detail}")

    # -- the API ---------------------------------------------------------------------------
    def ping(self, *, require_auth: bool = False) -> None:
        """``GET /v2/``: finds the scheme (https, or http for an insecure host) and learns
        the auth challenge. With ``require_auth`` (login) a 401 is an error."""
        schemes = ["https", "http"] if self.options.insecure else ["https"]
        last: RegistryError | None = None
        for scheme in schemes:
            target = f"{scheme}://{self.api_host}/v2/"
            try:
                self.requests += 1
                r = self.client.get(target)
            except httpx.TransportError as err:
                last = self._connect_error(err, target)
                last.__cause__ = err
                if scheme == "https" and len(schemes) > 1:
                    continue
                raise last from err
            self.base = f"{scheme}://{self.api_host}"
            if r.status_code == 200 or (r.status_code == 401 and not require_auth):
                return
            raise self.status_error(r, f"{self.host}")
        assert last is not None
        raise last

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        what = f"{self.host}/{repository}:{reference}" if not reference.startswith("sha") \
            else f"{self.host}/{repository}@{reference}"
        r = self.request("GET", f"/v2/{repository}/manifests/{reference}", what=what,
                         headers={"Accept": MANIFEST_ACCEPT})
        data = r.content
        if len(data) > MAX_MANIFEST:
            raise InvalidArgument(f"{what}: manifest is {len(data)} bytes, more than the "
                                  f"{MAX_MANIFEST}-byte limit")
        if reference.startswith(("sha256:", "sha512:")):
            digest = reference
            _check_bytes(data, digest, f"{what}: manifest")
        else:
            digest = oci.sha256_digest(data)
            header = r.headers.get("docker-content-digest")
            if header and header.startswith("sha256:") and header != digest:
                raise InvalidArgument(f"{what}: manifest digest mismatch: the registry says "
                                      f"{header}, the bytes hash to {digest}")
        doc = oci.parse_json(data, f"{what}: manifest")
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{what}: the manifest is not a JSON object")
        media_type = r.headers.get("content-type", "").split(";", 1)[0].strip()
        if doc.get("schemaVersion") == 1 or media_type in (MT_DOCKER_SCHEMA1,
                                                          MT_DOCKER_SCHEMA1_SIGNED):
            raise InvalidArgument(f"{what}: Docker schema 1 manifests are not supported (push "
                                  f"the image again with a current Docker or skopeo)")
        if isinstance(doc.get("mediaType"), str) and doc["mediaType"]:
            media_type = doc["mediaType"]
        elif media_type not in oci.INDEX_TYPES | oci.MANIFEST_TYPES:
            media_type = oci.MT_OCI_INDEX if "manifests" in doc else oci.MT_OCI_MANIFEST
        return Manifest(data, media_type, digest, doc)

    def get_blob_bytes(self, repository: str, digest: str, size: int, what: str) -> bytes:
        if size > oci.MAX_JSON:
            raise InvalidArgument(f"{what} is {size} bytes, more than the "
                                  f"{oci.MAX_JSON}-byte limit")
        r = self.request("GET", f"/v2/{repository}/blobs/{digest}", what=what,
                         headers={"Accept-Encoding": "identity"})
        data = r.content
        if len(data) != size:
            raise InvalidArgument(f"{what} {digest}: {len(data)} bytes, the manifest says "
                                  f"{size}")
        _check_bytes(data, digest, what)
        return data

    def blob_exists(self, repository: str, digest: str) -> int | None:
        """Size of the blob if the repository has it, else None."""
        r = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", expect=(200, 404),
                         what=f"{self.host}/{repository}: blob {digest}")
        if r.status_code == 404:
            return None
        return int(r.headers.get("content-length") or -1)

    def mount_blob(self, repository: str, digest: str, source: str) -> str | None:
        """Cross-repository mount. None if mounted, else the upload URL the registry
        opened instead (it may refuse to mount and start an upload)."""
        r = self.request("POST", f"/v2/{repository}/blobs/uploads/",
                         params={"mount": digest, "from": source}, expect=(201, 202),
                         what=f"{self.host}/{repository}: mount {digest} from {source}",
                         retry=False)
        if r.status_code == 201:
            return None
        return self._location(r)

    def _location(self, r: httpx.Response) -> str:
        location = r.headers.get("location")
        if not location:
            raise RegistryError(f"{self.host}: upload answer has no Location header")
        return urljoin(str(r.url), location)

    def upload_blob(self, repository: str, digest: str, size: int, body: _FileBody,
                    location: str | None = None) -> None:
        """POST (unless ``location``), PATCH the bytes, PUT with the digest."""
        what = f"{self.host}/{repository}: upload of {digest}"
        attempts = 1 + self.options.retries
        for attempt in range(attempts):
            try:
                if location is None:
                    r = self.request("POST", f"/v2/{repository}/blobs/uploads/", what=what,
                                     expect=(202,), retry=False)
                    location = self._location(r)
                r = self.request("PATCH", "", url=location, what=what, expect=(202, 204),
                                 content=body, retry=False,
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Length": str(size)})
                location = self._location(r)
                url = httpx.URL(location).copy_merge_params({"digest": digest})
                r = self.request("PUT", "", url=str(url), what=what, expect=(201, 204),
                                 retry=False, headers={"Content-Length": "0"})
            except RegistryError as err:
                location = None
                transient = not isinstance(err, Unauthorized | _NotFoundRegistry) and \
                    isinstance(err.__cause__, httpx.TransportError)
                if transient and attempt + 1 < attempts:
                    time.sleep(min(0.2 * 2 ** attempt, 5.0))
                    continue
                raise
            got = r.headers.get("docker-content-digest")
            if got and got != digest:
                raise RegistryError(f"{what}: the registry stored {got}, not {digest}")
            return

    def put_manifest(self, repository: str, reference: str, data: bytes,
                     media_type: str) -> str:
        digest = oci.sha256_digest(data)
        r = self.request("PUT", f"/v2/{repository}/manifests/{reference}",
                         what=f"{self.host}/{repository}:{reference}: manifest",
                         expect=(200, 201, 202), content=data, retry=False,
                         headers={"Content-Type": media_type})
        got = r.headers.get("docker-content-digest")
        if got and got != digest:
            raise RegistryError(f"{self.host}/{repository}:{reference}: the registry stored the "
                                f"manifest as {got}, not {digest}")
        return digest


class _NotFoundRegistry(RegistryError, NotFound):
    """HTTP 404 from the registry: a tag, manifest or blob that does not exist."""


def _check_bytes(data: bytes, digest: str, what: str) -> None:
    h = oci.hasher_for(digest)
    h.update(data)
    got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
    if got != digest:
        raise InvalidArgument(f"{what}: digest mismatch: expected {digest}, got {got}")


# --- the blob <-> diff id table ----------------------------------------------------------

def _ensure_schema(images: ImageStore) -> None:
    images.store.extend_schema(_SCHEMA)


def _record_blobs(images: ImageStore, registry: str, repository: str,
                  rows: Sequence[tuple[str, str, str, int]]) -> None:
    """Remember that ``repository`` on ``registry`` has blob ``digest`` for ``diff_id``."""
    with images.store.transaction() as db:
        for diff_id, digest, media_type, size in rows:
            db.execute("INSERT OR REPLACE INTO registry_blobs (diff_id, digest, media_type, "
                       "size, registry, repository, seen) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (diff_id, digest, media_type, size, registry, repository, now()))


def _known_blobs(images: ImageStore, diff_id: str, registry: str) -> list[Any]:
    with images.store._lock:
        return images.store.db.execute(
            "SELECT digest, media_type, size, repository FROM registry_blobs WHERE diff_id = ? "
            "AND registry = ? ORDER BY seen DESC", (diff_id, registry)).fetchall()


def _compression_of(media_type: str) -> str:
    if media_type.endswith(("+gzip", ".gzip")):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    return "none"


# --- staged downloads ---------------------------------------------------------------------

class _Download:
    """One blob downloading into ``ROOT/tmp/registry-blobs``; readers follow the file.

    States: ``pending`` (waiting for the per-blob lock) → ``running`` → ``done``;
    or ``skipped`` (the layer got stored meanwhile: nothing to download) or
    ``failed`` (``error`` says why). ``written`` bytes of the file are readable.
    """

    def __init__(self, source: RemoteSource, digest: str, size: int,
                 needed: Callable[[], bool]) -> None:
        self.source = source
        self.digest = digest
        self.size = size
        self.needed = needed
        self.cond = threading.Condition()
        self.state = "pending"
        self.error: BaseException | None = None
        self.written = 0
        self.read_fd = -1
        self.network_bytes = 0
        self.resumed_from: int | None = None
        self.cancelled = threading.Event()
        self.future: Future[None] | None = None
        self._socket: socket.socket | None = None
        hexpart = digest.replace(":", "-")
        stage = source.stage
        self.final = stage / hexpart
        self.partial = stage / f"{hexpart}.partial"
        self.lock_path = stage / f"{hexpart}.lock"

    # -- states -----------------------------------------------------------------------------
    def _set(self, state: str, error: BaseException | None = None) -> None:
        with self.cond:
            self.state = state
            if error is not None:
                self.error = error
            self.cond.notify_all()

    def _grow(self, n: int) -> None:
        with self.cond:
            self.written += n
            self.cond.notify_all()

    def finished(self) -> bool:
        return self.state in ("done", "skipped", "failed")

    def abort(self) -> None:
        """Stop at once: a read blocked on the network is woken by shutting its socket."""
        self.cancelled.set()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def wait(self, timeout: float | None = None) -> None:
        with self.cond:
            self.cond.wait_for(self.finished, timeout)

    # -- the work ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except _Cancelled as err:
            self._set("failed", LayerfsError(f"download of {self.digest} cancelled"))
            log.debug("%s: %s", self.digest, err)
        except BaseException as err:
            self._set("failed", err)

    def _run(self) -> None:
        with _blob_lock(self.lock_path, self.cancelled):
            if not self.needed():
                self._set("skipped")
                return
            if self.final.exists():
                # Finished by an earlier pull: checked again, it is about to be trusted.
                fd = os.open(self.final, os.O_RDONLY | os.O_CLOEXEC)
                hasher = oci.hasher_for(self.digest)
                size = os.fstat(fd).st_size
                if size == self.size:
                    _hash_file(fd, size, hasher)
                if size == self.size and \
                        f"{self.digest.split(':', 1)[0]}:{hasher.hexdigest()}" == self.digest:
                    self.read_fd = fd
                    with self.cond:
                        self.written = self.size
                    self._set("done")
                    return
                os.close(fd)
                self.final.unlink()
            self._download()

    def _download(self) -> None:
        src = self.source
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            offset = os.fstat(fd).st_size
            if offset > self.size:
                os.ftruncate(fd, 0)
                offset = 0
            hasher = oci.hasher_for(self.digest)
            if offset:
                self.resumed_from = offset
                _hash_file(fd, offset, hasher)
            self.read_fd = os.open(self.partial, os.O_RDONLY | os.O_CLOEXEC)
            self._set("running")
            self._grow(offset)
            key = f"download:{self.digest}"
            progress = src.progress
            if progress is not None:
                progress.begin(key, f"{oci.short_id(self.digest)} download", self.size)
                if offset:
                    progress.advance(key, offset)
            try:
                offset = self._fetch(fd, offset, hasher, key)
            finally:
                if progress is not None:
                    progress.end(key)
            got = f"{self.digest.split(':', 1)[0]}:{hasher.hexdigest()}"
            if offset != self.size or got != self.digest:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.partial)
                if offset != self.size:
                    raise InvalidArgument(f"the registry sent {offset} bytes, the manifest "
                                          f"says {self.size}")
                raise InvalidArgument(f"digest mismatch: expected {self.digest}, got {got} "
                                      f"(the registry sent other bytes than the manifest "
                                      f"names)")
            os.rename(self.partial, self.final)
        finally:
            os.close(fd)
        self._set("done")

    def _fetch(self, fd: int, offset: int, hasher: Any, key: str) -> int:
        src = self.source
        reg = src.registry
        url = reg.url(f"/v2/{src.ref.repository}/blobs/{self.digest}")
        what = "download"   # errors are prefixed with the repository and layer by the caller
        failures = 0
        progress_at = -1    # offset of the last failure: attempts count only without progress
        delay = 0.2
        while offset < self.size:
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                reg.requests += 1
                with reg.client.stream("GET", url, headers=headers) as r:
                    stream = r.extensions.get("network_stream")
                    self._socket = stream.get_extra_info("socket") if stream else None
                    if self.cancelled.is_set():
                        raise _Cancelled()
                    if r.status_code == 416 and offset:
                        # The server does not agree our partial file is a prefix.
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.partial)
                        raise RegistryError(f"the registry refused to resume at byte "
                                            f"{offset}; the partial download was removed, "
                                            f"run the pull again")
                    if r.status_code in (429, 500, 502, 503, 504):
                        raise _Retry(f"HTTP {r.status_code}")
                    if r.status_code not in (200, 206):
                        raise reg.status_error(r, what)
                    skip = offset if (r.status_code == 200 and offset) else 0
                    if r.status_code == 206:
                        start = _content_range_start(r.headers.get("content-range"))
                        if start != offset:
                            raise InvalidArgument(f"asked for bytes from {offset}, got a "
                                                  f"range starting at {start}")
                    for chunk in r.iter_raw(CHUNK):
                        if self.cancelled.is_set():
                            raise _Cancelled()
                        if skip:
                            drop = min(skip, len(chunk))
                            chunk, skip = chunk[drop:], skip - drop
                            if not chunk:
                                continue
                        if offset + len(chunk) > self.size:
                            raise InvalidArgument(f"longer than the {self.size} bytes the "
                                                  f"manifest says")
                        os.pwrite(fd, chunk, offset)
                        hasher.update(chunk)
                        offset += len(chunk)
                        self.network_bytes += len(chunk)
                        src.count_bytes(len(chunk))
                        self._grow(len(chunk))
                        if src.progress is not None:
                            src.progress.advance(key, len(chunk))
                self._socket = None
                if offset < self.size:
                    raise _Retry("connection closed early")
            except (httpx.TransportError, _Retry) as err:
                self._socket = None
                if self.cancelled.is_set():
                    raise _Cancelled() from err
                if isinstance(err, httpx.TransportError) and _ssl_error(err) is not None \
                        and offset == 0:
                    raise reg._connect_error(err, url) from err
                if offset > progress_at:
                    failures, progress_at = 0, offset
                failures += 1
                if failures > reg.options.retries:
                    raise RegistryError(f"download failed at byte {offset} of {self.size}: "
                                        f"{_transport_message(err)} ({failures} attempts "
                                        f"without progress; run the pull again to resume)"
                                        ) from err
                log.info("%s: %s at byte %d; resuming", what, _transport_message(err), offset)
                src.resumes += 1
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        return offset


class _Retry(Exception):
    pass


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", value or "")
    return int(m.group(1)) if m else None


def _hash_file(fd: int, length: int, hasher: Any) -> None:
    pos = 0
    while pos < length:
        data = os.pread(fd, min(CHUNK * 4, length - pos), pos)
        if not data:
            break
        hasher.update(data)
        pos += len(data)


@contextlib.contextmanager
def _blob_lock(path: Path, cancelled: threading.Event | None = None, *,
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
                        raise _Cancelled() from None
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


class _TailReader:
    """Reads a blob file while its download is still writing it (waits for more bytes).

    At the end it returns EOF only once the download finished and verified the
    digest; if the download failed, its error is raised here, inside the apply."""

    def __init__(self, job: _Download) -> None:
        self.job = job
        self.pos = 0
        self.closed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        job = self.job
        view = memoryview(buf).cast("B")
        while True:
            with job.cond:
                available = job.written - self.pos
                state = job.state
                if available <= 0:
                    if state == "done":
                        return 0
                    if state == "failed":
                        assert job.error is not None
                        raise _reraise(job.error)
                    if state == "skipped":
                        raise LayerfsError(f"blob {job.digest}: download was skipped")
                    job.cond.wait(1.0)
                    continue
            n = os.preadv(job.read_fd, [view[:min(len(view), available)]], self.pos)
            if n <= 0:
                raise LayerfsError(f"blob {job.digest}: staged file is shorter than expected")
            self.pos += n
            return n

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> _TailReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reraise(err: BaseException) -> BaseException:
    """A fresh copy of a download's error for a reader (the same exception object must
    not be raised from two threads)."""
    if isinstance(err, LayerfsError):
        try:
            copy = type(err)(str(err))
        except TypeError:
            return LayerfsError(str(err))
        copy.__cause__ = err.__cause__
        return copy
    return LayerfsError(f"download failed: {err}")


class RemoteSource:
    """An :class:`oci.Source` whose members are blobs downloading from a registry.

    ``path`` of a layer is its blob digest. :meth:`start` begins downloading every
    blob whose layer the store lacks; :meth:`open` returns a reader that follows a
    download (starting it if needed); :meth:`close` stops them and cleans up.
    """

    def __init__(self, images: ImageStore, registry: Registry, ref: RemoteReference,
                 layers: Sequence[oci.LayerToLoad], chains: Sequence[str],
                 progress: Progress | None = None) -> None:
        self.images = images
        self.registry = registry
        self.ref = ref
        self.description = f"{ref.registry}/{ref.repository}"
        self.progress = progress
        self.stage = images.scratch / STAGE_DIR
        self.stage.mkdir(parents=True, exist_ok=True)
        self._sizes = {la.digest: la.size or 0 for la in layers if la.digest}
        self._chains: dict[str, list[str]] = {}
        for layer, chain in zip(layers, chains, strict=True):
            assert layer.digest is not None
            self._chains.setdefault(layer.digest, []).append(chain)
        self._jobs: dict[str, _Download] = {}
        self._all_jobs: list[_Download] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, registry.options.max_concurrent),
                                        thread_name_prefix="layerfs-pull")
        self._extra_threads: list[threading.Thread] = []
        self.downloaded = 0
        self.resumes = 0
        self.reading: _Download | None = None
        self.opened: list[str] = []

    # -- Source protocol ------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return name in self._sizes

    def size(self, name: str) -> int:
        return self._sizes[name]

    def open(self, name: str) -> BinaryIO:
        with self._lock:
            job = self._jobs.get(name)
            if job is None or job.state == "skipped" or \
                    (job.state == "failed" and job.cancelled.is_set()):
                job = self._new_job(name)
                # Needed now: start at once rather than queue behind other downloads.
                thread = threading.Thread(target=job.run, name="layerfs-pull-now", daemon=True)
                self._extra_threads.append(thread)
                thread.start()
        self.reading = job
        self.opened.append(name)
        return cast(BinaryIO, _TailReader(job))

    # -- downloads ------------------------------------------------------------------------------
    def count_bytes(self, n: int) -> None:
        with self._lock:
            self.downloaded += n

    def _needed(self, digest: str) -> Callable[[], bool]:
        chains = self._chains[digest]
        return lambda: not all(self.images.layer_chain_ready(c) for c in chains)

    def _needed_from_thread(self, digest: str) -> Callable[[], bool]:
        """The same question from a download thread, on a connection of its own: the
        store's connection (and its lock) may be busy in the applying thread, which may
        be waiting for this very download."""
        chains = self._chains[digest]
        path = self.images.store.path

        def needed() -> bool:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
            try:
                marks = ",".join("?" * len(chains))
                ready = db.execute(f"SELECT COUNT(DISTINCT chain_id) FROM image_layers WHERE "
                                   f"state = 'ready' AND chain_id IN ({marks})",
                                   chains).fetchone()[0]
            finally:
                db.close()
            return bool(ready < len(set(chains)))

        return needed

    def _new_job(self, digest: str) -> _Download:
        job = _Download(self, digest, self._sizes[digest], self._needed_from_thread(digest))
        self._jobs[digest] = job
        self._all_jobs.append(job)
        return job

    def start(self) -> list[str]:
        """Start downloading (bottom layer first) every blob whose layer is not stored.
        Returns the digests being downloaded."""
        self._gc()
        started = []
        for digest in self._chains:
            if digest in self._jobs or not self._needed(digest)():
                continue
            with self._lock:
                job = self._new_job(digest)
            job.future = self._pool.submit(job.run)
            started.append(digest)
        return started

    def _gc(self) -> None:
        """Remove staged blobs nobody has touched for a day (their pulls are long over)."""
        cutoff = time.time() - STAGE_MAX_AGE
        for lock in self.stage.glob("*.lock"):
            base = lock.name[:-len(".lock")]
            files = [self.stage / base, self.stage / f"{base}.partial"]
            try:
                stale = all(f.stat().st_mtime < cutoff for f in files if f.exists()) and \
                    lock.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if stale:
                with _blob_lock(lock, wait=False) as held:
                    if held:
                        for f in files:
                            with contextlib.suppress(FileNotFoundError):
                                f.unlink()
                        with contextlib.suppress(FileNotFoundError):
                            lock.unlink()

    def explain(self, err: BaseException) -> BaseException | None:
        """If the blob being applied when ``err`` happened turns out to be corrupt or
        incomplete, that is the real cause: wait for its download and return its error."""
        job = self.reading
        if job is None or isinstance(err, KeyboardInterrupt):
            return None
        job.wait(timeout=30)
        if job.state == "failed" and job.error is not None and \
                not job.cancelled.is_set():
            return job.error
        return None

    def close(self, success: bool) -> None:
        """Stop downloads, close files; remove staged blobs that are no longer needed
        (all, after a success; after a failure, the ones whose layer got stored anyway —
        the rest stay for the next pull to resume)."""
        for job in self._all_jobs:
            job.abort()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for thread in self._extra_threads:
            thread.join()
        for job in self._all_jobs:
            if job.read_fd >= 0:
                os.close(job.read_fd)
                job.read_fd = -1
        for digest in {job.digest for job in self._all_jobs}:
            job = self._jobs[digest]
            if not success and self._needed(digest)():
                continue
            with _blob_lock(job.lock_path, wait=False) as held:
                if not held:
                    continue  # another pull is downloading it right now
                for f in (job.final, job.partial):
                    with contextlib.suppress(FileNotFoundError):
                        f.unlink()
                with contextlib.suppress(FileNotFoundError):
                    job.lock_path.unlink()
        with contextlib.suppress(OSError):
            self.stage.rmdir()  # only if empty

    @property
    def jobs(self) -> list[_Download]:
        return list(self._all_jobs)


# --- pull ----------------------------------------------------------------------------------

@dataclass
class PullResult:
    image: Image
    reference: RemoteReference
    manifest_digest: str           # of the platform manifest pulled
    index_digest: str | None       # of the index/list it was chosen from, if any
    name: str | None               # local name given to the image
    up_to_date: bool               # the image was already here under that name
    layers_present: int            # layers skipped because they were stored
    layers_downloaded: int
    downloaded_bytes: int
    resumes: int                   # downloads resumed (Range) after a cut


def _descriptor(desc: object, what: str) -> tuple[str, str, int]:
    if not isinstance(desc, dict):
        raise InvalidArgument(f"{what}: a descriptor must be a JSON object")
    digest = oci.check_digest(desc.get("digest"), f"{what}: digest")
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{what}: bad size {size!r}")
    media_type = desc.get("mediaType")
    return digest, media_type if isinstance(media_type, str) else "", size


def _resolve_manifest(reg: Registry, ref: RemoteReference, platform: Platform,
                      explicit_platform: bool) -> tuple[Manifest, str | None]:
    """The image manifest for ``platform`` (following an index); (manifest, index digest)."""
    manifest = reg.get_manifest(ref.repository, ref.reference)
    index_digest = None
    depth = 0
    while manifest.media_type in oci.INDEX_TYPES or "manifests" in manifest.doc:
        depth += 1
        if depth > 3:
            raise InvalidArgument(f"{ref}: indexes nested too deep")
        index_digest = index_digest or manifest.digest
        entries = manifest.doc.get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument(f"{ref}: index {manifest.digest} has no \"manifests\" list")
        chosen = None
        offered = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            p: dict[str, Any] = entry["platform"] if isinstance(entry.get("platform"),
                                                                dict) else {}
            offered.append("/".join(str(x) for x in (p.get("os"), p.get("architecture"),
                                                     p.get("variant")) if x) or "?")
            if platform.matches(p):
                _descriptor(entry, f"{ref}: index manifests[{i}]")
                chosen = entry
                break
        if chosen is None:
            listed = ", ".join(o for o in offered if o != "unknown/unknown") or "none"
            raise NotFound(f"{ref}: no image for {platform} in the index (it has: {listed})"
                           f"; choose one with --platform")
        manifest = reg.get_manifest(ref.repository, chosen["digest"])
    if manifest.media_type not in oci.MANIFEST_TYPES:
        raise InvalidArgument(f"{ref}: manifest {manifest.digest} has media type "
                              f"{manifest.media_type!r}, not an image manifest")
    return manifest, index_digest


def _read_image(reg: Registry, ref: RemoteReference, manifest: Manifest, platform: Platform,
                explicit_platform: bool) -> oci.ImageToLoad:
    where = f"{ref}: manifest {oci.short_id(manifest.digest)}"
    doc = manifest.doc
    if not isinstance(doc.get("layers"), list):
        raise InvalidArgument(f"{where} has no \"layers\" list")
    c_digest, c_type, c_size = _descriptor(doc.get("config"), f"{where}: config")
    if c_type and c_type not in CONFIG_TYPES:
        raise InvalidArgument(f"{where}: config media type {c_type!r}: this is not a "
                              f"container image (an artifact?)")
    config_bytes = reg.get_blob_bytes(ref.repository, c_digest, c_size, f"{ref}: config")
    config = oci.parse_config(config_bytes, f"{ref}: config {oci.short_id(c_digest)}")
    if explicit_platform and (config.get("os"), config.get("architecture")) != \
            (platform.os, platform.architecture):
        raise InvalidArgument(f"{ref}: the image is {config.get('os')}/"
                              f"{config.get('architecture')}, not {platform}")
    diff_ids = config["rootfs"]["diff_ids"]
    descs = doc["layers"]
    if len(descs) != len(diff_ids):
        raise InvalidArgument(f"{where} lists {len(descs)} layers, its config has "
                              f"{len(diff_ids)} diff ids")
    layers = []
    for i, (desc, diff_id) in enumerate(zip(descs, diff_ids, strict=True)):
        digest, media_type, size = _descriptor(desc, f"{where}: layers[{i}]")
        if media_type and media_type not in oci.LAYER_TYPES:
            raise InvalidArgument(f"{where}: layer {digest} has media type {media_type!r}, "
                                  f"which is not a layer tar")
        layers.append(oci.LayerToLoad(digest, diff_id, digest, size, media_type or None))
    names = [ref.local_name] if ref.local_name else []
    return oci.ImageToLoad(config_bytes, config, layers, names, where)


def pull(images: ImageStore, reference: str | RemoteReference, *,
         platform: str | None = None, options: RegistryOptions | None = None,
         progress: Progress | None = None,
         report: Callable[[str], None] | None = None) -> PullResult:
    """Pull an image into the store: ``REGISTRY/REPO:TAG`` or ``REGISTRY/REPO@DIGEST``.

    A tag becomes the local name (``127.0.0.1:5000/lab/app:v1``, Docker Hub names
    short); a pull by digest alone leaves the image untagged. ``report`` gets
    one line per step (``abc123: Already exists``, ``abc123: Pull complete``)."""
    ref = reference if isinstance(reference, RemoteReference) else \
        RemoteReference.parse(reference)
    opts = options or RegistryOptions()
    if opts.insecure and not ref.explicit_registry:
        raise InvalidArgument(f"{ref}: --insecure needs a reference that names its registry "
                              f"host explicitly")
    want = Platform.parse(platform)
    say = report or (lambda line: None)
    _ensure_schema(images)
    with Registry(ref.registry, opts) as reg:
        reg.auth.add_scope(f"repository:{ref.repository}:pull")
        reg.ping()
        manifest, index_digest = _resolve_manifest(reg, ref, want, platform is not None)
        todo = _read_image(reg, ref, manifest, want, platform is not None)
        chains = oci.chain_ids([la.diff_id for la in todo.layers])
        before = None
        if ref.local_name and images.exists(ref.local_name):
            before = images.resolve(ref.local_name)
        source = RemoteSource(images, reg, ref, todo.layers, chains, progress)
        success = False
        try:
            started = source.start()
            for layer in todo.layers:
                if layer.digest not in started:
                    say(f"{oci.short_id(layer.digest or '')}: Already exists")
            try:
                loaded = images.load_images(source, [todo], verify_present=False,
                                            progress=progress)
            except Exception as err:
                cause = source.explain(err)
                if cause is not None and cause is not err:
                    where = f"{source.description}: layer {source.reading.digest}" \
                        if source.reading else source.description
                    raise _with_where(cause, where) from err
                raise
            success = True
            for job in source.jobs:
                if job.state == "done":
                    say(f"{oci.short_id(job.digest)}: Pull complete")
        finally:
            source.close(success)
    # Blobs that went through an apply were checked against both digests: remember them
    # (a push of the same layer can then HEAD or mount instead of uploading).
    _record_blobs(images, ref.registry, ref.repository,
                  [(la.diff_id, la.digest or "", la.media_type or "", la.size or 0)
                   for la in todo.layers if la.digest in source.opened] +
                  [(todo.id, todo.id, oci.MT_OCI_CONFIG, len(todo.config_bytes))])
    image = loaded[0]
    downloaded = [j for j in source.jobs if j.network_bytes]
    present = sum(1 for la in todo.layers if la.digest not in started)
    return PullResult(image, ref, manifest.digest, index_digest, ref.local_name,
                      before == image.id, present, len(downloaded),
                      source.downloaded, source.resumes)


def _with_where(err: BaseException, where: str) -> LayerfsError:
    text = str(err)
    if text.startswith(where):
        return err if isinstance(err, LayerfsError) else LayerfsError(text)
    cls = type(err) if isinstance(err, LayerfsError) else LayerfsError
    try:
        return cls(f"{where}: {text}")
    except TypeError:
        return LayerfsError(f"{where}: {text}")


# --- push ---------------------------------------------------------------------------------

@dataclass
class PushResult:
    reference: RemoteReference
    digest: str                 # of the manifest pushed
    size: int                   # of the manifest
    media_type: str
    uploaded: list[str] = field(default_factory=list)    # blob digests uploaded
    existing: list[str] = field(default_factory=list)    # already in the repository
    mounted: list[str] = field(default_factory=list)     # cross-mounted from another repo


class _FileBody:
    """A request body read from a file, re-iterable (httpx may send it again after a 401)."""

    def __init__(self, path: Path, progress: Progress | None = None, key: str = "",
                 cancel: threading.Event | None = None) -> None:
        self.path = path
        self.progress = progress
        self.key = key
        self.cancel = cancel

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                if self.cancel is not None and self.cancel.is_set():
                    raise _Cancelled("push cancelled")
                if self.progress is not None:
                    self.progress.advance(self.key, len(chunk))
                yield chunk


class _Hashing:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


MEDIA_TYPES = {
    ("docker", "gzip"): oci.MT_DOCKER_LAYER_GZIP, ("docker", "none"): oci.MT_DOCKER_LAYER,
    ("oci", "gzip"): oci.MT_OCI_LAYER_GZIP, ("oci", "none"): oci.MT_OCI_LAYER,
    ("oci", "zstd"): oci.MT_OCI_LAYER_ZSTD,
}


def _prepare_blob(images: ImageStore, layer: ImageLayer, compression: str,
                  progress: Progress | None) -> tuple[Path, str, int]:
    """Write the layer's blob (its exact tar, compressed) to a scratch file: (path, digest,
    size). gzip uses a zero mtime and no name, so the same layer gives the same blob."""
    import zstandard

    images.scratch.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix("images-push", layer.chain_id[7:]),
                               dir=images.scratch)
    key = f"compress:{layer.chain_id}"
    if progress is not None:
        progress.begin(key, f"{oci.short_id(layer.diff_id)} prepare", layer.tar_size)
    try:
        with os.fdopen(fd, "wb") as f, images.open_layer_tar(layer) as tar:
            out = _Hashing(f)
            if compression == "gzip":
                with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6,  # type: ignore[arg-type]
                                   mtime=0, filename="") as gz:
                    _copy(tar, gz, progress, key)
            elif compression == "zstd":
                cctx = zstandard.ZstdCompressor(level=3)
                with cctx.stream_writer(out, closefd=False) as zw:  # type: ignore[arg-type]
                    _copy(tar, zw, progress, key)
            else:
                _copy(tar, out, progress, key)
        return Path(tmp), "sha256:" + out.hash.hexdigest(), out.size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        if progress is not None:
            progress.end(key)


def _copy(src: IO[bytes], dst: Any, progress: Progress | None, key: str) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        if progress is not None:
            progress.advance(key, len(chunk))


def push(images: ImageStore, source: str, destination: str | None = None, *,
         format: str = "docker", compression: str = "gzip",
         options: RegistryOptions | None = None, progress: Progress | None = None,
         report: Callable[[str], None] | None = None) -> PushResult:
    """Push image ``source`` (a name or id) to ``destination`` (``REGISTRY/REPO[:TAG]``;
    default: ``source`` itself). ``format``: ``docker`` (v2 schema 2, what ``docker
    push`` writes) or ``oci``; ``compression`` of new layer blobs: ``gzip``, ``zstd``
    (oci only) or ``none``."""
    if format not in ("docker", "oci"):
        raise InvalidArgument(f"unknown manifest format {format!r}: use docker or oci")
    if (format, compression) not in MEDIA_TYPES:
        raise InvalidArgument(f"compression {compression!r} with format {format!r}: docker "
                              f"manifests take gzip or none; oci takes gzip, zstd or none")
    image = images.get(source)
    ref = RemoteReference.parse(destination or source)
    if ref.digest:
        raise InvalidArgument(f"{ref}: push to a tag, not a digest (the digest is the "
                              f"result)")
    assert ref.tag is not None
    opts = options or RegistryOptions()
    if opts.insecure and not ref.explicit_registry:
        raise InvalidArgument(f"{ref}: --insecure needs a reference that names its registry "
                              f"host explicitly")
    say = report or (lambda line: None)
    _ensure_schema(images)
    config_bytes = images.config_bytes(image.id)
    repo = ref.repository
    result_layers: list[dict[str, Any]] = []
    result = PushResult(ref, "", 0, "")
    temps: list[Path] = []
    cancel = threading.Event()
    with Registry(ref.registry, opts) as reg, \
            ThreadPoolExecutor(max_workers=max(1, opts.max_concurrent),
                               thread_name_prefix="layerfs-push") as pool:
        reg.auth.add_scope(f"repository:{repo}:pull,push")
        candidates = {la.diff_id: [row for row in _known_blobs(images, la.diff_id, ref.registry)
                                   if _compression_of(row["media_type"]) == compression]
                      for la in image.layers}
        config_rows = _known_blobs(images, image.id, ref.registry)
        sources = sorted({row["repository"] for rows in [*candidates.values(), config_rows]
                          for row in rows if row["repository"] != repo})[:8]
        for other in sources:
            reg.auth.add_scope(f"repository:{other}:pull")
        reg.ping()
        uploads: list[Future[None]] = []
        done: dict[str, tuple[str, int]] = {}
        recorded: list[tuple[str, str, str, int]] = []
        media_type = MEDIA_TYPES[(format, compression)]
        try:
            for layer in image.layers:
                short = oci.short_id(layer.diff_id)
                if layer.diff_id in done:
                    digest, size = done[layer.diff_id]
                    result_layers.append({"mediaType": media_type, "digest": digest,
                                          "size": size})
                    continue
                found = _reuse(reg, repo, candidates[layer.diff_id], result, say)
                if found is None:
                    path, digest, size = _prepare_blob(images, layer, compression, progress)
                    temps.append(path)
                    if reg.blob_exists(repo, digest) is not None:
                        result.existing.append(digest)
                        say(f"{oci.short_id(digest)}: Layer already exists")
                    else:
                        uploads.append(pool.submit(_upload, reg, repo, digest, size, path,
                                                   progress, say, result, cancel))
                    found = (digest, size)
                done[layer.diff_id] = found
                recorded.append((layer.diff_id, found[0], media_type, found[1]))
                result_layers.append({"mediaType": media_type, "digest": found[0],
                                      "size": found[1]})
                log.debug("layer %s -> %s", short, found[0])
            image_id = image.id
            if reg.blob_exists(repo, image_id) is None and \
                    _reuse(reg, repo, config_rows, result, lambda line: None) is None:
                body_path = _write_temp(images, config_bytes)
                temps.append(body_path)
                uploads.append(pool.submit(_upload, reg, repo, image_id, len(config_bytes),
                                           body_path, None, None, result, cancel))
            for fut in uploads:
                fut.result()
        except BaseException:
            cancel.set()
            for fut in uploads:
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for path in temps:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if format == "docker":
            manifest_type, config_type = oci.MT_DOCKER_MANIFEST, oci.MT_DOCKER_CONFIG
        else:
            manifest_type, config_type = oci.MT_OCI_MANIFEST, oci.MT_OCI_CONFIG
        manifest = {"schemaVersion": 2, "mediaType": manifest_type,
                    "config": {"mediaType": config_type, "digest": image_id,
                               "size": len(config_bytes)},
                    "layers": result_layers}
        data = json.dumps(manifest, indent=3).encode()
        result.digest = reg.put_manifest(repo, ref.tag, data, manifest_type)
        recorded.append((image_id, image_id, config_type, len(config_bytes)))
        result.size = len(data)
        result.media_type = manifest_type
    _record_blobs(images, ref.registry, repo, recorded)
    say(f"{ref.tag}: digest: {result.digest} size: {result.size}")
    return result


def _write_temp(images: ImageStore, data: bytes) -> Path:
    images.scratch.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix("images-push", "config"),
                               dir=images.scratch)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(tmp)


def _reuse(reg: Registry, repo: str, rows: Sequence[Any], result: PushResult,
           say: Callable[[str], None]) -> tuple[str, int] | None:
    """A blob for this layer the registry has (HEAD) or can mount from another repository."""
    for row in rows:
        if row["repository"] == repo and reg.blob_exists(repo, row["digest"]) is not None:
            result.existing.append(row["digest"])
            say(f"{oci.short_id(row['digest'])}: Layer already exists")
            return row["digest"], row["size"]
    for row in rows:
        if row["repository"] == repo:
            continue
        try:
            location = reg.mount_blob(repo, row["digest"], row["repository"])
        except RegistryError as err:
            log.debug("mount of %s from %s failed: %s", row["digest"], row["repository"], err)
            continue
        if location is None:
            result.mounted.append(row["digest"])
            say(f"{oci.short_id(row['digest'])}: Mounted from {row['repository']}")
            return row["digest"], row["size"]
        with contextlib.suppress(RegistryError, httpx.HTTPError):
            reg.request("DELETE", "", url=location, expect=(200, 202, 204, 404),
                        what="cancel upload", retry=False)
        if reg.blob_exists(repo, row["digest"]) is not None:
            result.existing.append(row["digest"])
            return row["digest"], row["size"]
    return None


def _upload(reg: Registry, repo: str, digest: str, size: int, path: Path,
            progress: Progress | None, say: Callable[[str], None] | None,
            result: PushResult, cancel: threading.Event) -> None:
    key = f"upload:{digest}"
    if progress is not None:
        progress.begin(key, f"{oci.short_id(digest)} upload", size)
    try:
        reg.upload_blob(repo, digest, size, _FileBody(path, progress, key, cancel))
    finally:
        if progress is not None:
            progress.end(key)
    result.uploaded.append(digest)
    if say is not None:
        say(f"{oci.short_id(digest)}: Pushed")


# --- login ---------------------------------------------------------------------------------

def login(server: str, credentials: Credentials, *, options: RegistryOptions | None = None,
          store: CredentialStore | None = None) -> str:
    """Check ``credentials`` against the registry (``GET /v2/`` through its auth), then
    save them. Returns the registry host."""
    host = registry_host(server)
    opts = dataclasses.replace(options or RegistryOptions(), credentials=credentials)
    with Registry(host, opts) as reg:
        reg.ping(require_auth=True)
        if reg.auth.scheme is None:
            log.info("%s asks for no authentication", host)
    (store or opts.credential_store or CredentialStore()).store(host, credentials)
    return host


def logout(server: str, *, store: CredentialStore | None = None) -> bool:
    """Forget the credentials of a registry; False if none were stored."""
    return (store or CredentialStore()).erase(server)


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
        with _blob_lock(lock, wait=False) as held:
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


__all__ = [
    "Manifest", "Platform", "PullResult", "PushResult", "Registry", "RegistryAuth",
    "RegistryError", "RegistryOptions", "RemoteReference", "RemoteSource", "Unauthorized",
    "login", "logout", "parse_challenges", "pull", "push", "remove_staged_blobs",
    "staged_blobs",
]
