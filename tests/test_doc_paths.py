"""The docs name only files that are in the repository.

``docs/architecture.md`` once sent readers to a file of the development machine that no
clone has. Every ``path/to/file.ext`` in backquotes and every relative Markdown link in a
tracked ``.md`` file must be a tracked file (or folder): from the repository's root, from
the page's folder, or a unique tail of a tracked path (``aufs/unionfs.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# A file-like path in backquotes: at least one folder and a file name with an extension.
QUOTED_FILE = re.compile(r"`([\w.-]+(?:/[\w.-]+)+\.(?:md|py|toml|json|c|sh|cfg|txt|yml|yaml))`")
LINK = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")


def tracked() -> list[str]:
    return subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files"], capture_output=True,
                          text=True, check=True).stdout.split()


def missing_paths(page: str, text: str, files: set[str], folders: set[str]) -> list[str]:
    here = os.path.dirname(page)
    missing = []
    for pattern in (QUOTED_FILE, LINK):
        for match in pattern.finditer(text):
            path = match.group(1)
            candidates = {os.path.normpath(os.path.join(here, path))}
            if pattern is QUOTED_FILE:
                candidates.add(os.path.normpath(path))
            if candidates & (files | folders):
                continue
            if pattern is QUOTED_FILE and any(f.endswith("/" + path) for f in files):
                continue
            missing.append(path)
    return missing


def test_docs_name_only_files_in_the_repository() -> None:
    files = set(tracked())
    folders = {str(p) for f in files for p in Path(f).parents if str(p) != "."}
    problems = []
    for page in sorted(f for f in files if f.endswith(".md")):
        text = (REPO_ROOT / page).read_text(encoding="utf-8")
        problems += [f"{page}: {path}" for path in missing_paths(page, text, files, folders)]
    assert not problems, "docs name files that are not in the repository:\n" + \
        "\n".join(problems)


def test_a_missing_file_is_found() -> None:
    files = {"docs/architecture.md", "drivers/layerfs_drivers/aufs/unionfs.py"}
    folders = {"docs", "drivers", "drivers/layerfs_drivers", "drivers/layerfs_drivers/aufs"}
    text = ("see `shared/docs/ARCHITECTURE.md`, `aufs/unionfs.py`, [the map](architecture.md)"
            " and [gone](gone.md)")
    assert missing_paths("docs/x.md", text, files, folders) == \
        ["shared/docs/ARCHITECTURE.md", "gone.md"]
