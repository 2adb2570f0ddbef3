"""How registry failures read: the error classes, and one-line messages from transport
errors and from the registry's JSON error bodies.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator

import httpx

from ..errors import LayerfsError, NotFound
from .limits import ERROR_BODY_MAX, Deadline, read_body

# --- errors -----------------------------------------------------------------------------------

class RegistryError(LayerfsError):
    """The registry refused or failed a request (the message carries its error code)."""


class Unauthorized(RegistryError):
    """Authentication is missing or was refused (HTTP 401/403)."""


class TooSlow(RegistryError):
    """A request ran past its deadline, or a transfer fell below the speed limit: final,
    not worth another attempt (it would be as slow, and the bound is the user's)."""





class RegistryNotFound(RegistryError, NotFound):
    """HTTP 404 from the registry: a tag, manifest or blob that does not exist."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def ssl_error(err: BaseException) -> ssl.SSLError | None:
    for e in _chain(err):
        if isinstance(e, ssl.SSLError):
            return e
    return None


def transport_message(err: BaseException) -> str:
    tls = ssl_error(err)
    if tls is not None:
        reason = (tls.reason or "").lower().replace("_", " ")
        return f"TLS: {getattr(tls, 'verify_message', None) or reason or tls}"
    for e in _chain(err):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    text = str(err) or type(err).__name__
    return text


def transfer_error(err: httpx.HTTPError, what: str, current: Deadline | None
                   ) -> RegistryError | None:
    """A one-line error for failures not worth retrying: the request's deadline passed,
    a redirect loop, or anything else that is not a transport error (a bad encoding, a
    bad URL). None for transport errors, which the caller may retry."""
    if current is not None and current.passed():
        return TooSlow(f"{what}: {current.reason}")
    if isinstance(err, httpx.TooManyRedirects):
        return RegistryError(f"{what}: too many redirects (the registry sends the request "
                             f"round in a loop)")
    if not isinstance(err, httpx.TransportError):
        return RegistryError(f"{what}: {transport_message(err)}")
    return None


def error_detail(r: httpx.Response) -> str:
    """The registry's JSON error (``{"errors": [{"code", "message"}]}``) as ``: CODE: msg``."""
    try:
        body = read_body(r, ERROR_BODY_MAX, "", truncate=True)
        doc = json.loads(body) if body else None
    except (ValueError, RecursionError, httpx.HTTPError):
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

