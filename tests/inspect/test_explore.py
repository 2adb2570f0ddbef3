"""``layerfs image explore``: its JSON and CI modes, its refusal of a non-terminal, and
the terminal UI driven headless with textual's pilot (select a layer, toggle the
compare mode and the filters, filter, the help screen), asserting what the screen shows.

The screenshot in docs/images/ is made here too. It is compared with what the UI draws
now and only rewritten when ``LAYERFS_UPDATE_SCREENSHOTS=1`` is set (then the PNG is
rendered again with rsvg-convert): a change to the UI shows up as a failing test and a
reviewed update, never as a file that churns on every run.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.cli.common import human_size
from layerfs.images import ImageStore
from layerfs.inspect.explore import Analysis
from layerfs.inspect.index import Indexer
from layerfs.inspect.targets import image_target, load_stack
from layerfs.inspect.tui import ExploreApp, FileTree

from ..images.conftest import image_store
from .conftest import REPO, assert_one_line_error, cli

DOCS = REPO / "docs" / "images"
SHOT = DOCS / "explore.svg"
UPDATE = os.environ.get("LAYERFS_UPDATE_SCREENSHOTS") == "1"
SIZE = (132, 38)


@pytest.fixture
def sample_images(tmp_path: Path, sample_archive: Path) -> Iterator[ImageStore]:
    with image_store("overlay2", tmp_path / "root") as images:
        images.load(sample_archive)
        yield images


@pytest.fixture
def analysis(sample_images: ImageStore) -> Analysis:
    target = image_target(sample_images, "sample")
    indexer = Indexer(sample_images.layers, sample_images)
    return Analysis.of(target, load_stack(indexer, target))


def test_json_and_ci_modes(sample_images: ImageStore) -> None:
    root = sample_images.layers.root
    data = json.loads(cli(root, "image", "explore", "sample", "--json", check=True).stdout)
    assert [layer["command"] for layer in data["layers"]] == [
        "busybox-static rootfs", "add /sample", "delete and replace"]
    assert data["wasted_bytes"] == 39 and data["user_size_bytes"] == 56
    assert data["inefficient_files"][0] == {"path": "/sample/changed.txt", "count": 2,
                                            "wasted_bytes": 20, "layers": [2, 3]}
    # dive's default rules: 39 wasted bytes are 70 % of the 56 the upper layers add
    proc = cli(root, "image", "explore", "sample", "--ci")
    assert proc.returncode == 1, proc.stderr
    assert "FAIL: highest-user-wasted-percent" in proc.stdout
    assert "Result: FAIL [Total: 3] [Passed: 1] [Failed: 1] [Skipped: 1]" in proc.stdout
    assert re.search(r"^\s+2\s+20 B  /sample/changed.txt$", proc.stdout, re.M), proc.stdout
    proc = cli(root, "image", "explore", "sample", "--ci", "--highest-user-wasted-percent",
               "0.8", "--highest-wasted-bytes", "1k")
    assert proc.returncode == 0, proc.stdout
    assert "Result: PASS [Total: 3] [Passed: 3]" in proc.stdout
    proc = cli(root, "image", "explore", "sample", "--ci", "--highest-wasted-bytes", "38",
               "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["ci"]["passed"] is False
    assert_one_line_error(cli(root, "image", "explore", "sample", "--ci",
                              "--lowest-efficiency", "1.5"), "between 0 and 1")
    assert_one_line_error(cli(root, "image", "explore", "sample", "--ci",
                              "--highest-wasted-bytes", "lots"), "--highest-wasted-bytes")


def test_explore_refuses_a_non_terminal(sample_images: ImageStore) -> None:
    proc = cli(sample_images.layers.root, "image", "explore", "sample")
    assert_one_line_error(proc, "not a terminal", "use --json")


def screen(app: ExploreApp) -> list[str]:
    """The lines the terminal shows, read from the screenshot textual exports."""
    svg = app.export_screenshot()
    rows: dict[float, list[tuple[float, str]]] = {}
    for m in re.finditer(r'<text[^>]*x="([\d.]+)" y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        x, y, text = float(m[1]), float(m[2]), html.unescape(m[3]).replace("\xa0", " ")
        rows.setdefault(y, []).append((x, text))
    return ["".join(t for _, t in sorted(parts)) for _, parts in sorted(rows.items())]


def tree_rows(app: ExploreApp) -> list[tuple[str, str]]:
    """(name, colour) of every node the file tree shows, depth first."""
    out: list[tuple[str, str]] = []

    def walk(node: object) -> None:
        for child in node.children:  # type: ignore[attr-defined]
            label = child.label
            style = str(label.spans[-1].style) if label.spans else ""
            out.append((label.plain.split("  ")[-1].strip(), style))
            if child.is_expanded:
                walk(child)
    walk(app.query_one("#files", FileTree).root)
    return out


def test_the_ui_navigates_toggles_and_filters(analysis: Analysis) -> None:
    async def run() -> None:
        app = ExploreApp(analysis, human_size)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            text = "\n".join(screen(app))
            assert "Files as of layer 3 (changes of layer 3)" in text
            assert "delete and replace" in text and "efficiency" in text
            assert "/sample/changed.txt" in text          # the wasted-space list
            # the files pane: only what layer 3 changed, "sample" opened
            await pilot.press("tab", "ctrl+u")
            await pilot.pause()
            assert tree_rows(app) == [("sample", "yellow")]
            await pilot.press("space")
            await pilot.pause()
            rows = dict(tree_rows(app))
            assert rows["changed.txt"] == "yellow" and rows["gone.txt"] == "red"
            assert rows["tree"] == "yellow" and "keep.txt" not in rows
            # select layer 2: what it added, in green
            await pilot.press("tab", "up")
            await pilot.pause()
            assert app.shown_layer == 1
            rows = dict(tree_rows(app))
            assert rows["keep.txt"] == "green" and rows["gone.txt"] == "green"
            assert "Files as of layer 2" in "\n".join(screen(app))
            # aggregated at layer 3: layers 2 and 3 against the base
            await pilot.press("down", "ctrl+a")
            await pilot.pause()
            rows = dict(tree_rows(app))
            assert rows["keep.txt"] == "green" and "gone.txt" not in rows
            assert "aggregated changes of layers 2 to 3" in "\n".join(screen(app))
            await pilot.press("ctrl+l", "tab", "ctrl+r")       # hide removed files
            await pilot.pause()
            assert "gone.txt" not in dict(tree_rows(app))
            # filter by path
            await pilot.press("ctrl+f", *"fresh", "enter")
            await pilot.pause()
            names = [n for n, _ in tree_rows(app)]
            assert names == ["sample", "tree", "fresh.txt"], names
            await pilot.press("escape")
            await pilot.pause()
            await pilot.press("question_mark")
            await pilot.pause()
            text = "\n".join(screen(app))
            assert "show/hide unmodified files" in text and "Ctrl+Space" in text
            await pilot.press("escape", "q")
    asyncio.run(run())


def _svg_of_docs_state(analysis: Analysis) -> str:
    """The state the docs show: layer 3 selected, /sample and /sample/tree opened."""
    async def run() -> str:
        app = ExploreApp(analysis, human_size)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("tab")
            tree = app.query_one("#files", FileTree)
            for _ in range(20):
                node = tree.cursor_node
                if node is not None and node.data == "sample":
                    break
                await pilot.press("down")
            await pilot.press("space", "down", "down", "down", "down", "down", "space")
            await pilot.pause()
            return app.export_screenshot(title="layerfs image explore sample")
    return asyncio.run(run())


def _normalized(svg: str) -> str:
    return re.sub(r"terminal-\d+", "terminal", svg)


def _png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_the_docs_screenshot_is_what_the_ui_draws(analysis: Analysis) -> None:
    svg = _svg_of_docs_state(analysis)
    png = SHOT.with_suffix(".png")
    if UPDATE:
        DOCS.mkdir(parents=True, exist_ok=True)
        SHOT.write_text(svg)
        renderer = shutil.which("rsvg-convert")
        assert renderer, "rsvg-convert missing (librsvg2-bin; scripts/setup installs it)"
        subprocess.run([renderer, "-o", str(png), str(SHOT)], check=True)
    assert SHOT.exists(), f"{SHOT} missing: run with LAYERFS_UPDATE_SCREENSHOTS=1"
    assert _normalized(SHOT.read_text()) == _normalized(svg), (
        f"the explorer draws something else than {SHOT.relative_to(REPO)} shows; look at "
        f"the change, then run LAYERFS_UPDATE_SCREENSHOTS=1 pytest tests/inspect/"
        f"test_explore.py -k screenshot to update the SVG and its PNG")
    view = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg)
    assert view is not None
    assert _png_size(png) == (math.ceil(float(view[1])), math.ceil(float(view[2]))), \
        f"{png} is not the rendering of {SHOT.name}: run with LAYERFS_UPDATE_SCREENSHOTS=1"
