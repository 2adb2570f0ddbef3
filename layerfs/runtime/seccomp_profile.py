"""Seccomp profiles in Docker's JSON format: parsing, rule selection, compiling.

The part of :mod:`layerfs.runtime.seccomp` that a container start does not need
once its filter is cached: parsing a profile (every field checked, one clear
error), choosing the rules that apply (Docker's ``includes``/``excludes``), and
compiling them with libseccomp. See that module for the whole picture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument
from . import security
from .seccomp import CompiledFilter, host_arch, kernel_version

#: Bound on a profile file: Docker's default is ~20 KB.
MAX_PROFILE_BYTES = 1 << 20
ACTIONS = ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP",
           "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG")
OPERATORS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE",
             "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ")
#: seccomp(2) filter flags a profile may ask for.
FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 1, "SECCOMP_FILTER_FLAG_LOG": 2,
         "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4}
#: libseccomp's architecture tokens (``includes.arches`` use Go's names instead: amd64...).
ARCHES = ("SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32", "SCMP_ARCH_ARM",
          "SCMP_ARCH_AARCH64", "SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32",
          "SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64", "SCMP_ARCH_MIPSEL64N32", "SCMP_ARCH_PPC",
          "SCMP_ARCH_PPC64", "SCMP_ARCH_PPC64LE", "SCMP_ARCH_S390", "SCMP_ARCH_S390X",
          "SCMP_ARCH_PARISC", "SCMP_ARCH_PARISC64", "SCMP_ARCH_RISCV64")


@dataclass(frozen=True)
class Condition:
    """One ``args`` entry: compare syscall argument ``index`` with ``value`` (``op``);
    for ``SCMP_CMP_MASKED_EQ``, ``arg & value == value_two``."""

    index: int
    value: int
    value_two: int
    op: str


@dataclass(frozen=True)
class When:
    """``includes``/``excludes``: capabilities, architectures, minimum kernel."""

    caps: frozenset[str] = frozenset()       # "SYS_ADMIN" (names Docker's way, no prefix)
    arches: frozenset[str] = frozenset()
    min_kernel: tuple[int, int] | None = None


@dataclass(frozen=True)
class Rule:
    names: tuple[str, ...]
    action: str
    errno: int | None
    args: tuple[Condition, ...]
    includes: When | None
    excludes: When | None


@dataclass(frozen=True)
class Profile:
    """A parsed profile; :meth:`parse` checks everything a typo could get wrong."""

    default_action: str
    default_errno: int | None
    arch_map: Mapping[str, tuple[str, ...]]     # native arch -> its sub-architectures
    architectures: tuple[str, ...]              # the profile's flat list, if it gave one
    rules: tuple[Rule, ...]
    flags: tuple[str, ...]

    @classmethod
    def parse(cls, data: bytes, source: str) -> Profile:
        """Parse Docker's JSON profile format; :class:`InvalidArgument` names the problem."""
        where = f"seccomp profile {source}"
        if len(data) > MAX_PROFILE_BYTES:
            raise InvalidArgument(f"{where}: larger than {MAX_PROFILE_BYTES} bytes")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as err:
            raise InvalidArgument(f"{where}: not JSON: {err}") from None
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{where}: must be a JSON object")
        if doc.get("listenerPath"):
            raise InvalidArgument(f"{where}: listenerPath (SCMP_ACT_NOTIFY) is not supported "
                                  f"by layerfs")
        default = _action(doc.get("defaultAction"), f"{where}: defaultAction")
        arch_map: dict[str, tuple[str, ...]] = {}
        for i, entry in enumerate(_list(doc.get("archMap"), f"{where}: archMap")):
            if not isinstance(entry, dict):
                raise InvalidArgument(f"{where}: archMap[{i}] must be an object")
            arch = _arch(entry.get("architecture"), f"{where}: archMap[{i}].architecture")
            subs = tuple(_arch(a, f"{where}: archMap[{i}].subArchitectures")
                         for a in _list(entry.get("subArchitectures"),
                                        f"{where}: archMap[{i}].subArchitectures"))
            arch_map[arch] = subs
        arches = tuple(_arch(a, f"{where}: architectures")
                       for a in _list(doc.get("architectures"), f"{where}: architectures"))
        if arch_map and arches:
            raise InvalidArgument(f"{where}: give either 'architectures' or 'archMap', not both")
        flags = tuple(_str(f, f"{where}: flags") for f in _list(doc.get("flags"), f"{where}: flags"))
        for flag in flags:
            if flag not in FLAGS:
                raise InvalidArgument(f"{where}: flag {flag!r} is not one of {', '.join(FLAGS)}")
        rules = tuple(_rule(r, f"{where}: syscalls[{i}]")
                      for i, r in enumerate(_list(doc.get("syscalls"), f"{where}: syscalls")))
        return cls(default, _errno(doc.get("defaultErrnoRet"), f"{where}: defaultErrnoRet"),
                   arch_map, arches, rules, flags)

    def select(self, caps: frozenset[int], native: str,
               kernel: tuple[int, int]) -> list[Rule]:
        """The rules that apply to a container with bounding set ``caps`` on a host whose
        native architecture is ``native`` (Go's spelling) running ``kernel``."""
        names = frozenset(security.CAPABILITIES[c] for c in caps)
        chosen = []
        for rule in self.rules:
            ex, inc = rule.excludes, rule.includes
            if ex is not None and (native in ex.arches or ex.caps & names or
                                   (ex.min_kernel is not None and kernel >= ex.min_kernel)):
                continue
            if inc is not None and ((inc.arches and native not in inc.arches) or
                                    not inc.caps <= names or
                                    (inc.min_kernel is not None and kernel < inc.min_kernel)):
                continue
            chosen.append(rule)
        return chosen


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"{where}: must be a list")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{where}: must be a non-empty string, not {value!r}")
    return value


