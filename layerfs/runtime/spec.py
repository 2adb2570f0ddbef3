"""What to run: :class:`ContainerSpec`, validated on construction.

A spec is plain data, the runtime's equivalent of an OCI ``config.json`` cut to
what layerfs needs. The CLI builds one from ``layerfs run`` flags with the
``parse_*`` helpers below (``-v``, ``-p``, ``-m``, ``-u``); every bad value raises
:class:`~layerfs.errors.InvalidArgument` naming the flag and the value, before
anything is created on the host.

The rootfs is a directory that is already mounted (the storage driver's mount);
the runtime never chooses or mounts layers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import InvalidArgument

NetworkMode = Literal["bridge", "none", "host"]
NETWORK_MODES = ("bridge", "none", "host")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MIN_MEMORY = 6 * 1024 * 1024  # Docker's floor: below this the runtime itself cannot start
_MAX_PROFILE = 1 << 20         # seccomp_profile.MAX_PROFILE_BYTES (not imported: spec stays light)

_ID_RE = re.compile(r"^[a-f0-9]{12,64}$")
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_HOSTNAME_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
                          r"(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$")
@dataclass(frozen=True)
class Volume:
    """A host directory or file bind-mounted into the container (``-v src:dst[:ro]``)."""

    source: Path
    target: str
    readonly: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source))
        if not self.source.is_absolute():
            raise InvalidArgument(f"volume source {self.source}: must be an absolute path")
        object.__setattr__(self, "target", _container_path(self.target, "volume target"))
        if self.target == "/":
            raise InvalidArgument(f"volume {self.source}: cannot mount over the container's /")


@dataclass(frozen=True)
class PortMapping:
    """A published port (``-p [host_ip:]host_port:container_port[/proto]``), done as DNAT."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str | None = None

    def __post_init__(self) -> None:
        for what, port in (("host", self.host_port), ("container", self.container_port)):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise InvalidArgument(f"port mapping {self}: {what} port {port!r} is not in "
                                      f"1-65535")
        if self.protocol not in ("tcp", "udp"):
            raise InvalidArgument(f"port mapping {self}: protocol {self.protocol!r} is not "
                                  f"tcp or udp")
        if self.host_ip is not None:
            _ipv4(self.host_ip, "port mapping host address")

    def __str__(self) -> str:
        ip = f"{self.host_ip}:" if self.host_ip else ""
        return f"{ip}{self.host_port}:{self.container_port}/{self.protocol}"


