"""Two ``layerfs pull`` processes on one root, pulling two images that share a base layer:
the base is downloaded once (the second pull finds it being downloaded, then applied, by
the first) and stored once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerfs.distribution import RegistryOptions, push
from layerfs.testing import images as timg
from tests.support.registry import Distribution, Fault, FaultProxy

from ..daemons import cli_env
from ..images.conftest import close_images, snapshot
from .conftest import Samples, manifest_of, open_overlay2

INSECURE = RegistryOptions(insecure=True)


@pytest.mark.usefixtures("cli_mode")
def test_concurrent_pulls_download_a_shared_base_once(tmp_path: Path,
                                                      plain_registry: Distribution,
                                                      proxy: FaultProxy,
                                                      samples: Samples) -> None:
    base = timg.LayerTar().dir("base").file("base/blob", os.urandom(6 << 20)).bytes()
    a = timg.build_image(tmp_path / "a.tar", [base, samples.layers[1]], name="a:1",
                         cmd=["sh"])
    b = timg.build_image(tmp_path / "b.tar", [base, timg.LayerTar().file("b.txt", "b\n")
                                              .bytes()], name="b:1", cmd=["sh"])
    src = open_overlay2(tmp_path / "src")
    try:
        src.load(a.path)
        src.load(b.path)
        push(src, "a:1", f"{plain_registry.host}/conc/a:1", options=INSECURE)
        push(src, "b:1", f"{plain_registry.host}/conc/b:1", options=INSECURE)
    finally:
        close_images(src)
    doc_a = manifest_of(plain_registry.url, "conc/a", "1")
    doc_b = manifest_of(plain_registry.url, "conc/b", "1")
    base_blob = doc_a["layers"][0]["digest"]  # type: ignore[index]
    assert doc_b["layers"][0]["digest"] == base_blob  # type: ignore[index]
    base_size = doc_a["layers"][0]["size"]  # type: ignore[index]

    root = tmp_path / "root"
    open_overlay2(root).layers.close()
    # The first pull stalls inside the base blob until the second one is under way.
    fault = proxy.add(Fault(path=base_blob, stall_after=1 << 20))

    def start(ref: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "layerfs", "--root", str(root),
                                 "--driver", "overlay2", "pull", "-q", "--insecure",
                                 f"{proxy.host}/{ref}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, **cli_env(root)))

    first = start("conc/a:1")
    try:
        assert fault.stalled.wait(60), "the first pull never reached the base blob"
        second = start("conc/b:1")
        config_b = doc_b["config"]["digest"]  # type: ignore[index]
        deadline = time.monotonic() + 60
        while not proxy.requests("GET", config_b) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)        # the second pull now waits for the base (lock, then layer)
    finally:
        fault.release.set()
    outputs = []
    for proc in (first, second):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        outputs.append(stdout.strip())
    assert outputs == [a.id, b.id]

    gets = proxy.requests("GET", base_blob)
    assert [(g.range, g.body_bytes) for g in gets] == [(None, base_size)], \
        "the shared base blob was downloaded more than once"

    images = open_overlay2(root)
    try:
        assert images.get(a.id).layers[0].layer_id == images.get(b.id).layers[0].layer_id
        assert len(images.layers.layers()) == 3, "the shared base was applied once"
        state = snapshot(images)
        assert state["leases"] == 0 and state["scratch"] == []
    finally:
        close_images(images)
