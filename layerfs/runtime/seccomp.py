"""Seccomp filters: Docker's JSON profile format, compiled by libseccomp, loaded just before exec.

::

    profile (JSON, Docker's format)  ── Profile.parse ──▶ rules
      ── select(caps, arch, kernel) ──▶ the rules that apply to this container on this host
      ── libseccomp (pyseccomp) ──▶ classic BPF bytes      cached: memory, then <state>/seccomp/
      ── seccomp(2) in the container's process, after the last call it needs, before execve

The default profile (``seccomp_default.json`` next to this module) is ours, in
Docker's format, written from the semantics of Docker's published default: the
same allow list (grouped by topic here), the same argument filters (``clone``
without ``CLONE_NEW*`` flags, ``socket`` without AF_ALG/AF_VSOCK, five
``personality`` values), the same capability-gated groups and the same default
action (EPERM). ``keyctl``, ``add_key``, ``request_key``, ``unshare``, ``mount``,
``bpf``, ``kexec_load``, ``open_by_handle_at``, ``perf_event_open``,
``userfaultfd``, ``io_uring_*`` and every syscall it does not name are refused.
docs/security.md lists it.

Rule selection follows Docker (moby ``profiles/seccomp``): ``includes``/``excludes``
name capabilities (of the container's bounding set), architectures (the host's
native one, in Go's spelling: ``amd64``, ``arm64``) and a minimum kernel
(``"4.8"``). Arguments follow runc: conditions on distinct arguments are ANDed in
one rule; several conditions on the *same* argument become one rule each (ORed).

Compiling costs ~25 ms plus ~30 ms to import the binding (its ``find_library``
runs ``ldconfig``), so compiled filters are cached by a key over everything that
changes the result: the profile bytes, the capability set, the architecture, the
kernel release and the libseccomp library file. A filter is ~8 KB of BPF.

Syscalls that this host's libseccomp does not know by name (newer than it) cannot
be put in a filter: they get the default action, as with Docker on the same host
(:attr:`CompiledFilter.unknown` lists them).
"""

from __future__ import annotations

import os
import sys
import threading
import zlib
from pathlib import Path

from ..errors import InvalidArgument

DEFAULT_PROFILE_PATH = Path(__file__).with_name("seccomp_default.json")
#: Bumped when the compilation changes (invalidates cached filters).
_COMPILER_VERSION = "1"
_NATIVE = {"x86_64": ("SCMP_ARCH_X86_64", "amd64"), "aarch64": ("SCMP_ARCH_AARCH64", "arm64")}


class CompiledFilter:
    """A filter ready for seccomp(2): classic BPF (8-byte instructions) and its flags.
    (A plain class: this module is imported on every container start, and dataclasses
    cost a millisecond each to define.)"""

    __slots__ = ("bpf", "flags", "unknown")

    def __init__(self, bpf: bytes, flags: int = 0, unknown: tuple[str, ...] = ()) -> None:
        self.bpf = bpf
        self.flags = flags
        self.unknown = unknown          # names this libseccomp could not resolve

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompiledFilter) and (self.bpf, self.flags) == \
            (other.bpf, other.flags)

    def __hash__(self) -> int:
        return hash((self.bpf, self.flags))

    def to_bytes(self) -> bytes:
        """``flags`` (4 bytes) + BPF: the form kept in the cache and the container's state."""
        return self.flags.to_bytes(4, "little") + self.bpf

    @classmethod
    def from_bytes(cls, data: bytes) -> CompiledFilter:
        if len(data) < 12 or (len(data) - 4) % 8:
            raise ValueError("not a compiled seccomp filter")
        return cls(data[4:], int.from_bytes(data[:4], "little"))


def host_arch() -> tuple[str, str]:
    """(libseccomp token, Go spelling) of this host's native architecture."""
    machine = os.uname().machine
    if machine not in _NATIVE:
        raise InvalidArgument(f"seccomp: architecture {machine} is not supported by layerfs "
                              f"(x86_64, aarch64); run with --security-opt seccomp=unconfined")
    return _NATIVE[machine]


def kernel_version() -> tuple[int, int]:
    """``"6.18.44-foo"`` → (6, 18), as Docker reads it."""
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def _libseccomp_identity() -> str:
    """Which libseccomp will compile (its file's inode and mtime), found without importing
    the binding: a libseccomp upgrade must not serve filters compiled by the old one."""
    # sys.implementation._multiarch is what sysconfig's MULTIARCH says, without its
    # ~5 ms import.
    multiarch = getattr(sys.implementation, "_multiarch", "") or ""
    for d in (f"/usr/lib/{multiarch}", f"/lib/{multiarch}", "/usr/lib64", "/usr/lib", "/lib64"):
        try:
            st = os.stat(os.path.join(d, "libseccomp.so.2"))
        except OSError:
            continue
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return "unknown"


_memo: dict[bytes, CompiledFilter] = {}
_memo_lock = threading.Lock()


def default_profile_bytes() -> bytes:
    return DEFAULT_PROFILE_PATH.read_bytes()


def filter_for(profile_bytes: bytes, caps: frozenset[int],
               cache_dir: Path | None = None) -> CompiledFilter:
    """The compiled filter of ``profile_bytes`` for a container with bounding set ``caps``,
    from this process's memory, else ``cache_dir``, else compiled (and stored in both).

    A cache file holds its whole key (the profile bytes and the rest) before the BPF and
    is used only if that key is equal: no hash collision can hand out another filter,
    and no hash library needs importing on a container start (hashlib loads OpenSSL).
    """
    native, _ = host_arch()
    key = b"\0".join([
        _COMPILER_VERSION.encode(), str(sorted(caps)).encode(), native.encode(),
        os.uname().release.encode(), _libseccomp_identity().encode(), profile_bytes])
    with _memo_lock:
        hit = _memo.get(key)
    if hit is not None:
        return hit
    path = cache_dir / f"{zlib.crc32(key):08x}-{len(key)}.bpf" if cache_dir else None
    compiled = None
    if path is not None:
        try:
            data = path.read_bytes()
            if data[:len(key)] == key:
                compiled = CompiledFilter.from_bytes(data[len(key):])
        except (OSError, ValueError):
            compiled = None
    if compiled is None:
        from .seccomp_profile import Profile, compile_profile

        compiled = compile_profile(Profile.parse(profile_bytes, "(given)"), caps)
        if path is not None:
            _store(path, key + compiled.to_bytes())
    with _memo_lock:
        _memo[key] = compiled
    return compiled


def _store(path: Path, data: bytes) -> None:
    """Write atomically (a concurrent reader sees the old file or the whole new one)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass   # a cache: compiling again next time is correct, only slower
