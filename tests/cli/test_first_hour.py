"""A new user's first hour (issue 15), as a table: input -> message -> exit code -> nothing
left behind.

Each row runs the real ``layerfs`` in a child process and checks that stderr is exactly
one line, ``layerfs: error: ...`` matching the row's message, that the exit code is the
row's, and that nothing was left: no root, database or directory that was not there
before, no layer, no mount, no half-written file. Rows that need a state first (a root
with a layer, a read-only or full filesystem) build it in ``setup``.

Then the rest of the issue, one test each: interrupted commands (SIGTERM, kill -9, Ctrl-C
during the imports), piped output, ids, ``load``, ``images``, ``history``, diff sizes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.layers import LayerStore
from layerfs.testing import images as timg

NOBODY = 65534


# --- running layerfs -------------------------------------------------------------------------

def layerfs(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            user: int | None = None, input: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "layerfs", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERFS_")}
    full_env.update(env or {}, COLUMNS="80")   # a narrow "terminal": pipes must ignore it
    return subprocess.run(argv, capture_output=True, text=input is None, env=full_env,
                          cwd=cwd, timeout=timeout,
                          input=input.decode() if input is not None else None)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{proc.stderr}"
    assert lines[0].startswith("layerfs: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


# --- the table ---------------------------------------------------------------------------------

@dataclass
class Ctx:
    """What a row works with: a scratch folder, the root path, files made by ``setup``."""

    tmp: Path
    root: Path
    layer: str = ""
    mounts: list[Path] = field(default_factory=list)
    snapshot: dict[str, object] = field(default_factory=dict)


def snapshot(root: Path) -> dict[str, object]:
    """What must not change: the entries of the root and of its driver's home, the layers."""
    # sqlite's own -wal/-shm files come and go with connections: not state of the root
    entries = sorted(str(p.relative_to(root)) for p in root.glob("*")
                     if not p.name.endswith(("-wal", "-shm")))
    homes = sorted(str(p.relative_to(root)) for d in root.glob("*") if d.is_dir() and
                   d.name not in ("mnt", "tmp") for p in d.glob("*"))
    with LayerStore.open(root) as store:
        layers = sorted(r.id for r in store.layers())
    return {"entries": entries, "homes": homes, "layers": layers}


def with_layer(ctx: Ctx) -> None:
    with LayerStore.open(ctx.root, "overlay2") as store:
        ctx.layer = store.create().id
    ctx.snapshot = snapshot(ctx.root)


def tmpfs(ctx: Ctx, name: str, options: str) -> Path:
    path = ctx.tmp / name
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    ctx.mounts.append(path)
    return path


def read_only_fs(ctx: Ctx) -> None:
    ro = tmpfs(ctx, "ro", "ro,size=1m")
    ctx.root = ro / "root"


def root_then_read_only(ctx: Ctx) -> None:
    fs = tmpfs(ctx, "fs", "size=16m")
    ctx.root = fs / "root"
    with_layer(ctx)
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)


