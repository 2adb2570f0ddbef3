"""No tracked file may name an absolute path of the machine it was written on.

A clone elsewhere (CI's scratch folder, a new developer's home) must pass its own
tests: a path such as the developer checkout's ``.venv`` that only exists on one
machine makes a test pass there and fail everywhere else.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Top-level folders every Debian machine has: a path below one of them is not, by
# itself, a sign of one machine (``/tmp/work/dir`` in a container is fine).
STANDARD_TOP = {"bin", "boot", "dev", "etc", "home", "lib", "lib64", "media", "mnt", "opt",
                "proc", "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var"}
# Where the project's development machines keep their checkouts (spelled in two parts, so
# that this file does not name it).
DEV_MACHINE_TOPS = {"wo" + "rk"}


def machine_paths() -> list[re.Pattern[str]]:
    """The checkout's absolute path, and paths under its top-level folder when that folder
    is not a standard one (or is a known development machine's), as whole path tokens."""
    top = REPO_ROOT.parts[1] if len(REPO_ROOT.parts) > 1 else ""
    tops = set(DEV_MACHINE_TOPS)
    if top and top not in STANDARD_TOP:
        tops.add(top)
    # A path token starts at the line's start or after whitespace, a quote, a bracket,
    # '=', ':' or ',' (not inside another path such as /tmp/work/dir).
    start = r"(?:^|(?<=[\s\"'`(\[{=:,]))"
    patterns = [re.compile(start + re.escape(str(REPO_ROOT)) + r"(?![\w.-])")]
    patterns += [re.compile(start + "/" + re.escape(t) + r"/") for t in sorted(tops)]
    return patterns


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    return [REPO_ROOT / n.decode() for n in names if n]


def test_no_tracked_file_names_a_path_of_this_machine() -> None:
    patterns = machine_paths()
    found = []
    for path in tracked_text_files():
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):   # deleted in the work tree, submodule
            continue
        if b"\0" in data:
            continue
        for lineno, line in enumerate(data.decode(errors="replace").splitlines(), 1):
            if any(p.search(line) for p in patterns):
                found.append(f"{path.relative_to(REPO_ROOT)}:{lineno}: {line.strip()[:120]}")
    assert not found, "tracked files name paths of this machine:\n" + "\n".join(found)


def test_the_check_sees_the_checkout_path_and_dev_machine_paths() -> None:
    patterns = machine_paths()

    def flagged(line: str) -> bool:
        return any(p.search(line) for p in patterns)

    assert flagged(f'python = "{REPO_ROOT}/.venv/bin/python"')
    assert flagged(f"cd {REPO_ROOT}")
    assert flagged("see /" + "wo" + "rk/main/.venv")
    assert not flagged("cwd=/tmp/work/dir")
    assert not flagged("/var/lib/layerfs")
