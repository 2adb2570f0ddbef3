"""No host binary is ever reachable from a container (issue 20, item 2; CVE-2019-5736).

The container's processes are forks of the runner's python. They exec through the
sealed helper (layerfs/runtime/helper.py), and PID 1 becomes that helper, so neither
``/proc/self/exe`` at exec time, nor ``/proc/1/exe``, nor an inherited descriptor is a
file of the host.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.runtime import ContainerSpec, RuntimeConfig, exec_in
from layerfs.runtime import helper as lfs_helper

from .conftest import Session
from .helpers import run, sh, start_logged

HOST_PYTHON = os.stat(os.path.realpath(sys.executable))


def _host_ids() -> set[str]:
    ids = {f"{HOST_PYTHON.st_dev}:{HOST_PYTHON.st_ino}"}
    libpython = Path(sys.base_prefix) / "lib"
    for lib in libpython.glob("libpython3*.so*"):
        st = os.stat(lib)
        ids.add(f"{st.st_dev}:{st.st_ino}")
    return ids


@pytest.fixture
def evil_root(lfs: Session, tmp_path: Path) -> Path:
    """The test rootfs plus a '#!/proc/self/exe' script, and (x86-64) an exe probe where
    the dynamic loader belongs: if a host binary ran, the probe would report it."""
    root = tmp_path / "evil"
    shutil.copytree(lfs.rootfs, root, symlinks=True)
    (root / "evil.sh").write_text("#!/proc/self/exe\necho the script ran\n")
    os.chmod(root / "evil.sh", 0o755)
    if os.uname().machine == "x86_64":
        (root / "lib64").mkdir()
        src = Path(__file__).with_name("exe_probe.c")
        subprocess.run(["cc", "-nostdlib", "-static", "-O2", "-ffreestanding", "-fno-builtin",
                        "-fno-tree-loop-distribute-patterns", "-fno-stack-protector", "-o",
                        str(root / "lib64" / "ld-linux-x86-64.so.2"), str(src)], check=True)
    return root


def test_proc_self_exe_script_never_runs_a_host_binary(evil_root: Path, state: Path,
                                                       config: RuntimeConfig) -> None:
    # The container's command itself is the script: our helper execs it, so the kernel
    # resolves /proc/self/exe to the helper, which refuses. Before: the kernel ran the
    # host's python here, and the probe printed "exe-probe" with its device and inode (the
    # host binary's) and "open-write 26" (ETXTBSY: luck).
    status, out = run(ContainerSpec(rootfs=evil_root, argv=["/evil.sh"], network="none"),
                      state, config)
    assert status.code == 126, out
    assert "refusing to run as /proc/self/exe" in out and "exe-probe" not in out, out
    # A shell in the container running it resolves /proc/self/exe to its own busybox.
    status, out = run(sh(evil_root, "/evil.sh; echo rc=$?"), state, config)
    assert "exe-probe" not in out and "the script ran" not in out, out
    c, _ = start_logged(sh(evil_root, "sleep 30"), state, config)
    try:
        out_path = state / "exec.out"
        with open(out_path, "wb") as f, open(os.devnull, "rb") as null:
            p = exec_in(c, ["/evil.sh"], stdin=null, stdout=f, stderr=f)
        assert p.wait(timeout=20).code == 126
        assert "exe-probe" not in out_path.read_text()
    finally:
        c.kill(9)
        c.wait()


def test_no_host_file_through_exe_links_or_fds(rootfs: Path, state: Path,
                                               config: RuntimeConfig) -> None:
    # With CAP_SYS_PTRACE the container may look at PID 1's exe and fds at all.
    script = ("for f in /proc/self/exe /proc/1/exe /proc/self/fd/* /proc/1/fd/*; do "
              "echo \"$f $(stat -L -c %d:%i $f 2>/dev/null) $(readlink $f)\"; done; "
              "echo x 2>/dev/null >> /proc/1/exe; echo write-rc=$?")
    status, out = run(sh(rootfs, script, cap_add=["SYS_PTRACE"]), state, config)
    assert status.code == 0, out
    host = _host_ids()
    for line in out.splitlines()[:-1]:
        parts = line.split()
        assert len(parts) < 2 or parts[1] not in host, (line, out)
    pid1 = next(line for line in out.splitlines() if line.startswith("/proc/1/exe "))
    assert "/memfd:layerfs-init" in pid1, out
    assert out.splitlines()[-1] == "write-rc=1", out
    # Without it (the default), PID 1 cannot be opened at all.
    status, out = run(sh(rootfs, "readlink /proc/1/exe || echo refused; for f in /proc/1/fd/*; "
                                 "do readlink $f && echo leaked; cat $f && echo leaked; done "
                                 "2>/dev/null; true"), state, config)
    assert out.split() == ["refused"], out


def test_the_helper_copy_is_sealed_against_writes() -> None:
    """Writing fails by design (EPERM from the seals), not because it happens to be
    executing (ETXTBSY): this process's copy is not being executed right now."""
    fd = lfs_helper.helper_fd()
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    wanted = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
    assert seals & wanted == wanted
    w = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)     # the way CVE-2019-5736 reopened it
    try:
        with pytest.raises(PermissionError) as err:
            os.write(w, b"\x7fELF pwned")
        assert err.value.errno == errno.EPERM
        with pytest.raises(PermissionError):
            os.ftruncate(w, 0)
    finally:
        os.close(w)
    with pytest.raises(PermissionError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)            # F_SEAL_SEAL: no changes at all
    assert os.stat(f"/proc/self/fd/{fd}").st_ino != HOST_PYTHON.st_ino
    assert lfs_helper.helper_fd() == fd                  # one copy per process
