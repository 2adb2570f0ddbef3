"""Image configs: what a runtime reads from one (:class:`RunConfig`), and the Dockerfile
instructions ``import --change`` and ``commit -c`` apply to one.
"""
from __future__ import annotations

import datetime
import json
import shlex
import time
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class RunConfig:
    """What a container runtime needs from an image config (``config`` in the JSON)."""

    env: list[str]
    cmd: list[str] | None
    entrypoint: list[str] | None
    working_dir: str
    user: str
    exposed_ports: list[str]
    labels: dict[str, str]
    stop_signal: str | None
    volumes: list[str]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RunConfig:
        c = config.get("config") or {}

        def strings(value: Any) -> list[str] | None:
            if value is None:
                return None
            if isinstance(value, str):
                return [value]
            return [str(v) for v in value]

        return cls(env=strings(c.get("Env")) or [], cmd=strings(c.get("Cmd")),
                   entrypoint=strings(c.get("Entrypoint")),
                   working_dir=str(c.get("WorkingDir") or ""), user=str(c.get("User") or ""),
                   exposed_ports=sorted(c.get("ExposedPorts") or {}),
                   labels=dict(c.get("Labels") or {}), stop_signal=c.get("StopSignal"),
                   volumes=sorted(c.get("Volumes") or {}))

    @property
    def argv(self) -> list[str]:
        """Entrypoint followed by Cmd, as ``docker run IMAGE`` runs it."""
        return [*(self.entrypoint or []), *(self.cmd or [])]

    def environment(self) -> dict[str, str]:
        """Env as a dict, with Docker's default PATH when the image sets none."""
        key, _, value = DEFAULT_PATH.partition("=")
        env = {key: value}
        for item in self.env:
            key, _, value = item.partition("=")
            env[key] = value
        return env



def rfc3339(ts: float | None = None) -> str:
    when = datetime.datetime.fromtimestamp(time.time() if ts is None else ts,
                                           tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- Dockerfile-style config changes (import --change) ------------------------------------

_CHANGE_KEYS = ("CMD", "ENTRYPOINT", "ENV", "WORKDIR", "USER", "EXPOSE", "LABEL",
                "STOPSIGNAL", "VOLUME")


def _argv(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"bad JSON array {value!r}: {err}") from None
        if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
            raise InvalidArgument(f"{value!r} must be a JSON array of strings")
        return parsed
    return ["/bin/sh", "-c", value]


def _pairs(value: str, what: str) -> list[tuple[str, str]]:
    words = shlex.split(value)
    if words and "=" not in words[0]:
        key, _, rest = value.strip().partition(" ")
        return [(key, rest.strip())]
    out = []
    for word in words:
        key, sep, val = word.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{what} {value!r}: expected KEY=VALUE")
        out.append((key, val))
    return out


def apply_change(config: dict[str, Any], change: str) -> None:
    """Apply one Dockerfile instruction (``docker import --change``) to a run config."""
    keyword, _, value = change.strip().partition(" ")
    keyword = keyword.upper()
    if keyword not in _CHANGE_KEYS:
        raise InvalidArgument(f"change {change!r}: supported instructions are "
                              f"{', '.join(_CHANGE_KEYS)}")
    if not value.strip():
        raise InvalidArgument(f"change {change!r}: {keyword} needs a value")
    if keyword == "CMD":
        config["Cmd"] = _argv(value)
    elif keyword == "ENTRYPOINT":
        config["Entrypoint"] = _argv(value)
    elif keyword == "ENV":
        env = [e for e in config.get("Env") or []]
        for key, val in _pairs(value, "ENV"):
            env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={val}"]
        config["Env"] = env
    elif keyword == "WORKDIR":
        config["WorkingDir"] = value.strip()
    elif keyword == "USER":
        config["User"] = value.strip()
    elif keyword == "EXPOSE":
        ports = dict(config.get("ExposedPorts") or {})
        for port in value.split():
            ports[port if "/" in port else f"{port}/tcp"] = {}
        config["ExposedPorts"] = ports
    elif keyword == "LABEL":
        config["Labels"] = {**(config.get("Labels") or {}), **dict(_pairs(value, "LABEL"))}
    elif keyword == "STOPSIGNAL":
        config["StopSignal"] = value.strip()
    elif keyword == "VOLUME":
        vols = _argv(value) if value.strip().startswith("[") else value.split()
        config["Volumes"] = {**(config.get("Volumes") or {}), **{v: {} for v in vols}}
