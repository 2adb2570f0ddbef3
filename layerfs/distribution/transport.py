"""Talking to one registry host: TLS, retries, auth, and the HTTP API v2 calls
(:class:`Registry`); checking credentials (:func:`login`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from .. import __version__, oci
from ..digests import sha256_digest, verify_bytes
from ..errors import InvalidArgument, NotFound
from ..reference import DOCKER_HUB
from . import limits as bounds
from .auth import Credentials, CredentialStore, RegistryAuth, registry_host
from .errors import (
    RegistryError,
    RegistryNotFound,
    TooSlow,
    Unauthorized,
    error_detail,
    ssl_error,
    transfer_error,
    transport_message,
)

log = logging.getLogger(__name__)

USER_AGENT = f"layerfs/{__version__} (+httpx/{httpx.__version__})"
DOCKER_HUB_API = "registry-1.docker.io"
MT_DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
MT_DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_ACCEPT = ", ".join([oci.MT_OCI_INDEX, oci.MT_DOCKER_LIST, oci.MT_OCI_MANIFEST,
                             oci.MT_DOCKER_MANIFEST])
CONFIG_TYPES = {oci.MT_OCI_CONFIG, oci.MT_DOCKER_CONFIG}
#: Manifests are read whole into memory: refuse absurd ones.
MAX_MANIFEST = 4 << 20
CHUNK = 1 << 20
#: Compressed answers would be inflated before their size is known: ask for none.
HEADERS = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}


# --- options ---------------------------------------------------------------------------------

@dataclass
class RegistryOptions:
    """How to reach a registry. ``insecure`` relaxes TLS for the reference's host only."""

    ca: str | os.PathLike[str] | None = None
    insecure: bool = False
    credentials: Credentials | None = None          # else: from the credential store
    credential_store: CredentialStore | None = None  # default: auth.config_path()
    retries: int = 5
    max_concurrent: int = 3
    timeout: float = 60.0     # per connect, read or write
    #: Whole request, retries and body included (manifests, configs, tokens, uploads'
    #: steps and the answer to an upload; not the bytes of a blob, which have the rate
    #: below instead).
    deadline: float = 300.0
    #: A blob download or upload slower than ``speed_limit`` bytes/s for ``speed_time``
    #: seconds fails (curl's --speed-limit / --speed-time), without another attempt.
    speed_limit: int = 1024
    speed_time: float = 30.0


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
            mounts[f"https://{self.api_host}"] = bounds.transport(False, limits)
        self._limits = limits
        self._token_http: httpx.Client | None = None
        self.auth = RegistryAuth(self.api_host, credentials, self._token_client,
                                 insecure=opts.insecure, deadline=opts.deadline)
        self.client = httpx.Client(transport=bounds.transport(self._verify, limits),
                                   mounts=mounts, auth=self.auth,
                                   timeout=timeout, follow_redirects=True,
                                   headers=HEADERS, trust_env=False)
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
            self._token_http = httpx.Client(
                transport=bounds.transport(self._verify, self._limits),
                timeout=self.client.timeout, headers=HEADERS, follow_redirects=True,
                trust_env=False)
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
    def _connect_error(self, err: httpx.HTTPError, url: str) -> RegistryError:
        tls = ssl_error(err)
        if tls is not None and isinstance(tls, ssl.SSLCertVerificationError):
            return RegistryError(
                f"{self.host}: TLS certificate not trusted ({transport_message(err)[5:]}): "
                f"pass --ca FILE with the registry's CA certificate, or --insecure to skip "
                f"the check for this host")
        if tls is not None:
            hint = "" if self.options.insecure else \
                "; if it serves plain HTTP, pass --insecure to allow that for this host"
            return RegistryError(f"{self.host}: TLS handshake failed "
                                 f"({transport_message(err)}){hint}")
        return RegistryError(f"{self.host}: cannot reach {url}: {transport_message(err)}")

    def url(self, path: str) -> str:
        if self.base is None:
            self.ping()
        assert self.base is not None
        return f"{self.base}{path}"

    def request(self, method: str, path: str, *, what: str, expect: Sequence[int] = (200,),
                headers: dict[str, str] | None = None, content: Any = None,
                params: dict[str, str] | None = None, retry: bool = True,
                url: str | None = None,
                max_body: int = bounds.SMALL_BODY_MAX) -> httpx.Response:
        """One request with retries (transport errors, 5xx, 429) for idempotent methods,
        over within ``options.deadline``, its body read whole but refused beyond
        ``max_body`` bytes. A streamed ``content`` (a blob upload) is held to the speed
        limit instead while it is sent, and its answer to ``options.deadline`` after.

        A status not in ``expect`` raises a one-line error naming ``what``."""
        target = url or self.url(path)
        attempts = 1 + (self.options.retries if retry else 0)
        delay = 0.2
        opts = self.options
        answer = f"no complete answer within {opts.deadline:g} s"
        # A streamed upload takes as long as its size needs, but no slower than the speed
        # limit while it is sent; then its answer has the deadline any answer has.
        streamed = content is not None and not isinstance(content, bytes)
        slow = f"slower than {opts.speed_limit} bytes/s for {opts.speed_time:g} s"
        with bounds.deadline(opts.speed_time if streamed else opts.deadline,
                             slow if streamed else answer) as current:
            if streamed:
                assert current is not None
                content = bounds.PacedBody(
                    content, bounds.SpeedLimit(current, opts.speed_limit, opts.speed_time),
                    opts.deadline, answer)
            for attempt in range(attempts):
                try:
                    self.requests += 1
                    r = self.client.send(self.client.build_request(
                        method, target, headers=headers, content=content, params=params),
                        stream=True)
                    try:
                        if r.status_code in expect:
                            return bounds.whole(r, max_body, what)
                        if r.status_code in (429, 500, 502, 503, 504) and \
                                attempt + 1 < attempts:
                            time.sleep(delay)
                            delay = min(delay * 2, 5.0)
                            continue
                        raise self.status_error(r, what)
                    finally:
                        r.close()
                except httpx.HTTPError as err:
                    final = transfer_error(err, what, current)
                    if final is not None:
                        raise final from err
                    if attempt + 1 < attempts and ssl_error(err) is None:
                        log.debug("%s %s: %s; retrying", method, target, err)
                        time.sleep(delay)
                        delay = min(delay * 2, 5.0)
                        continue
                    raise self._connect_error(err, target) from err
        raise AssertionError("unreachable")  # pragma: no cover

    def status_error(self, r: httpx.Response, what: str) -> RegistryError:
        detail = error_detail(r)
        code = r.status_code
        if code == 401:
            hint = f"; log in with `layerfs login {self.host}`" if self.credentials is None \
                else " (check the user name and password stored for this registry)"
            return Unauthorized(f"{what}: unauthorized (HTTP 401){detail}{hint}")
        if code == 403:
            return Unauthorized(f"{what}: access denied (HTTP 403){detail}")
        if code == 404:
            return RegistryNotFound(f"{what}: not found (HTTP 404){detail}")
        return RegistryError(f"{what}: HTTP {code}{detail}")

    # -- the API ---------------------------------------------------------------------------
    def ping(self, *, require_auth: bool = False) -> None:
        """``GET /v2/``: finds the scheme (https, or http for an insecure host) and learns
        the auth challenge. With ``require_auth`` (login) a 401 is an error."""
        schemes = ["https", "http"] if self.options.insecure else ["https"]
        last: RegistryError | None = None
        for scheme in schemes:
            target = f"{scheme}://{self.api_host}/v2/"
            seconds = self.options.deadline
            with bounds.deadline(seconds, f"no complete answer within {seconds:g} s") \
                    as current:
                try:
                    self.requests += 1
                    with self.client.stream("GET", target) as r:
                        self.base = f"{scheme}://{self.api_host}"
                        if r.status_code == 200 or (r.status_code == 401 and
                                                    not require_auth):
                            bounds.read_body(r, bounds.SMALL_BODY_MAX, self.host,
                                             truncate=True)
                            return
                        raise self.status_error(r, f"{self.host}")
                except httpx.HTTPError as err:
                    final = transfer_error(err, self.host, current)
                    if final is not None:
                        raise final from err
                    last = self._connect_error(err, target)
                    last.__cause__ = err
                    if scheme == "https" and len(schemes) > 1:
                        continue
                    raise last from err
        assert last is not None
        raise last

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        what = f"{self.host}/{repository}:{reference}" if not reference.startswith("sha") \
            else f"{self.host}/{repository}@{reference}"
        r = self.request("GET", f"/v2/{repository}/manifests/{reference}",
                         what=what, headers={"Accept": MANIFEST_ACCEPT},
                         max_body=MAX_MANIFEST)
        data = r.content
        if reference.startswith(("sha256:", "sha512:")):
            digest = reference
            verify_bytes(data, digest, f"{what}: manifest")
        else:
            digest = sha256_digest(data)
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
                         max_body=size)
        data = r.content
        if len(data) != size:
            raise InvalidArgument(f"{what} {digest}: {len(data)} bytes, the manifest says "
                                  f"{size}")
        verify_bytes(data, digest, what)
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
        location: str | None = r.headers.get("location")
        if not location:
            raise RegistryError(f"{self.host}: upload answer has no Location header")
        return urljoin(str(r.url), location)

    def upload_blob(self, repository: str, digest: str, size: int, body: Iterable[bytes],
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
                transient = not isinstance(err, Unauthorized | RegistryNotFound | TooSlow) and \
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
        digest = sha256_digest(data)
        r = self.request("PUT", f"/v2/{repository}/manifests/{reference}",
                         what=f"{self.host}/{repository}:{reference}: manifest",
                         expect=(200, 201, 202), content=data, retry=False,
                         headers={"Content-Type": media_type})
        got = r.headers.get("docker-content-digest")
        if got and got != digest:
            raise RegistryError(f"{self.host}/{repository}:{reference}: the registry stored the "
                                f"manifest as {got}, not {digest}")
        return digest


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

