"""Real registries for tests and benchmarks, all on 127.0.0.1, nothing downloaded.

* :class:`Distribution` runs Debian's ``docker-registry`` (CNCF Distribution 2.8)
  with a scratch storage folder, in one of its configurations: plain HTTP, TLS,
  htpasswd basic auth, or token auth::

      with Distribution(Path("/tmp/reg")) as reg:          # plain HTTP
          print(reg.host)                                   # 127.0.0.1:41233

      ca = TestCA(Path("/tmp/ca"))
      with Distribution(d, tls=ca.issue("registry"),
                        htpasswd={"alice": "s3cret"}) as reg: ...

* :class:`TestCA` makes a CA and certificates with the ``openssl`` command
  (server certificates for 127.0.0.1 and localhost; a signing certificate for
  tokens).
* :class:`TokenServer` is the other half of Distribution's ``auth: token``: a
  tiny HTTPS server that checks basic credentials and issues RS256 JWTs signed
  with a certificate of the test CA (``openssl dgst`` signs); the registry
  trusts them through ``rootcertbundle``. It records who asked for what.
* :class:`FaultProxy` sits in front of a plain registry and misbehaves on
  purpose: cuts a blob download after N bytes, corrupts a byte, stalls, or
  answers with an error, and records every request (method, path, Range).
* :func:`htpasswd_line` makes a bcrypt htpasswd entry (Distribution accepts
  only bcrypt) with the system's libcrypt (libxcrypt), or ``htpasswd -B`` if
  present.

Every process is started in its own session and stopped by its pid.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from layerfs_bench.peers import log_tail, stop_by_pid, wait_ready

REGISTRY_BINARY = "docker-registry"


def unavailable() -> str | None:
    """Why no registry can be started here, or None."""
    if shutil.which(REGISTRY_BINARY) is None:
        return f"{REGISTRY_BINARY} not installed (apt-get install docker-registry)"
    if shutil.which("openssl") is None:
        return "openssl not installed (apt-get install openssl)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_http(handle: Callable[[http.server.BaseHTTPRequestHandler], None], name: str, *,
               tls: CertPair | None = None) -> http.server.ThreadingHTTPServer:
    """An HTTP/1.1 server on 127.0.0.1 (an ephemeral port; TLS with ``tls``) calling
    ``handle`` for every request, whatever the method, served by a daemon thread.
    Stop it with ``shutdown()`` and ``server_close()``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            handle(self)

        do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


