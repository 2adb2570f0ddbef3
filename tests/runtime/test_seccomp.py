"""The seccomp filter: Docker's deny set refused from inside, common workloads unharmed.

Each container test runs ``lfs-probe`` (syscall_probe.c) once with the default
profile and, where it shows what the filter changes, once with
``seccomp=unconfined``: the unconfined run reproduces what issue 20 found (the
host root's keyring reachable, user namespaces and their mounts), the default run
shows it refused.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.errors import InvalidArgument
from layerfs.runtime import ContainerSpec, RuntimeConfig, exec_in, parse_security_opts
from layerfs.runtime import seccomp as sc
from layerfs.runtime import seccomp_profile as sp
from layerfs.runtime.security import DEFAULT_CAPS, cap_number, container_caps

from .conftest import Session
from .helpers import run, sh, start_logged

# What the default profile answers (the kernel here is >= 4.8, so ptrace is allowed).
DEFAULT_ANSWERS = {
    "keyctl": "EPERM", "keyctl-list": "EPERM", "request_key": "EPERM", "add_key": "EPERM",
    "unshare-user-mount": "EPERM", "clone-newuser": "EPERM", "clone3": "ENOSYS",
    "kexec_load": "EPERM", "open_by_handle_at": "EPERM", "bpf": "EPERM",
    "perf_event_open": "EPERM", "mount": "EPERM", "userfaultfd": "EPERM",
    "io_uring_setup": "EPERM", "personality-norandom": "EPERM", "socket-vsock": "EPERM",
    "socket-alg": "EPERM",
    "ptrace": "OK", "personality-query": "OK", "socket-inet": "OK", "threads": "OK",
}
# Without a filter the same calls get through (or fail for other reasons): these are the
# ones whose answer the filter changes on this host.
UNCONFINED_GET_THROUGH = ("keyctl", "keyctl-list", "unshare-user-mount", "clone-newuser",
                          "clone3", "perf_event_open", "io_uring_setup",
                          "personality-norandom", "socket-vsock")


def probe_answers(out: str) -> dict[str, str]:
    answers = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith("key "):
            answers[parts[0]] = parts[1]
    return answers


def run_probe(rootfs: Path, state: Path, config: RuntimeConfig, probe: str, names: list[str],
              **kw: object) -> tuple[dict[str, str], str]:
    status, out = run(ContainerSpec(rootfs=rootfs, argv=[probe, *names], network="none",
                                    **kw), state, config)  # type: ignore[arg-type]
    assert status.code == 0, out
    return probe_answers(out), out


def test_default_profile_refuses_dockers_deny_set(rootfs: Path, state: Path,
                                                  config: RuntimeConfig, probe: str) -> None:
    names = list(DEFAULT_ANSWERS)
    answers, out = run_probe(rootfs, state, config, probe, names)
    assert answers == DEFAULT_ANSWERS, out
    unconfined, out = run_probe(rootfs, state, config, probe, names, seccomp="unconfined")
    for name in UNCONFINED_GET_THROUGH:
        assert unconfined[name] == "OK", (name, out)
    assert unconfined["unshare-user-mount"] == "OK"  # ...and the tmpfs mount inside it worked


# --- the host root's keyring ------------------------------------------------------------------

_KEY_NR = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
KEY_SPEC_USER_KEYRING = -4
KEYCTL_UNLINK, KEYCTL_SEARCH = 9, 10


def add_host_key(description: str) -> int:
    key = _libc.syscall(_KEY_NR[0], b"user", description.encode(), b"secret", 6,
                        KEY_SPEC_USER_KEYRING)
    if key < 0:
        raise OSError(ctypes.get_errno(), "add_key")
    return int(key)


def find_host_key(description: str) -> int | None:
    key = _libc.syscall(_KEY_NR[1], KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, b"user",
                        description.encode(), 0)
    return None if key < 0 else int(key)


def unlink_host_key(key: int) -> None:
    _libc.syscall(_KEY_NR[1], KEYCTL_UNLINK, key, KEY_SPEC_USER_KEYRING, 0, 0)


@pytest.fixture
def host_key() -> Iterator[str]:
    """A key of ours in the host root's user keyring (@u); removed by its id."""
    description = f"lfs-test-{os.urandom(4).hex()}"
    added = [description, description + "-from-container"]
    add_host_key(description)
    yield description
    for desc in added:
        while (key := find_host_key(desc)) is not None:
            unlink_host_key(key)


