"""``layerfs import|load|save|images|rmi|tag|history|image inspect`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.testing import images as timg

from ..daemons import cli_env
from .conftest import Archives

pytestmark = pytest.mark.usefixtures("cli_mode")    # in-process, and through a daemon


def layerfs(root: Path, *args: str, input: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                           "overlay2", *args], input=input, capture_output=True,
                          env=dict(os.environ, COLUMNS="5000", **cli_env(root)))
    if check and proc.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} exited {proc.returncode}: "
                             f"{proc.stderr.decode()}")
    return proc


def text(proc: subprocess.CompletedProcess[bytes]) -> str:
    return proc.stdout.decode()


def test_image_commands(tmp_path: Path, archives: Archives) -> None:
    root = tmp_path / "root"
    assert text(layerfs(root, "load", "-i", str(archives.sample.path))) == \
        "Loaded image: sample:latest\n"
    listed = json.loads(text(layerfs(root, "images", "--json")))
    assert [i["id"] for i in listed] == [archives.sample.id]
    assert listed[0]["config"]["config"]["Cmd"] == timg.SAMPLE_CMD
    layerfs(root, "tag", "sample", "lab/sample:v2")
    table = text(layerfs(root, "images"))
    assert "lab/sample" in table and "v2" in table and archives.sample.id[7:19] in table
    assert text(layerfs(root, "images", "-q", "lab/sample")) == archives.sample.id[7:19] + "\n"
    assert text(layerfs(root, "images", "-q", "nothing")) == ""
    history = json.loads(text(layerfs(root, "history", "--json", "lab/sample:v2")))
    assert [h["created_by"] for h in history] == ["delete and replace", "add /sample",
                                                  "busybox-static rootfs"]
    assert "delete and replace" in text(layerfs(root, "history", "sample"))
    inspected = json.loads(text(layerfs(root, "image", "inspect", "sample")))
    assert inspected[0]["Id"] == archives.sample.id
    assert inspected[0]["Config"]["WorkingDir"] == "/sample"

    # save to a file, and to stdout piped into load on another root
    out = tmp_path / "saved.oci.tar"
    layerfs(root, "save", "--format", "oci", "--compression", "zstd", "-o", str(out), "sample")
    other = tmp_path / "other"
    assert text(layerfs(other, "load", "-i", str(out), "-q")) == "Loaded image: sample:latest\n"
    assert text(layerfs(other, "images", "-q", "--no-trunc")) == archives.sample.id + "\n"
    piped = layerfs(root, "save", "lab/sample:v2").stdout
    third = tmp_path / "third"
    assert text(layerfs(third, "load", input=piped)) == "Loaded image: lab/sample:v2\n"

    # rmi: a name among several is only untagged; the last one deletes
    assert text(layerfs(root, "rmi", "lab/sample:v2")) == "Untagged: lab/sample:v2\n"
    assert text(layerfs(root, "rmi", "sample")) == (f"Untagged: sample:latest\n"
                                                    f"Deleted: {archives.sample.id}\n")
    assert json.loads(text(layerfs(root, "images", "--json"))) == []
    assert json.loads(text(layerfs(root, "layer", "ls", "--json"))) == []
    failed = layerfs(root, "rmi", "sample", check=False)
    assert failed.returncode == 1 and b"not found" in failed.stderr


def test_import_command(tmp_path: Path, archives: Archives) -> None:
    root = tmp_path / "root"
    image_id = text(layerfs(root, "import", "-q", str(archives.busybox_layer), "lab/bb:1",
                            "-c", 'CMD ["/bin/sh"]', "-c", "ENV A=1", "-m", "made in a test"))
    assert image_id.startswith("sha256:")
    info = json.loads(text(layerfs(root, "image", "inspect", "lab/bb:1")))[0]
    assert info["Id"] == image_id.strip()
    assert info["Config"]["Cmd"] == ["/bin/sh"]
    assert "A=1" in info["Config"]["Env"]
    assert json.loads(text(layerfs(root, "history", "--json", "lab/bb:1")))[0]["comment"] == \
        "made in a test"
    from_stdin = layerfs(root, "import", "-", "lab/stdin", input=archives.busybox_layer
                         .read_bytes())
    assert text(from_stdin).startswith("sha256:")
    bad = layerfs(root, "import", str(archives.busybox_layer), "Bad Name", check=False)
    assert bad.returncode == 1 and b"invalid image name" in bad.stderr


def test_save_refuses_a_terminal_and_bad_options(tmp_path: Path, archives: Archives) -> None:
    root = tmp_path / "root"
    layerfs(root, "load", "-q", "-i", str(archives.busybox.path))
    bad = layerfs(root, "save", "--format", "docker", "--compression", "gzip", "-o",
                  str(tmp_path / "x.tar"), "busybox", check=False)
    assert bad.returncode == 1 and b"compression" in bad.stderr
    missing = layerfs(root, "save", "-o", str(tmp_path / "x.tar"), "nope", check=False)
    assert missing.returncode == 1 and not (tmp_path / "x.tar").exists()


@pytest.mark.parametrize("command", ["import", "load", "save", "images", "rmi", "tag",
                                     "history"])
def test_help_has_examples(tmp_path: Path, command: str) -> None:
    out = text(layerfs(tmp_path / "root", command, "--help"))
    assert "examples:" in out and f"layerfs {command}" in out