def _action(value: object, where: str) -> str:
    text = _str(value, where)
    if text not in ACTIONS:
        raise InvalidArgument(f"{where}: {text!r} is not one of {', '.join(ACTIONS)}")
    return text


def _arch(value: object, where: str) -> str:
    text = _str(value, where)
    if text not in ARCHES:
        raise InvalidArgument(f"{where}: unknown architecture {text!r}")
    return text


def _errno(value: object, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise InvalidArgument(f"{where}: must be an errno number, not {value!r}")
    return value


def _u64(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise InvalidArgument(f"{where}: must be an unsigned 64-bit number, not {value!r}")
    return value


def _when(value: object, where: str) -> When | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: must be an object")
    # Unknown names are kept: like Docker, a rule that needs a capability this kernel
    # does not have never applies.
    caps = frozenset(_str(c, f"{where}.caps").upper().removeprefix("CAP_")
                     for c in _list(value.get("caps"), f"{where}.caps"))
    arches = frozenset(_str(a, f"{where}.arches") for a in _list(value.get("arches"),
                                                               f"{where}.arches"))
    minimum = None
    if value.get("minKernel"):
        parts = _str(value["minKernel"], f"{where}.minKernel").split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise InvalidArgument(f"{where}.minKernel: {value['minKernel']!r} is not "
                                  f"'<kernel>.<major>', e.g. '4.8'")
        minimum = (int(parts[0]), int(parts[1]))
    return When(caps, arches, minimum)


def _rule(value: object, where: str) -> Rule:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: must be an object")
    if value.get("name") and value.get("names"):
        raise InvalidArgument(f"{where}: give either 'name' or 'names', not both")
    names = ([value["name"]] if value.get("name") else
             _list(value.get("names"), f"{where}.names"))
    if not names:
        raise InvalidArgument(f"{where}: names no syscall")
    args = []
    for i, arg in enumerate(_list(value.get("args"), f"{where}.args")):
        at = f"{where}.args[{i}]"
        if not isinstance(arg, dict):
            raise InvalidArgument(f"{at}: must be an object")
        index = arg.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 5:
            raise InvalidArgument(f"{at}.index: must be 0-5, not {index!r}")
        op = _str(arg.get("op"), f"{at}.op")
        if op not in OPERATORS:
            raise InvalidArgument(f"{at}.op: {op!r} is not one of {', '.join(OPERATORS)}")
        args.append(Condition(index, _u64(arg.get("value", 0), f"{at}.value"),
                              _u64(arg.get("valueTwo", 0), f"{at}.valueTwo"), op))
    return Rule(tuple(_str(n, f"{where}.names") for n in names),
                _action(value.get("action"), f"{where}.action"),
                _errno(value.get("errnoRet"), f"{where}.errnoRet"), tuple(args),
                _when(value.get("includes"), f"{where}.includes"),
                _when(value.get("excludes"), f"{where}.excludes"))


def _cond_groups(args: Sequence[Condition]) -> list[tuple[Condition, ...]]:
    """runc's rule: distinct arguments AND in one rule; repeated ones OR (a rule each)."""
    indexes = [a.index for a in args]
    if len(set(indexes)) == len(indexes):
        return [tuple(args)]
    return [(a,) for a in args]


def compile_profile(profile: Profile, caps: frozenset[int]) -> CompiledFilter:
    """Compile with libseccomp (slow: use :func:`filter_for`, which caches)."""
    import pyseccomp as sc  # type: ignore[import-untyped]

    def action(name: str, errno: int | None) -> int:
        code = errno if errno is not None else 1    # Docker's and runc's default: EPERM
        table = {"SCMP_ACT_KILL": sc.KILL_THREAD, "SCMP_ACT_KILL_THREAD": sc.KILL_THREAD,
                 "SCMP_ACT_KILL_PROCESS": sc.KILL_PROCESS, "SCMP_ACT_TRAP": sc.TRAP,
                 "SCMP_ACT_ERRNO": sc.ERRNO(code), "SCMP_ACT_TRACE": sc.TRACE(code),
                 "SCMP_ACT_ALLOW": sc.ALLOW, "SCMP_ACT_LOG": sc.LOG}
        return int(table[name])

    native, native_go = host_arch()
    ops = {name: getattr(sc, name.removeprefix("SCMP_CMP_")) for name in OPERATORS}
    default = action(profile.default_action, profile.default_errno)
    filt = sc.SyscallFilter(default)
    filt.set_attr(sc.Attr.CTL_NNP, 0)      # no_new_privs is ours to set (security.become)
    wanted = list(profile.architectures) or [native, *profile.arch_map.get(native, ())]
    for arch in wanted:
        token = getattr(sc.Arch, arch.removeprefix("SCMP_ARCH_"))
        if arch != native and not filt.exist_arch(token):
            filt.add_arch(token)
    unknown: list[str] = []
    for rule in profile.select(caps, native_go, kernel_version()):
        act = action(rule.action, rule.errno)
        if act == default:
            continue           # libseccomp refuses a rule that repeats the default action
        for name in rule.names:
            number = sc.resolve_syscall(sc.Arch.NATIVE, name)
            if number == -1:   # __NR_SCMP_ERROR: newer than this libseccomp
                if name not in unknown:
                    unknown.append(name)
                continue
            for group in _cond_groups(rule.args):
                conds = [sc.Arg(c.index, ops[c.op], c.value, c.value_two) for c in group]
                try:
                    filt.add_rule(act, number, *conds)
                except OSError as err:
                    raise InvalidArgument(f"seccomp: rule for {name}: libseccomp refused it: "
                                          f"{err.strerror}") from None
    fd = os.memfd_create("layerfs-seccomp", os.MFD_CLOEXEC)
    try:
        with open(fd, "w+b", closefd=False) as f:
            filt.export_bpf(f)
            f.seek(0)
            bpf = f.read()
    finally:
        os.close(fd)
    flags = 0
    for flag in profile.flags:
        flags |= FLAGS[flag]
    return CompiledFilter(bpf, flags, tuple(unknown))


def names_in(profile: Profile, action: str = "SCMP_ACT_ALLOW") -> Iterable[str]:
    """Every syscall name a rule with ``action`` mentions (for docs and tests)."""
    for rule in profile.rules:
        if rule.action == action:
            yield from rule.names