def test_host_keyring_is_out_of_reach(rootfs: Path, state: Path, config: RuntimeConfig,
                                      probe: str, host_key: str) -> None:
    argv = ["keyctl-list", f"keyctl-unlink:{host_key}", f"add_key:{host_key}-from-container"]
    # Without the filter: the escape of issue 20, reproduced.
    _, out = run_probe(rootfs, state, config, probe, argv, seccomp="unconfined")
    assert f";{host_key}" in out, out                         # the host's key, listed
    assert "keyctl-unlink OK 1" in out, out                   # ... and unlinked
    assert find_host_key(host_key) is None
    assert find_host_key(host_key + "-from-container") is not None   # outlives the container
    # With the default profile: nothing is reachable.
    unlink_host_key(find_host_key(host_key + "-from-container") or 0)
    add_host_key(host_key)
    answers, out = run_probe(rootfs, state, config, probe, argv)
    assert answers == {"keyctl-list": "EPERM", "keyctl-unlink": "EPERM", "add_key": "EPERM"}, out
    assert host_key not in out
    assert find_host_key(host_key) is not None
    assert find_host_key(host_key + "-from-container") is None


# --- capabilities change the rules, as in Docker -----------------------------------------------

def test_capabilities_open_their_syscall_groups(rootfs: Path, state: Path,
                                                config: RuntimeConfig, probe: str) -> None:
    answers, out = run_probe(rootfs, state, config, probe, ["open_by_handle_at"],
                             cap_add=["DAC_READ_SEARCH"])
    assert answers["open_by_handle_at"] not in ("EPERM", "OK"), out   # reached the kernel
    # CAP_SYS_ADMIN: mount, unshare and clone with namespace flags are allowed, as in Docker.
    answers, out = run_probe(rootfs, state, config, probe, ["mount", "clone-newuser", "clone3"],
                             cap_add=["SYS_ADMIN"])
    assert answers == {"mount": "OK", "clone-newuser": "OK", "clone3": "OK"}, out
    status, out = run(sh(rootfs, "grep -e CapBnd -e NoNewPrivs -e Seccomp: /proc/self/status",
                         cap_drop=["ALL"], cap_add=["NET_BIND_SERVICE"]), state, config)
    assert status.code == 0 and "CapBnd:\t0000000000000400" in out and "Seccomp:\t2" in out, out


def test_no_new_privileges_off_keeps_the_filter(rootfs: Path, state: Path,
                                                config: RuntimeConfig, probe: str) -> None:
    status, out = run(sh(rootfs, f"grep -e NoNewPrivs -e Seccomp: /proc/self/status; {probe} "
                                 "keyctl", no_new_privileges=False), state, config)
    assert status.code == 0, out
    assert "NoNewPrivs:\t0" in out and "Seccomp:\t2" in out and "keyctl EPERM" in out, out


def test_exec_gets_the_containers_filter(rootfs: Path, state: Path, config: RuntimeConfig,
                                         probe: str) -> None:
    c, _ = start_logged(sh(rootfs, "sleep 30"), state, config)
    try:
        out_path = state / "exec-out"
        with open(out_path, "wb") as out, open(os.devnull, "rb") as null:
            p = exec_in(c, [probe, "keyctl", "unshare-user-mount", "threads"], stdin=null,
                        stdout=out, stderr=out)
        assert p.wait(timeout=20).code == 0
        assert probe_answers(out_path.read_text()) == {
            "keyctl": "EPERM", "unshare-user-mount": "EPERM", "threads": "OK"}
    finally:
        c.kill(9)
        c.wait()


def test_common_workloads_still_run(rootfs: Path, state: Path, config: RuntimeConfig,
                                    probe: str) -> None:
    script = ("seq 1 2000 | sort -rn | head -3 | tr '\\n' ' '; echo; "
              "mkdir -p /tmp/w && cd /tmp/w && echo data > f && ln -s f l && ln f h && "
              "chmod 600 f && touch -d @0 f && mv h h2 && ls -l | wc -l; "
              "(sleep 0.1 & wait); echo $? ; tar -C /tmp -cf - w | tar -tf - | wc -l; "
              f"{probe} threads socket-inet ptrace; rm -rf /tmp/w")
    status, out = run(sh(rootfs, script), state, config)
    assert status.code == 0, out
    lines = out.splitlines()
    assert lines[:4] == ["2000 1999 1998 ", "4", "0", "4"], out
    assert probe_answers("\n".join(lines[4:])) == {"threads": "OK", "socket-inet": "OK",
                                                   "ptrace": "OK"}