@dataclass(frozen=True)
class IdMap:
    """One line of a user namespace uid or gid map: ``count`` ids from ``container_id``."""

    container_id: int
    host_id: int
    count: int

    def __post_init__(self) -> None:
        if min(self.container_id, self.host_id) < 0 or self.count < 1 or \
                max(self.container_id, self.host_id) + self.count > 1 << 32:
            raise InvalidArgument(f"id map {self}: ids must be >= 0, count >= 1, within 32 bits")

    def line(self) -> str:
        return f"{self.container_id} {self.host_id} {self.count}\n"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything the engine needs to run one container.

    ``user`` is ``(uid, gid)`` inside the container (``parse_user`` turns
    ``"1000:1000"`` into that). With ``userns`` the container gets its own user
    namespace mapping container ids ``0..65535`` to ``uid_map``/``gid_map`` on the
    host. ``memory`` is in bytes, ``cpus`` a fraction of CPUs (``0.5`` = half a
    core), ``pids_limit`` the most tasks at once. ``id`` is generated when not
    given; ``name`` is a free label for ``ps``.

    Privileges (docs/security.md): ``cap_add``/``cap_drop`` change Docker's default
    capability set (names, ``ALL``); ``seccomp`` is ``"default"`` (our copy of
    Docker's profile), ``"unconfined"`` or the bytes of a profile in Docker's JSON
    format; ``no_new_privileges`` (on by default, unlike Docker) makes setuid bits
    and file capabilities grant nothing.
    """

    rootfs: Path
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"
    user: tuple[int, int] = (0, 0)
    groups: Sequence[int] = ()
    hostname: str | None = None
    volumes: Sequence[Volume] = ()
    memory: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    network: NetworkMode = "bridge"
    ports: Sequence[PortMapping] = ()
    userns: bool = False
    uid_map: Sequence[IdMap] = (IdMap(0, 100000, 65536),)
    gid_map: Sequence[IdMap] = (IdMap(0, 100000, 65536),)
    read_only: bool = False
    cap_add: Sequence[str] = ()
    cap_drop: Sequence[str] = ()
    seccomp: str | bytes = "default"
    no_new_privileges: bool = True
    id: str = ""
    name: str | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("rootfs", Path(self.rootfs))
        if not self.rootfs.is_absolute():
            raise InvalidArgument(f"rootfs {self.rootfs}: must be an absolute path")
        if isinstance(self.argv, str) or not self.argv:
            raise InvalidArgument(f"argv {self.argv!r}: must be a non-empty list of strings")
        put("argv", tuple(self.argv))
        for arg in self.argv:
            if not isinstance(arg, str) or "\0" in arg:
                raise InvalidArgument(f"argv {self.argv!r}: {arg!r} is not a string without NUL")
        env = dict(self.env)
        for key, value in env.items():
            if not key or "=" in key or "\0" in key or "\0" in str(value):
                raise InvalidArgument(f"environment variable {key!r}: bad name or value")
        put("env", env)
        put("cwd", _container_path(self.cwd, "working directory"))
        uid, gid = self.user
        for what, v in (("uid", uid), ("gid", gid), *(("group", g) for g in self.groups)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 32:
                raise InvalidArgument(f"user {self.user!r}: {what} {v!r} is not a 32-bit id")
        put("groups", tuple(self.groups))
        if not self.id:
            put("id", os.urandom(16).hex())
        elif not _ID_RE.match(self.id):
            raise InvalidArgument(f"container id {self.id!r}: must be 12-64 lowercase hex digits")
        if self.name is not None and not _NAME_RE.match(self.name):
            raise InvalidArgument(f"container name {self.name!r}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*")
        if self.hostname is None:
            put("hostname", self.id[:12])
        elif len(self.hostname) > 64 or not _HOSTNAME_RE.match(self.hostname):
            raise InvalidArgument(f"hostname {self.hostname!r}: not a valid host name")
        put("volumes", tuple(v if isinstance(v, Volume) else Volume(*v) for v in self.volumes))
        targets = [v.target for v in self.volumes]
        if len(set(targets)) != len(targets):
            raise InvalidArgument(f"volumes {targets}: a target is given twice")
        if self.memory is not None and (isinstance(self.memory, bool) or
                                        not isinstance(self.memory, int) or
                                        self.memory < MIN_MEMORY):
            raise InvalidArgument(f"memory limit {self.memory!r}: must be at least "
                                  f"{MIN_MEMORY} bytes (6m)")
        if self.cpus is not None:
            ncpu = os.cpu_count() or 1
            if not isinstance(self.cpus, int | float) or not 0.01 <= self.cpus <= ncpu:
                raise InvalidArgument(f"cpus {self.cpus!r}: must be between 0.01 and {ncpu} "
                                      f"(the CPUs this host has)")
        if self.pids_limit is not None and (isinstance(self.pids_limit, bool) or
                                            not isinstance(self.pids_limit, int) or
                                            self.pids_limit < 1):
            raise InvalidArgument(f"pids limit {self.pids_limit!r}: must be a positive integer")
        if self.network not in NETWORK_MODES:
            raise InvalidArgument(f"network {self.network!r}: use one of {', '.join(NETWORK_MODES)}")
        put("ports", tuple(p if isinstance(p, PortMapping) else PortMapping(*p)
                           for p in self.ports))
        if self.ports and self.network != "bridge":
            raise InvalidArgument(f"published ports {[str(p) for p in self.ports]}: need "
                                  f"--network bridge, not {self.network}")
        seen = {(p.protocol, p.host_ip, p.host_port) for p in self.ports}
        if len(seen) != len(self.ports):
            raise InvalidArgument(f"published ports {[str(p) for p in self.ports]}: a host port "
                                  f"is given twice")
        from .security import container_caps
        put("cap_add", tuple(self.cap_add))
        put("cap_drop", tuple(self.cap_drop))
        container_caps(self.cap_add, self.cap_drop)          # InvalidArgument on a bad name
        if isinstance(self.seccomp, bytes):
            from .seccomp_profile import Profile
            Profile.parse(self.seccomp, "given to the container")
        elif self.seccomp not in ("default", "unconfined"):
            raise InvalidArgument(f"seccomp {self.seccomp!r}: use 'default', 'unconfined' or "
                                  f"the bytes of a JSON profile")
        put("uid_map", tuple(m if isinstance(m, IdMap) else IdMap(*m) for m in self.uid_map))
        put("gid_map", tuple(m if isinstance(m, IdMap) else IdMap(*m) for m in self.gid_map))
        if self.userns and (not self.uid_map or not self.gid_map):
            raise InvalidArgument("user namespace: uid_map and gid_map must not be empty")

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def environment(self) -> dict[str, str]:
        """The environment the process starts with: Docker's defaults, then ``env``."""
        base = {"PATH": DEFAULT_PATH, "HOSTNAME": self.hostname or self.short_id,
                "HOME": "/root" if self.user[0] == 0 else "/"}
        base.update(self.env)
        return base


# --- parsers for command-line style values -----------------------------------------------------
def _container_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"{what} {path!r}: must be an absolute path")
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise InvalidArgument(f"{what} {path!r}: must not contain '..'")
    return "/" + "/".join(parts)