# --- certificates ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _openssl(*args: str, input: bytes | None = None, cwd: Path | None = None) -> bytes:
    proc = subprocess.run(["openssl", *args], input=input, capture_output=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


class TestCA:
    """A throw-away CA (RSA 2048, valid two days) in ``directory``."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "layerfs test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert = self.dir / "ca.pem"
        self.key = self.dir / "ca.key"
        if not self.cert.exists():
            _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                     "-out", str(self.cert), "-days", "2", "-subj", f"/CN={name}",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name: str, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
              usage: str = "serverAuth") -> CertPair:
        """A certificate signed by this CA: for a TLS server (``hosts`` as SANs), or with
        ``usage="signing"`` a plain signing certificate (tokens)."""
        key, csr, cert = (self.dir / f"{name}.key", self.dir / f"{name}.csr",
                          self.dir / f"{name}.pem")
        ext = self.dir / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE"]
        if usage == "signing":
            lines.append("keyUsage=critical,digitalSignature")
        else:
            sans = ",".join(f"IP:{h}" if re.match(r"^[\d.]+$|:", h) else f"DNS:{h}"
                            for h in hosts)
            lines += [f"subjectAltName={sans}", "keyUsage=critical,digitalSignature,"
                      "keyEncipherment", f"extendedKeyUsage={usage}"]
        ext.write_text("\n".join(lines) + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={hosts[0] if usage != 'signing' else name}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey",
                 str(self.key), "-CAcreateserial", "-out", str(cert), "-days", "2",
                 "-extfile", str(ext))
        return CertPair(cert, key)


def cert_der(pem: Path) -> bytes:
    return _openssl("x509", "-in", str(pem), "-outform", "DER")


# --- htpasswd ---------------------------------------------------------------------------------

def htpasswd_line(user: str, password: str, cost: int = 4) -> str:
    """``user:$2b$...`` (bcrypt; a low cost keeps the registry fast in tests)."""
    name = ctypes.util.find_library("crypt")
    if name:
        lib = ctypes.CDLL(name)
        gensalt = getattr(lib, "crypt_gensalt", None)
        if gensalt is not None:
            gensalt.restype = ctypes.c_char_p
            gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
            lib.crypt.restype = ctypes.c_char_p
            lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            salt = gensalt(b"$2b$", cost, None, 0)
            hashed = lib.crypt(password.encode(), salt) if salt else None
            if hashed and hashed.startswith(b"$2"):
                return f"{user}:{hashed.decode()}"
    if shutil.which("htpasswd"):
        out = subprocess.run(["htpasswd", "-nbB", "-C", str(max(cost, 4)), user, password],
                             capture_output=True, text=True, check=True).stdout
        return out.strip()
    raise RuntimeError("no bcrypt available: libcrypt without bcrypt and no htpasswd "
                       "(apt-get install apache2-utils)")


# --- token server ---------------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenRequest:
    user: str | None
    scopes: list[str]
    granted: list[dict[str, Any]]
    status: int


class TokenServer:
    """Issues registry tokens (Distribution's ``auth: token``) over HTTPS on 127.0.0.1.

    ``users`` maps names to passwords. Authenticated users get every action
    they ask for; anonymous requests get ``pull`` only if ``anonymous_pull``.
    Wrong credentials get 401. Every request is recorded in :attr:`requests`.
    """

    def __init__(self, ca: TestCA, users: dict[str, str], *, service: str = "layerfs-registry",
                 issuer: str = "layerfs-test-token-issuer", anonymous_pull: bool = False,
                 expires_in: int = 300) -> None:
        self.ca = ca
        self.users = users
        self.service = service
        self.issuer = issuer
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.signer = ca.issue("token-signer", usage="signing")
        self.tls = ca.issue("token-server")
        self._x5c = base64.b64encode(cert_der(self.signer.cert)).decode()
        self.requests: list[TokenRequest] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def realm(self) -> str:
        return f"https://127.0.0.1:{self.port}/token"

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (f"{_b64url(json.dumps(header).encode())}."
                         f"{_b64url(json.dumps(claims).encode())}").encode()
        signature = _openssl("dgst", "-sha256", "-sign", str(self.signer.key),
                             input=signing_input)
        return f"{signing_input.decode()}.{_b64url(signature)}"

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            if user is None:
                actions = [a for a in actions if a == "pull" and self.anonymous_pull]
            if actions:
                access.append({"type": kind, "name": name, "actions": actions})
        return access

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qs, urlparse

        url = urlparse(handler.path)
        query = parse_qs(url.query)
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        user: str | None = None
        auth = handler.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                name, password = "", ""
            if self.users.get(name) != password or not name:
                self.requests.append(TokenRequest(name or None, scopes, [], 401))
                body = b'{"details":"incorrect username or password"}'
                handler.send_response(401)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)
                return
            user = name
        granted = self._grant(user, scopes)
        now = int(time.time())
        token = self.sign({"iss": self.issuer, "sub": user or "", "aud": self.service,
                           "exp": now + self.expires_in, "nbf": now - 30, "iat": now,
                           "jti": secrets.token_hex(8), "access": granted})
        self.requests.append(TokenRequest(user, scopes, granted, 200))
        body = json.dumps({"token": token, "access_token": token,
                           "expires_in": self.expires_in}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def start(self) -> TokenServer:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="token-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Distribution -----------------------------------------------------------------------------

class Distribution:
    """``docker-registry serve`` on 127.0.0.1 with storage under ``base``.

    ``tls``: a server certificate (then HTTPS); ``htpasswd``: users and passwords
    for basic auth; ``token``: a :class:`TokenServer` for bearer auth (started
    here if it is not running yet).
    """

    def __init__(self, base: str | os.PathLike[str], *, tls: CertPair | None = None,
                 htpasswd: dict[str, str] | None = None, token: TokenServer | None = None,
                 ca: TestCA | None = None, startup_timeout: float = 30.0) -> None:
        if htpasswd and token:
            raise ValueError("choose htpasswd or token auth, not both")
        self.base = Path(base)
        self.tls = tls
        self.htpasswd = htpasswd
        self.token = token
        self.ca = ca
        self.startup_timeout = startup_timeout
        self.storage = self.base / "storage"
        self.config_path = self.base / "config.yml"
        self.log_path = self.base / "registry.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.tls.cert}", f"    key: {self.tls.key}"]
        if self.htpasswd:
            path = self.base / "htpasswd"
            path.write_text("".join(htpasswd_line(u, p) + "\n"
                                    for u, p in self.htpasswd.items()))
            lines += ["auth:", "  htpasswd:", "    realm: layerfs-test",
                      f"    path: {path}"]
        if self.token:
            bundle = self.base / "token-roots.pem"
            bundle.write_bytes(self.token.ca.cert.read_bytes())
            lines += ["auth:", "  token:", f"    realm: {self.token.realm}",
                      f"    service: {self.token.service}",
                      f"    issuer: {self.token.issuer}",
                      f"    rootcertbundle: {bundle}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Distribution:
        reason = unavailable()
        if reason:
            raise FileNotFoundError(reason)
        if self.token is not None and not self.token.port:
            self.token.start()
        self.base.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            self.config_path.write_text(self._config())
            log = open(self.log_path, "ab")
            try:
                self.proc = subprocess.Popen([shutil.which(REGISTRY_BINARY) or REGISTRY_BINARY,
                                              "serve", str(self.config_path)],
                                             stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            finally:
                log.close()
            try:
                self._wait_ready()
                return self
            except (RuntimeError, TimeoutError):
                self.stop()
                if attempt == 2 or "address already in use" not in self.log_tail():
                    raise
        return self

    def _probe(self) -> int | None:
        try:
            if self.tls:
                ctx = ssl.create_default_context(cafile=str(self.ca.cert)) if self.ca else \
                    ssl._create_unverified_context()
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, timeout=2, context=ctx)
            else:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/v2/")
                return conn.getresponse().status
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            return None

    def _wait_ready(self) -> None:
        assert self.proc is not None
        wait_ready(self.proc, lambda: self._probe() in (200, 401), what="docker-registry",
                   where=self.url, timeout=self.startup_timeout, log=self.log_path,
                   interval=0.05)

    def log_tail(self, lines: int = 5) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        stop_by_pid(self.proc, timeout=15)
        self.proc = None

    def remove_data(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def blob_path(self, digest: str) -> Path:
        """Where the registry stores a blob (to tamper with it in tests)."""
        alg, hexpart = digest.split(":", 1)
        return (self.storage / "docker/registry/v2/blobs" / alg / hexpart[:2] / hexpart /
                "data")

    def __enter__(self) -> Distribution:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# --- a proxy that misbehaves on purpose -----------------------------------------------------

@dataclass
class Fault:
    """What to do to the next ``times`` requests whose path matches ``path`` (a regex).

    ``cut_after``: send that many body bytes, then drop the connection.
    ``corrupt_at``: flip the byte at that offset of the blob (absolute, Range-aware).
    ``stall_after``: send that many bytes, then wait for :attr:`release` (or 120 s)
    before sending the rest; :attr:`stalled` is set when it gets there.
    ``status``: answer with this HTTP status at once, no body forwarded.
    """

    path: str
    method: str = "GET"
    times: int = 1
    cut_after: int | None = None
    corrupt_at: int | None = None
    stall_after: int | None = None
    status: int | None = None
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    hits: int = 0


@dataclass
class ProxiedRequest:
    method: str
    path: str
    range: str | None
    status: int = 0
    body_bytes: int = 0      # response body bytes sent to the client
    fault: str | None = None


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade"}


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (a plain-HTTP registry).

    The ``Host`` header is passed through, so the registry writes upload
    locations that point back at the proxy. ``faults`` apply in order.
    """

    def __init__(self, upstream: str) -> None:
        m = re.match(r"^http://([^:/]+):(\d+)/?$", upstream)
        if m is None:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream = (m.group(1), int(m.group(2)))
        self.faults: list[Fault] = []
        self.log: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            for f in self.faults:
                f.release.set()
            self.faults.clear()
            self.log.clear()

    def requests(self, method: str | None = None, path: str | None = None
                 ) -> list[ProxiedRequest]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (path is None or re.search(path, r.path))]

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.method == method and f.times > 0 and re.search(f.path, path):
                    f.times -= 1
                    f.hits += 1
                    return f
        return None

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        method = h.command
        entry = ProxiedRequest(method, h.path, h.headers.get("Range"))
        with self._lock:
            self.log.append(entry)
        body = self._read_body(h)
        fault = self._fault_for(method, h.path)
        if fault is not None and fault.status is not None:
            entry.status, entry.fault = fault.status, f"status {fault.status}"
            h.send_response(fault.status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            conn.request(method, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            entry.status = resp.status
            length = resp.getheader("Content-Length")
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
            if length is None and method != "HEAD":
                data = resp.read()
                out_headers.append(("Content-Length", str(len(data))))
                h.send_response(resp.status)
                for k, v in out_headers:
                    h.send_header(k, v)
                h.end_headers()
                h.wfile.write(data)
                entry.body_bytes = len(data)
                return
            h.send_response(resp.status)
            for k, v in out_headers:
                h.send_header(k, v)
            h.end_headers()
            if method == "HEAD":
                return
            start = 0
            m = re.match(r"bytes (\d+)-", resp.getheader("Content-Range") or "")
            if m:
                start = int(m.group(1))
            sent = 0
            while True:
                chunk = resp.read(64 * 1024)
                if not chunk:
                    break
                if fault is not None:
                    limit = fault.cut_after if fault.cut_after is not None else \
                        fault.stall_after
                    if fault.corrupt_at is not None and \
                            start + sent <= fault.corrupt_at < start + sent + len(chunk):
                        i = fault.corrupt_at - start - sent
                        chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                        entry.fault = f"corrupted byte {fault.corrupt_at}"
                    if limit is not None and sent + len(chunk) >= limit and \
                            not fault.stalled.is_set():
                        h.wfile.write(chunk[:limit - sent])
                        h.wfile.flush()
                        chunk, sent = chunk[limit - sent:], limit
                        entry.body_bytes = sent
                        if fault.stall_after is None:
                            entry.fault = f"cut after {limit}"
                            h.close_connection = True
                            with contextlib.suppress(OSError):
                                h.connection.shutdown(socket.SHUT_RDWR)
                            return
                        entry.fault = f"stalled after {limit}"
                        fault.stalled.set()
                        fault.release.wait(120)
                h.wfile.write(chunk)
                sent += len(chunk)
                entry.body_bytes = sent
        except OSError:
            h.close_connection = True
        finally:
            conn.close()

    @staticmethod
    def _read_body(h: http.server.BaseHTTPRequestHandler) -> bytes | None:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(h.rfile.read(size))
                h.rfile.readline()
            return b"".join(parts)
        length = h.headers.get("Content-Length")
        if length is None:
            return None
        return h.rfile.read(int(length))

    def start(self) -> FaultProxy:
        self._server = serve_http(self._serve, "fault-proxy")
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            for f in self.faults:
                f.release.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- a registry that attacks its client ------------------------------------------------------

#: One scripted answer: writes a whole response (status line included) to the handler.
Route = Callable[[http.server.BaseHTTPRequestHandler], None]


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


class HostileRegistry:
    """A made-up registry on 127.0.0.1 (plain HTTP, or TLS with ``tls``) that answers each
    path with what the test scripted (``routes``: path regex → :data:`Route`; the first
    match wins, nothing matching is a 404). Every request is kept in :attr:`seen`.

    The ``endless``, ``drip`` and ``reply`` helpers make the usual answers."""

    def __init__(self, routes: dict[str, Route] | None = None, *,
                 tls: CertPair | None = None) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.tls = tls
        self.seen: list[SeenRequest] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        self.seen.append(SeenRequest(h.command, h.path, dict(h.headers.items())))
        path = h.path.split("?", 1)[0]
        for pattern, route in self.routes.items():
            if re.search(pattern, path):
                try:
                    route(h)
                except OSError:      # the client hung up: what the attack wanted
                    h.close_connection = True
                return
        reply(h, 404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"no such thing"}]}')

    def start(self) -> HostileRegistry:
        self._server = serve_http(self._serve, "hostile-registry", tls=self.tls)
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HostileRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def reply(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"",
          headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def endless(status: int = 200, content_type: str = "application/json",
            headers: dict[str, str] | None = None) -> Route:
    """A body that never ends (chunked, 1 MiB of JSON-ish bytes per chunk)."""
    chunk = b"[" * (1 << 20)

    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        while True:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    return route


def drip(raw: bytes, every: float) -> Route:
    """Sends ``raw`` (a whole response, status line included) one byte per ``every``
    seconds, then keeps dripping spaces: never done, never silent for long."""
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        for i in range(len(raw)):
            h.wfile.write(raw[i:i + 1])
            h.wfile.flush()
            time.sleep(every)
        while True:
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(every)
    return route


def sip(every: float, size: int = 1024, *, over: int = 1 << 20) -> Route:
    """An upload step that reads a request body longer than ``over`` bytes ``size`` bytes
    per ``every`` seconds, forever (never answers); a shorter body is read whole and
    accepted (202 with a Location), so other uploads go through."""
    def route(h: http.server.BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        if length <= over:
            h.rfile.read(length)
            reply(h, 202, b"", {"Location": h.path})
            return
        while h.rfile.read(size):
            time.sleep(every)
    return route


__all__ = ["CertPair", "Distribution", "Fault", "FaultProxy", "HostileRegistry", "ProxiedRequest",
           "Route", "SeenRequest", "TestCA", "TokenServer", "drip", "endless", "free_port",
           "htpasswd_line", "reply", "sip", "unavailable"]
