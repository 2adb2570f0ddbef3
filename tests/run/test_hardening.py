"""Hostile images and callers against ``layerfs run/exec`` (issue 20): the image's
/etc/passwd as a FIFO or a device, a container that swaps its /etc/passwd for a device
node before ``exec -u``, and what a container can learn about the caller's stdio."""

from __future__ import annotations

import os
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

from layerfs.cli.run import _Forwarder
from layerfs.testing import images as timg

from .conftest import Cli, busybox_layer, wait_for

RUN = ("run", "--rm", "--network", "none")


def _special(name: str, kind: bytes, major: int = 0, minor: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644
    info.devmajor, info.devminor = major, minor
    info.mtime = timg.FIXED_MTIME
    return info


def _load_hostile(cli: Cli, tmp_path: Path, name: str, passwd: tarfile.TarInfo) -> str:
    layer = timg.LayerTar().dir("etc").whiteout("etc/passwd").bytes()
    top = timg.LayerTar().dir("etc").raw(passwd).bytes()
    archive = timg.build_image(tmp_path / f"{name}.tar", [busybox_layer(cli), layer, top],
                               name=f"{name}:latest", cmd=["sh"])
    cli.load(archive.path)
    return f"{name}:latest"


def test_passwd_fifo_is_refused_at_once(cli: Cli, tmp_path: Path) -> None:
    image = _load_hostile(cli, tmp_path, "fifo", _special("etc/passwd", tarfile.FIFOTYPE))
    proc = cli(*RUN, "-u", "daemon", image, "id", check=False, timeout=30)   # hung before
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1 and "etc/passwd" in proc.stderr \
        and "is a FIFO" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_passwd_block_device_is_not_read(cli: Cli, tmp_path: Path) -> None:
    st = os.stat("/")
    passwd = _special("etc/passwd", tarfile.BLKTYPE, os.major(st.st_dev), os.minor(st.st_dev))
    image = _load_hostile(cli, tmp_path, "blockdev", passwd)
    proc = cli(*RUN, "-u", "root", image, "id", "-u", check=False, timeout=30)
    assert proc.returncode == 1 and "is a block device" in proc.stderr, proc
    assert proc.stdout == ""                      # the container did not run at all


def test_exec_user_against_a_swapped_passwd(cli: Cli) -> None:
    st = os.stat("/")
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    cli("run", "-d", "--network", "none", "--name", "swapper", "busybox", "sh", "-c",
        f"rm /etc/passwd && mknod /etc/passwd b {major} {minor} && touch /tmp/swapped "
        "&& sleep 60")
    with cli.manager() as mgr:
        layer_root = mgr.layers.mnt_dir / mgr.get("swapper").layer
    wait_for(lambda: (layer_root / "tmp" / "swapped").exists(), what="the swap")
    proc = cli("exec", "-u", "root", "swapper", "id", check=False, timeout=30)
    assert proc.returncode == 1 and "is a block device" in proc.stderr, proc
    assert proc.stdout == ""
    cli("rm", "-f", "swapper")


def test_a_signal_twice_aborts_a_start_that_hangs() -> None:
    with _Forwarder() as forward:
        os.kill(os.getpid(), signal.SIGTERM)       # first: kept for the container
        assert forward.pending == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)   # second: give up on the start


# --- stdio: the caller's files are not handed in ------------------------------------------------

def test_redirected_output_files_are_out_of_reach(cli: Cli, tmp_path: Path) -> None:
    out_file, err_file = tmp_path / "A", tmp_path / "B"
    out_file.write_text("PRIOR-A\n")
    err_file.write_text("PRIOR-B\n")
    script = ("readlink /proc/self/fd/1; readlink /proc/self/fd/2; "
              "timeout 1 cat /proc/self/fd/1 2>/dev/null | grep -c PRIOR; "
              "echo clobbered > /proc/self/fd/1; echo to-err >&2; exit 7")
    with open(out_file, "ab") as a, open(err_file, "ab") as b:    # >> A 2>> B
        proc = subprocess.run(cli.argv(*RUN, "busybox", "sh", "-c", script),
                              stdin=subprocess.DEVNULL, stdout=a, stderr=b,
                              env=cli.session.env, timeout=60)
    assert proc.returncode == 7                       # exit codes pass through
    a_text, b_text = out_file.read_text(), err_file.read_text()
    a_lines = [line for line in a_text.splitlines() if line != "Terminated"]
    assert a_lines[0] == "PRIOR-A" and b_text.startswith("PRIOR-B\n"), (a_text, b_text)
    assert a_lines[1].startswith("pipe:[") and a_lines[2].startswith("pipe:["), a_text
    assert str(tmp_path) not in a_text + b_text
    assert a_lines[3] == "0" and a_lines[-1] == "clobbered", a_text
    assert b_text.splitlines()[-1] == "to-err", b_text


def test_interactive_stdin_is_relayed(cli: Cli) -> None:
    proc = cli("run", "--rm", "-i", "--network", "none", "busybox", "sh", "-c",
               "readlink /proc/self/fd/0 | cut -c1-5; tr a-z A-Z", input="hello\n")
    assert proc.stdout == "pipe:\nHELLO\n"