def _ipv4(text: str, what: str) -> str:
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise InvalidArgument(f"{what} {text!r}: not an IPv4 address")
    return text


def parse_volume(text: str) -> Volume:
    """``/host:/container[:ro|:rw]`` → :class:`Volume`."""
    parts = text.split(":")
    mode = "rw"
    if len(parts) == 3:
        mode = parts.pop()
    if len(parts) != 2 or mode not in ("ro", "rw"):
        raise InvalidArgument(f"volume {text!r}: use /host/path:/container/path[:ro]")
    return Volume(Path(parts[0]), parts[1], mode == "ro")


def parse_port(text: str) -> PortMapping:
    """``[host_ip:]host_port:container_port[/tcp|/udp]`` → :class:`PortMapping`."""
    spec, _, proto = text.partition("/")
    parts = spec.split(":")
    host_ip = parts.pop(0) if len(parts) == 3 else None
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise InvalidArgument(f"port mapping {text!r}: use [ip:]host_port:container_port[/proto]")
    host, cont = (int(p) for p in parts)
    for what, port in (("host", host), ("container", cont)):
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"port mapping {text!r}: {what} port {port} is not in 1-65535")
    return PortMapping(host, cont, proto or "tcp", host_ip)


def parse_user(text: str) -> tuple[int, int]:
    """``"uid[:gid]"`` (numeric; names would need the image's /etc/passwd) → ``(uid, gid)``."""
    uid, _, gid = text.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise InvalidArgument(f"user {text!r}: use numeric uid[:gid]")
    return int(uid), int(gid or uid)


@dataclass(frozen=True)
class SecurityOptions:
    """What ``--security-opt`` values ask for (:func:`parse_security_opts`)."""

    seccomp: str | bytes = "default"
    no_new_privileges: bool = True


def parse_security_opts(items: Iterable[str]) -> SecurityOptions:
    """Docker's ``--security-opt`` values: ``seccomp=unconfined|default|PROFILE.json`` and
    ``no-new-privileges[=true|false]`` (``:`` works as well as ``=``). ``apparmor=unconfined``
    and ``label=disable`` are accepted (layerfs has neither); other AppArmor or SELinux
    options are refused: layerfs cannot honour them (docs/security.md)."""
    seccomp: str | bytes = "default"
    nnp = True
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            key, sep, value = item.partition(":")
        key = key.strip()
        if key == "seccomp" and sep:
            if value in ("unconfined", "default", "builtin"):
                seccomp = "default" if value == "builtin" else value
                continue
            try:
                with open(value, "rb") as f:
                    data = f.read(_MAX_PROFILE + 1)
            except OSError as err:
                raise InvalidArgument(f"--security-opt {item}: cannot read the profile: "
                                      f"{err.strerror}") from None
            from .seccomp_profile import Profile
            Profile.parse(data, value)
            seccomp = data
        elif key == "no-new-privileges":
            if not sep or value.lower() in ("true", "1"):
                nnp = True
            elif value.lower() in ("false", "0"):
                nnp = False
            else:
                raise InvalidArgument(f"--security-opt {item}: use no-new-privileges[=true|false]")
        elif (key, value) in (("apparmor", "unconfined"), ("label", "disable")):
            continue
        elif key in ("apparmor", "label", "systempaths", "mask", "unmask"):
            raise InvalidArgument(f"--security-opt {item}: not supported (layerfs has no AppArmor "
                                  f"or SELinux; see docs/security.md)")
        else:
            raise InvalidArgument(f"--security-opt {item!r}: use seccomp=unconfined|PROFILE.json "
                                  f"or no-new-privileges[=true|false]")
    return SecurityOptions(seccomp, nnp)


def parse_env(items: Iterable[str]) -> dict[str, str]:
    """``["A=1", "B=2"]`` → ``{"A": "1", "B": "2"}``."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"environment {item!r}: use NAME=value")
        env[key] = value
    return env
