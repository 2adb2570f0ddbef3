"""A driver from another package passes the shipped conformance suite.

tests/plugin/ is such a package (``layerfs_stack_driver``, with its own
``layerfs.drivers`` entry point in its pyproject.toml). It is installed the way pip
leaves a package, as a directory plus a ``.dist-info`` with its entry points, on a
fresh path; then ``pytest --pyargs layerfs.testing.conformance`` runs against it in
another process, found through the entry point alone. In this process the same class
goes through :func:`layerfs.register` and ``open_root(root, driver=cls)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import layerfs
from layerfs import plugins
from layerfs.errors import AlreadyExists, InvalidArgument
from layerfs.testing.conformance import close_and_check, make_base, manifest_of

PLUGIN = Path(__file__).resolve().parent / "plugin"


def install(site: Path) -> None:
    """Install tests/plugin into ``site`` as pip would: the package and its metadata."""
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    shutil.copytree(PLUGIN / "layerfs_stack_driver", site / "layerfs_stack_driver")
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n")
    lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
             for group, eps in project["entry-points"].items()]
    (dist / "entry_points.txt").write_text("\n".join(lines))


@pytest.mark.slow
def test_an_installed_third_party_driver_passes_the_shipped_suite(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install(site)
    env = {**os.environ, "PYTHONPATH": str(site), "LAYERFS_CONFORMANCE_DRIVERS": "stack",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("LAYERFS_CONFORMANCE_OPTIONS", None)
    # From a directory of its own: neither this repository's conftest nor its settings.
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs",
                           "layerfs.testing.conformance", "-p", "no:cacheprovider", "-v",
                           "-rs", f"--basetemp={tmp_path / 'pytest'}"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, tail
    ran = [line.split()[0] for line in proc.stdout.splitlines() if " PASSED" in line]
    assert all(name.endswith("[stack]") for name in ran), tail
    assert any("test_deep_layer_read_128" in name for name in ran), tail
    assert any("test_diff_apply_reproduces_child" in name for name in ran), tail


@pytest.fixture
def stack_driver() -> Iterator[type[layerfs.Driver]]:
    sys.path.insert(0, str(PLUGIN))
    try:
        from layerfs_stack_driver import StackDriver

        yield StackDriver
    finally:
        sys.path.remove(str(PLUGIN))
        plugins._registered.pop("stack-here", None)


def test_register_and_open_root_with_a_class(stack_driver: type[layerfs.Driver],
                                             tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        layerfs.register("not-a-driver", dict)  # type: ignore[arg-type]
    with pytest.raises(AlreadyExists):
        layerfs.register("vfs", stack_driver)
    layerfs.register("stack-here", stack_driver)
    assert plugins.registered()["stack-here"] == "layerfs_stack_driver:StackDriver"
    assert plugins.load("stack-here") is stack_driver
    assert plugins.probe("stack-here", tmp_path).supported

    store = layerfs.open_root(tmp_path / "root", driver=stack_driver)
    try:
        assert isinstance(store.driver, stack_driver)
        base = make_base(store)
        child = store.create(base)
        with store.mounted(child.id) as path:
            (path / "etc" / "hostname").write_text("child\n")
        assert manifest_of(store, child.id)["etc/hostname"].size == len("child\n")
        assert store.store.get_setting("driver") == "stack"
    finally:
        close_and_check(store)