def test_a_profile_in_dockers_format(rootfs: Path, state: Path, config: RuntimeConfig,
                                     tmp_path: Path) -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                             "errnoRet": 13}]}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    opts = parse_security_opts([f"seccomp={path}"])
    _, out = run(sh(rootfs, "mkdir /tmp/x 2>&1; echo rc=$?; touch /tmp/y && echo made; "
                            "rm -f /tmp/y", seccomp=opts.seccomp), state, config)
    assert "Permission denied" in out and "rc=1" in out and "made" in out, out
    path.write_text('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], '
                    '"action": "SCMP_ACT_MAYBE"}]}')
    with pytest.raises(InvalidArgument, match=r"syscalls\[0\]\.action.*SCMP_ACT_MAYBE"):
        parse_security_opts([f"seccomp={path}"])
    with pytest.raises(InvalidArgument, match="cannot read"):
        parse_security_opts([f"seccomp={tmp_path / 'missing.json'}"])


# --- the profile itself (no container) ------------------------------------------------------------

def default_profile() -> sp.Profile:
    return sp.Profile.parse(sc.default_profile_bytes(), "default")


def allowed_for(caps: frozenset[int], kernel: tuple[int, int] = (6, 1),
                arch: str = "amd64") -> set[str]:
    return {name for rule in default_profile().select(caps, arch, kernel)
            if rule.action == "SCMP_ACT_ALLOW" and not rule.args for name in rule.names}


def test_default_profile_shape() -> None:
    allowed = allowed_for(DEFAULT_CAPS)
    refused = {"keyctl", "add_key", "request_key", "unshare", "mount", "umount2", "setns",
               "kexec_load", "kexec_file_load", "open_by_handle_at", "bpf", "perf_event_open",
               "userfaultfd", "io_uring_setup", "init_module", "reboot", "swapon", "pivot_root",
               "clock_settime", "iopl", "lookup_dcookie", "fanotify_init", "quotactl",
               "sethostname", "syslog", "acct", "clone3", "fsopen", "move_mount", "open_tree"}
    assert not refused & allowed
    assert {"read", "execve", "fork", "futex", "chroot", "ptrace", "arch_prctl"} <= allowed
    # clone is allowed only without namespace flags (an argument filter, not a name).
    clones = [r for r in default_profile().select(DEFAULT_CAPS, "amd64", (6, 1))
              if "clone" in r.names]
    assert [(c.index, c.value, c.value_two, c.op) for r in clones for c in r.args] == [
        (0, 0x7E020000, 0, "SCMP_CMP_MASKED_EQ")]


def test_rule_selection_follows_dockers_conditions() -> None:
    assert "ptrace" not in allowed_for(DEFAULT_CAPS, kernel=(4, 7))
    assert "ptrace" in allowed_for(DEFAULT_CAPS, kernel=(4, 8))
    sys_ptrace = container_caps(["SYS_PTRACE"])
    assert {"ptrace", "kcmp", "pidfd_getfd"} <= allowed_for(sys_ptrace, kernel=(4, 7))
    sys_admin = container_caps(["SYS_ADMIN"])
    assert {"mount", "unshare", "setns", "clone", "clone3", "bpf"} <= allowed_for(sys_admin)
    assert "arch_prctl" not in allowed_for(DEFAULT_CAPS, arch="arm64")
    assert "clock_settime" in allowed_for(container_caps(["SYS_TIME"]))
    assert "chroot" not in allowed_for(container_caps(cap_drop=["SYS_CHROOT"]))