def root_then_full(ctx: Ctx) -> None:
    fs = tmpfs(ctx, "fs", "size=4m")
    ctx.root = fs / "root"
    with_layer(ctx)
    with open(fs / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def under_a_file(ctx: Ctx) -> None:
    (ctx.tmp / "file").write_text("x")
    ctx.root = ctx.tmp / "file" / "root"


def missing_parent(ctx: Ctx) -> None:
    ctx.root = ctx.tmp / "nope" / "deeper" / "root"


def text_file(ctx: Ctx) -> None:
    (ctx.tmp / "six.txt").write_text("hello\n")   # 6 bytes
    (ctx.tmp / "adir").mkdir()


def no_root_made(ctx: Ctx) -> list[str]:
    left = []
    if ctx.root.exists():
        left.append(f"{ctx.root} exists: {sorted(os.listdir(ctx.root))}")
    for p in (ctx.tmp / "nope", ctx.tmp / "cwd" / "layerfs.db"):
        if p.exists():
            left.append(str(p))
    return left


def root_unchanged(ctx: Ctx) -> list[str]:
    for m in ctx.mounts:   # a read-only or full filesystem: writable and roomy again
        subprocess.run(["mount", "-o", "remount,rw", str(m)], check=True)
        with contextlib.suppress(FileNotFoundError):
            (m / "filler").unlink()
    now = snapshot(ctx.root)
    return [] if now == ctx.snapshot else [f"before {ctx.snapshot}, after {now}"]


@dataclass(frozen=True)
class Row:
    id: str
    argv: Callable[[Ctx], list[str]]
    message: str          # a regex the one stderr line must match
    code: int
    setup: Callable[[Ctx], None] = text_file
    left: Callable[[Ctx], list[str]] = no_root_made
    env: dict[str, str] = field(default_factory=dict)
    user: int | None = None


def root_args(ctx: Ctx, *args: str) -> list[str]:
    return ["--root", str(ctx.root), *args]


ROWS = [
    Row("layer apply of a missing file",
        lambda c: root_args(c, "layer", "apply", "/nonexistent.tar"),
        r"/nonexistent\.tar: no such file or directory$", 1),
    Row("layer apply of a directory",
        lambda c: root_args(c, "layer", "apply", str(c.tmp / "adir")),
        r"adir: is a directory, not a layer tar", 1),
    Row("layer apply of a 6-byte text file",
        lambda c: root_args(c, "layer", "apply", str(c.tmp / "six.txt")),
        r"six\.txt: layer stream is not a tar archive", 1),
    Row("import of a 6-byte text file",
        lambda c: root_args(c, "import", str(c.tmp / "six.txt"), "x:1"),
        r"six\.txt: layer stream is not a tar archive", 1),
    Row("layer diff -o into a missing directory",
        lambda c: root_args(c, "layer", "diff", c.layer, "-o", "/nonexistent/x.tar"),
        r"/nonexistent/x\.tar: no such file or directory$", 1, with_layer, root_unchanged),
    Row("--root on a read-only filesystem",
        lambda c: root_args(c, "layer", "create"),
        r"cannot make root .*/ro/root: .*/ro is on a read-only file system$", 1,
        read_only_fs),
    Row("a root whose filesystem turned read-only",
        lambda c: root_args(c, "layer", "create"),
        r"(cannot be written: .* is on a read-only file system|: read-only file system$)", 1,
        root_then_read_only, root_unchanged),
    Row("a root whose filesystem is full",
        lambda c: root_args(c, "layer", "create", "--label", "big=" + "x" * 100_000),
        r"(database or disk is full|no space left)", 1, root_then_full,
        root_unchanged),
    Row("--root under a regular file", lambda c: root_args(c, "layer", "ls"),
        r"cannot make root .*/file/root: .*/file is not a directory$", 1, under_a_file),
    Row("--root with a missing parent", lambda c: root_args(c, "layer", "ls"),
        r"cannot make root .*/nope/deeper/root: .*/nope/deeper does not exist", 1,
        missing_parent),
    Row("a non-root user on a new root", lambda c: root_args(c, "layer", "create"),
        r"layerfs needs root", 1, user=NOBODY),
    Row("a non-root user on a root-owned root", lambda c: root_args(c, "layer", "create"),
        r"layerfs needs root", 1, with_layer, root_unchanged, user=NOBODY),
    Row("--driver nosuch on a new root",
        lambda c: root_args(c, "--driver", "nosuch", "layer", "ls"),
        r"no storage driver named 'nosuch' \(registered: .*overlay2", 1),
    Row("--driver btrfs on ext4", lambda c: root_args(c, "--driver", "btrfs", "layer", "ls"),
        r"btrfs: .* is on extfs, not btrfs", 1),
    Row("--driver nosuch info", lambda c: root_args(c, "--driver", "nosuch", "info"),
        r"no storage driver named 'nosuch'", 1),
    Row("--driver nosuch on an overlay2 root",
        lambda c: root_args(c, "--driver", "nosuch", "layer", "ls"),
        r"no storage driver named 'nosuch'", 1, with_layer, root_unchanged),
    Row("--driver vfs on an overlay2 root with layers",
        lambda c: root_args(c, "--driver", "vfs", "layer", "ls"),
        r"holds layers of driver 'overlay2', not 'vfs'", 1, with_layer, root_unchanged),
    Row("--root ''", lambda c: ["--root", "", "layer", "ls"], r"--root is empty", 2),
    Row("LAYERFS_ROOT=''", lambda c: ["layer", "ls"], r"--root is empty", 2,
        env={"LAYERFS_ROOT": ""}),
    Row("an ambiguous layer id prefix", lambda c: root_args(c, "layer", "rm", "a"),
        r"layer id prefix 'a' is ambiguous \(2 layers\)", 1,
        lambda c: two_layers(c, "a1", "a2"), root_unchanged),
    Row("an unknown layer id", lambda c: root_args(c, "layer", "mount", "nosuch"),
        r"layer nosuch not found in ", 1, with_layer, root_unchanged),
    Row("system prune without -f, not on a terminal",
        lambda c: root_args(c, "system", "prune"),
        r"`layerfs system prune` removes .*; add -f to go ahead \(stdin is not a terminal", 1,
        with_layer, root_unchanged),
    Row("system reset of a directory that is not a root",
        lambda c: ["--root", str(c.tmp), "system", "reset", "-f"],
        r"is not a layerfs root \(no layerfs\.db\): nothing to reset", 1),
]


def two_layers(ctx: Ctx, *ids: str) -> None:
    with LayerStore.open(ctx.root, "overlay2") as store:
        for layer_id in ids:
            store.create(layer_id=layer_id)
    ctx.snapshot = snapshot(ctx.root)


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Ctx]:
    tmp_path.chmod(0o755)   # the non-root rows run as nobody
    (tmp_path / "cwd").mkdir()
    c = Ctx(tmp_path, tmp_path / "root")
    try:
        yield c
    finally:
        for m in reversed(c.mounts):
            if mountlib.is_mounted(m):
                for info in mountlib.mounts_under(m):
                    mountlib.unmount(info.target, lazy=True)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_first_hour_table(row: Row, ctx: Ctx) -> None:
    row.setup(ctx)
    proc = layerfs(*row.argv(ctx), env=row.env, cwd=ctx.tmp / "cwd", user=row.user)
    line = one_error_line(proc)
    assert re.search(row.message, line), f"{line!r} does not match {row.message!r}"
    assert proc.returncode == row.code, (proc.returncode, line)
    assert proc.stdout == ""
    left = row.left(ctx)
    assert not left, f"left behind: {left}"