@pytest.mark.parametrize(("text", "error"), [
    (b"[]", "must be a JSON object"),
    (b"{", "not JSON"),
    (b'{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], '
     b'"archMap": [{"architecture": "SCMP_ARCH_X86_64"}]}', "either 'architectures' or"),
    (b'{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": "read", "names": ["read"], '
     b'"action": "SCMP_ACT_ALLOW"}]}', "either 'name' or 'names'"),
    (b'{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], '
     b'"action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}',
     r"index: must be 0-5"),
    (b'{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], '
     b'"action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}]}',
     "unsigned 64-bit"),
    (b'{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x.sock", "syscalls": []}',
     "listenerPath"),
    (b'{"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NOPE"]}', "flag"),
    (b'{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], '
     b'"action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4"}}]}', "minKernel"),
    (b"[" * 100_000, "not JSON"),
])
def test_bad_profiles_get_one_clear_error(text: bytes, error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        sp.Profile.parse(text, "test.json")


def test_compiled_filters_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = b'{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["keyctl"], ' \
              b'"action": "SCMP_ACT_ERRNO"}]}'
    calls = []
    real = sp.compile_profile

    def counting(p: sp.Profile, caps: frozenset[int]) -> sc.CompiledFilter:
        calls.append(caps)
        return real(p, caps)

    monkeypatch.setattr(sp, "compile_profile", counting)
    monkeypatch.setattr(sc, "_memo", {})
    first = sc.filter_for(profile, DEFAULT_CAPS, tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.bpf"))) == 1
    monkeypatch.setattr(sc, "_memo", {})          # a new process: only the disk cache
    assert sc.filter_for(profile, DEFAULT_CAPS, tmp_path) == first
    assert len(calls) == 1
    sc.filter_for(profile, container_caps(["SYS_ADMIN"]), tmp_path)   # another key
    assert len(calls) == 2


def test_security_opt_parsing(tmp_path: Path) -> None:
    assert parse_security_opts([]) == parse_security_opts(["seccomp=default"])
    assert parse_security_opts(["seccomp:unconfined"]).seccomp == "unconfined"
    assert parse_security_opts(["no-new-privileges"]).no_new_privileges is True
    assert parse_security_opts(["no-new-privileges=false"]).no_new_privileges is False
    assert parse_security_opts(["apparmor=unconfined", "label=disable"]).seccomp == "default"
    for bad in ("apparmor=docker-default", "label=type:x", "seccomp", "privileged"):
        with pytest.raises(InvalidArgument):
            parse_security_opts([bad])
    with pytest.raises(InvalidArgument, match="capability 'NET_PWN'"):
        container_caps(["NET_PWN"])
    assert cap_number("cap_sys_admin") == cap_number("SYS_ADMIN") == 21



@pytest.mark.slow
@pytest.mark.timeout(900)
def test_debian_apt_and_dpkg_under_the_filter(debian_tree: Path, lfs: Session, state: Path,
                                              config: RuntimeConfig) -> None:
    """A debootstrapped Debian (minbase): dpkg builds, installs and removes a package,
    apt checks and queries, all under the default profile (network none)."""
    import shutil
    import subprocess

    tree = lfs.base / "debian"
    subprocess.run(["cp", "-a", str(debian_tree), str(tree)], check=True)   # ours to change
    try:
        script = (
            "set -e; mkdir -p /tmp/p/DEBIAN; printf 'Package: lfs-probe\\nVersion: 1\\n"
            "Architecture: all\\nMaintainer: t <t@t>\\nDescription: probe\\n' "
            "> /tmp/p/DEBIAN/control; mkdir -p /tmp/p/usr/share/lfs; echo hi > "
            "/tmp/p/usr/share/lfs/f; dpkg-deb --build /tmp/p /tmp/p.deb >/dev/null; "
            "dpkg -i /tmp/p.deb >/dev/null; dpkg-query -W -f='${Status}\\n' lfs-probe; "
            "cat /usr/share/lfs/f; apt-get check >/dev/null && echo apt-check-ok; "
            "apt-cache policy apt | head -n1; dpkg -r lfs-probe >/dev/null; "
            "test ! -e /usr/share/lfs/f && echo removed; grep Seccomp: /proc/self/status")
        status, out = run(ContainerSpec(rootfs=tree, argv=["/bin/sh", "-c", script],
                                        network="none"), state, config, timeout=300)
        assert status.code == 0, out
        assert out.splitlines() == ["install ok installed", "hi", "apt-check-ok", "apt:",
                                    "removed", "Seccomp:\t2"], out
    finally:
        shutil.rmtree(tree, ignore_errors=True)