# --- choosing a driver: info makes nothing; an empty root may switch ---------------------------

def test_info_creates_and_pins_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = layerfs("--root", str(root), "info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["driver"] == "overlay2" and info["created"] is False
    assert not root.exists()
    # ... so a later --driver vfs is the root's first driver, not a refused second one
    assert layerfs("--root", str(root), "--driver", "vfs", "layer", "create").returncode == 0
    assert json.loads(layerfs("--root", str(root), "info", "--json").stdout)["driver"] == "vfs"


def test_a_root_without_layers_may_switch_driver(tmp_path: Path) -> None:
    root = tmp_path / "root"
    layer_id = layerfs("--root", str(root), "--driver", "overlay2", "layer", "create").stdout
    assert layerfs("--root", str(root), "layer", "rm", layer_id.strip()).returncode == 0
    assert (root / "overlay2").is_dir()
    proc = layerfs("--root", str(root), "--driver", "vfs", "layer", "create")
    assert proc.returncode == 0, proc.stderr
    assert not (root / "overlay2").exists(), "the old driver's state stays"
    assert json.loads(layerfs("--root", str(root), "info", "--json").stdout)["driver"] == "vfs"
    # info with another --driver neither switches nor pins (the root has a layer now)
    proc = layerfs("--root", str(root), "--driver", "overlay2", "info")
    assert proc.returncode == 1 and "holds layers of driver 'vfs'" in proc.stdout


def test_auto_selection_never_picks_a_driver_that_needs_root_for_a_non_root_user(
        tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    code = ("import sys\nfrom pathlib import Path\nfrom layerfs import plugins\n"
            "for p in plugins.probe_all(Path(sys.argv[1])):\n"
            "    print(p.name, p.supported, p.reason)\n")
    proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", sys.executable, "-c", code,
                           str(tmp_path / "root")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    supported = [line.split()[0] for line in proc.stdout.splitlines() if " True " in line]
    assert supported == [], proc.stdout   # every driver mounts, and mounting needs root


# --- interrupted commands ----------------------------------------------------------------------

def big_tar(path: Path, files: int = 60, size: int = 1 << 20) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(files):
            info = tarfile.TarInfo(f"d{i % 4}/f{i}")
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(64) * (size // 64)))


def apply_held_half_way(root: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """``layer apply -`` fed half a tar through a pipe, then held there: the layer is half
    made when this returns."""
    tar = tmp / "big.tar"
    big_tar(tar)
    data = tar.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERFS_")}
    proc = subprocess.Popen([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                             "overlay2", "layer", "apply", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    proc.stdin.write(data[:len(data) // 2])
    proc.stdin.flush()
    home = root / "overlay2"
    deadline = time.monotonic() + 60
    while not any(home.glob("*/diff/d*/f*")):
        assert time.monotonic() < deadline, "the apply never started"
        time.sleep(0.02)
    return proc, home


def layer_dirs(home: Path) -> list[str]:
    return sorted(p.name for p in home.iterdir() if p.name != "l") if home.is_dir() else []


def test_sigterm_during_layer_apply_says_terminated_and_rolls_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    LayerStore.open(root, "overlay2").close()
    proc, home = apply_held_half_way(root, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.decode() == "layerfs: error: terminated\n"
    assert layer_dirs(home) == []   # rolled back by the process itself
    with LayerStore.open(root, recover=False) as store:
        assert store.store.list_layers(state=None) == []


@pytest.mark.parametrize("reap", [False, True], ids=["killed-not-reaped", "killed-and-reaped"])
def test_kill_9_during_apply_the_very_next_command_recovers(tmp_path: Path, reap: bool) -> None:
    root = tmp_path / "root"
    LayerStore.open(root, "overlay2").close()
    for _ in range(3):   # every time, not most times
        proc, home = apply_held_half_way(root, tmp_path)
        assert layer_dirs(home)
        proc.kill()      # kill -9; the parent has not reaped it yet unless `reap`
        if reap:
            proc.wait()
        listed = layerfs("--root", str(root), "layer", "ls", "-q")
        assert listed.returncode == 0 and listed.stdout == "", listed
        assert layer_dirs(home) == [], "the half-made layer is still on disk"
        proc.wait()
        proc.stdin.close()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("module", ["argparse", "layerfs.cli.boundary", "layerfs.metastore",
                                    "layerfs.cli.layers", "sqlite3"])
def test_ctrl_c_during_the_imports_is_one_line(tmp_path: Path, module: str) -> None:
    """A KeyboardInterrupt while the CLI's modules import (the first ~0.2 s, longer on a busy
    machine): one word, whichever import it hits. (Before layerfs's own code runs, the
    interpreter's start-up is Python's: an interrupt there is not ours to catch.)"""
    code = ("import sys\n"
            "class Interrupt:\n"   # a finder that is asked first: Ctrl-C at that import
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == sys.argv[2]:\n"
            "            sys.meta_path.remove(self)\n"
            "            raise KeyboardInterrupt\n"
            "from layerfs._entry import main\n"
            "assert sys.argv[2] not in sys.modules\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "sys.exit(main(['--root', sys.argv[1], 'layer', 'ls']))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "root"), module],
                          capture_output=True, text=True)
    assert proc.stderr == "layerfs: error: interrupted\n", proc.stderr
    assert proc.returncode == 130
    assert not (tmp_path / "root").exists()


# --- output --------------------------------------------------------------------------------------

def test_piped_tables_are_plain_full_width_rows(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = layerfs("--root", str(root), "drivers")
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["DRIVER", "NATIVE", "DIFF", "BLOCK", "COW", "QUOTAS", "MAX",
                                "DEPTH", "WHITEOUTS", "HERE"]
    assert len(lines) == 1 + len(json.loads(layerfs("drivers", "--json").stdout))
    assert not any(c in proc.stdout for c in "│┃━─…"), proc.stdout
    assert max(len(line) for line in lines) > 80     # COLUMNS=80 does not cut them
    assert all(line == line.rstrip() for line in lines)


def test_ids_listing_quiet_no_trunc_and_prefixes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    base = layerfs("--root", str(root), "--driver", "overlay2", "layer", "create",
                   "--readonly").stdout.strip()
    short = layerfs("--root", str(root), "layer", "ls", "-q").stdout.split()
    assert short == [base[:12]]
    assert layerfs("--root", str(root), "layer", "ls", "-q", "--no-trunc").stdout.split() == \
        [base]
    rows = layerfs("--root", str(root), "layer", "ls", "--no-trunc").stdout.splitlines()
    assert rows[0].split()[:2] == ["LAYER", "ID"] and rows[1].split()[0] == base
    # the 12 characters ls prints name the layer in every layer command
    box = layerfs("--root", str(root), "layer", "create", "--parent", short[0]).stdout.strip()
    mnt = layerfs("--root", str(root), "layer", "mount", box[:12]).stdout.strip()
    assert Path(mnt).is_dir() and mountlib.is_mounted(mnt)
    assert layerfs("--root", str(root), "layer", "umount", box[:8]).returncode == 0
    assert json.loads(layerfs("--root", str(root), "layer", "inspect", box[:5]).stdout)["id"] \
        == box
    assert layerfs("--root", str(root), "layer", "changes", box[:12]).returncode == 0
    assert layerfs("--root", str(root), "layer", "rm", box[:12], base[:12]).returncode == 0
    assert layerfs("--root", str(root), "layer", "ls", "-q").stdout == ""


def test_diff_returns_what_its_docstring_says_the_same_number_apply_returns(
        tmp_path: Path) -> None:
    with LayerStore.open(tmp_path / "root", "overlay2") as store:
        base = store.create()
        with store.mounted(base.id) as path:
            (path / "a").write_bytes(b"x" * 1000)
            (path / "b").write_bytes(b"y" * 24)
        out = io.BytesIO()
        size = store.diff(base.id, out)
        assert size == 1024                       # bytes of file data ...
        assert len(out.getvalue()) > size         # ... not the tar's length
        out.seek(0)
        copy = store.apply(out)
        assert copy.size == size
        for layer in (copy.id, base.id):
            store.remove(layer)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    archive = tmp_path / "busybox.tar"
    timg.busybox_image_tar(archive, tmp_path / "scratch", name="busybox:latest")
    assert layerfs("--root", str(root), "--driver", "overlay2", "load", "-i",
                   str(archive)).returncode == 0
    return root


def test_load_prints_only_the_names_it_loaded_and_images_counts_right(
        image_root: Path, tmp_path: Path) -> None:
    root = image_root
    layerfs("--root", str(root), "tag", "busybox", "lab/one:1")
    layerfs("--root", str(root), "tag", "busybox", "lab/two:2")
    proc = layerfs("--root", str(root), "load", "-i", str(tmp_path / "busybox.tar"))
    assert proc.stdout == "Loaded image: busybox:latest\n"
    listed = layerfs("--root", str(root), "images").stdout.splitlines()
    assert len(listed) == 1 + 3 and listed[0].split()[:2] == ["REPOSITORY", "TAG"]
    assert layerfs("--root", str(root), "images", "-q").stdout.count("\n") == 1
    history = layerfs("--root", str(root), "history", "busybox").stdout.splitlines()
    assert history[0].split() == ["IMAGE", "CREATED", "CREATED", "BY", "SIZE"], history[0]
    assert all(line == line.rstrip() for line in history)
    for name in ("lab/one:1", "lab/two:2", "busybox"):
        layerfs("--root", str(root), "rmi", name)
