"""What each driver adds to ``explain``: overlay2's metacopy and copy-up, aufs's branch
probes (computed, and counted on the live union), btrfs's and devicemapper's shared and
exclusive bytes; read-write layers are read afresh every time, never cached."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.images import ImageStore
from layerfs.inspect.explain import explain, lookup_cost
from layerfs.inspect.index import Indexer
from layerfs.inspect.targets import layer_target, load_stack
from layerfs.layers import LayerStore
from layerfs.testing import images as timg

from ..conftest import root_for
from ..images.conftest import IMAGE_DRIVERS, image_store, open_images_or_skip
from .conftest import assert_one_line_error, cli

MiB = 1 << 20


def _big_image(images: ImageStore, scratch: Path) -> str:
    """busybox + a layer with a 1 MiB file; returns the image's top layer id."""
    base = timg.busybox_rootfs_tar(scratch / "bb.tar", scratch).read_bytes()
    big = timg.LayerTar().dir("data").file("data/big.bin", os.urandom(MiB)).bytes()
    timg.build_image(scratch / "big.tar", [base, big], name="big:latest",
                     history=["busybox", "add a 1 MiB file"])
    images.load(scratch / "big.tar")
    top = images.get("big").top_layer
    assert top is not None
    return top


@pytest.mark.parametrize("driver", [d for d in IMAGE_DRIVERS if d in ("btrfs", "devicemapper")])
def test_block_level_drivers_tell_shared_from_exclusive_bytes(
        driver: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with image_store(driver, root_for(driver, tmp_path, request)) as images:
        layers = images.layers
        top = _big_image(images, tmp_path)
        box = layers.create(top).id
        with layers.mounted(box) as mnt, open(mnt / "data/big.bin", "ab") as f:
            f.write(b"x" * 4096)
        ex = explain(layers, Indexer(layers, images), layer_target(images, box),
                     "/data/big.bin")
        facts = ex.facts
        assert ex.facts_layer == 2                      # the top layer's copy is in use
        assert ex.serving is not None and ex.serving.position == 2
        assert facts["shared_bytes"] >= MiB - 64 * 1024, facts
        assert 0 < facts["exclusive_bytes"] <= 128 * 1024, facts
        if driver == "devicemapper":
            assert facts["device_exclusive_bytes"] > 0 and facts["device_shared_bytes"] > MiB
        layers.remove(box)


@pytest.fixture
def metacopy_images(tmp_path: Path) -> Iterator[ImageStore]:
    layers = LayerStore.open(tmp_path / "root", "overlay2", ["metacopy=true"])
    images = ImageStore(layers)
    try:
        yield images
    finally:
        from ..images.conftest import close_images

        close_images(images)


def test_overlay2_says_metacopy_and_copied_up(metacopy_images: ImageStore,
                                              tmp_path: Path) -> None:
    images = metacopy_images
    layers = images.layers
    top = _big_image(images, tmp_path)
    box = layers.create(top).id
    with layers.mounted(box) as mnt:
        os.chmod(mnt / "data/big.bin", 0o600)            # metadata only: metacopy
        (mnt / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")   # a real copy-up
        indexer = Indexer(layers, images)
        target = layer_target(images, box)
        ex = explain(layers, indexer, target, "/data/big.bin")
        assert ex.serving is not None and ex.serving.position == 2
        assert ex.facts["metacopy"] is True and ex.facts["copied_up"] is True
        assert ex.facts["allocated_bytes"] < 64 * 1024       # no data copied
        assert ex.data_from is not None and ex.data_from.position == 1
        passwd = explain(layers, indexer, target, "/etc/passwd")
        assert passwd.facts["copied_up"] is True and passwd.facts["metacopy"] is False
        # read-write layers are never cached: a change shows at once
        assert layers.store.index_info(box) is None
        (mnt / "data/new").write_text("new")
        assert explain(layers, indexer, target, "/data/new").exists
    proc = cli(layers.root, "explain", "--layer", box, "/data/big.bin")
    assert "overlay: metacopy in layer 3: only the metadata was copied up, the data is " \
           "still read from layer 2 of 3" in proc.stdout, proc.stdout + proc.stderr


def _five_layer_image(images: ImageStore, scratch: Path) -> str:
    """Lab 2's image: a/b/c/d/e in the bottom layer, f2..f5 next to it above."""
    layers_ = [timg.LayerTar().dir("a").dir("a/b").dir("a/b/c").dir("a/b/c/d")
               .file("a/b/c/d/e", "I am in the bottom layer\n").bytes()]
    for i in range(2, 6):
        layers_.append(timg.LayerTar().dir("a").dir("a/b").dir("a/b/c").dir("a/b/c/d")
                       .file(f"a/b/c/d/f{i}", f"layer {i}\n").bytes())
    timg.build_image(scratch / "five.tar", layers_, name="five:latest",
                     history=["bottom"] + [f"add f{i}" for i in range(2, 6)])
    images.load(scratch / "five.tar")
    top = images.get("five").top_layer
    assert top is not None
    return top


def test_aufs_lookup_cost_computed_matches_the_union_counters(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with image_store("aufs", root_for("aufs", tmp_path, request)) as images:
        layers = images.layers
        if getattr(layers.driver, "mode", "") != "fuse":
            pytest.skip("kernel aufs keeps no counters")
        top = _five_layer_image(images, tmp_path)
        indexer = Indexer(layers, images)
        target = layer_target(images, top)
        load_stack(indexer, target)
        # the numbers of lab 2, computed from the indexes alone (nothing mounted)
        cold = explain(layers, indexer, target, "/a/b/c/d/e")
        assert cold.counted is None
        assert cold.lookup is not None and cold.lookup.as_dict() == {
            "branches": 5, "components": 5, "lookups": 5, "lookup_name_stats": 25,
            "lookup_whiteout_probes": 25, "lookup_opaque_probes": 16, "found": True}
        missing = explain(layers, indexer, target, "/a/b/c/d/nothing")
        assert missing.lookup is not None and (missing.lookup.name_stats,
                                               missing.lookup.found) == (25, False)
        with layers.mounted(top, readonly=True):
            counted = explain(layers, indexer, target, "/a/b/c/d/e")
            # a fresh mount: the real lookup costs exactly what the model says
            assert counted.counted == {"lookups": 5, "lookups_negative": 0,
                                       "lookup_name_stats": 25, "lookup_whiteout_probes": 25,
                                       "lookup_opaque_probes": 16}
            warm = explain(layers, indexer, target, "/a/b/c/d/e")
            assert warm.counted is not None and not any(warm.counted.values())
        # a container layer that deletes e: the whiteout ends the search at once
        box = layers.create(top).id
        with layers.mounted(box) as mnt:
            os.unlink(mnt / "a/b/c/d/e")
        with layers.mounted(box):
            boxed = layer_target(images, box)
            ex = explain(layers, indexer, boxed, "/a/b/c/d/e")
            assert ex.lookup is not None
            assert (ex.lookup.name_stats, ex.lookup.whiteout_probes,
                    ex.lookup.opaque_probes) == (24, 25, 20)
            assert ex.counted is not None
            assert (ex.counted["lookup_name_stats"], ex.counted["lookup_whiteout_probes"],
                    ex.counted["lookup_opaque_probes"]) == (24, 25, 20)
        layers.remove(box)


def test_lookup_cost_stops_at_an_opaque_directory() -> None:
    from layerfs.inspect.index import entries_from_tar
    from layerfs.inspect.stack import Stack, StackLayer

    tars = [timg.LayerTar().dir("x").file("x/f", "1"),
            timg.LayerTar().dir("x").file("x/g", "2"),
            timg.LayerTar().dir("x").opaque("x").file("x/h", "3")]
    stack = Stack([StackLayer(i, f"L{i}", {e.path: e for e in
                                           entries_from_tar(io.BytesIO(t.bytes()), "t")})
                   for i, t in enumerate(tars)])
    cost = lookup_cost(stack, "x/f")
    # x: 3 branches; opaque probe in the top one finds the marker: x/f searched there only
    assert (cost.name_stats, cost.whiteout_probes, cost.opaque_probes, cost.found) == \
        (3 + 1, 3 + 1, 1, False)


def test_a_corrupt_whiteout_in_a_layer_is_one_line(tmp_path: Path,
                                                   request: pytest.FixtureRequest,
                                                   sample_archive: Path) -> None:
    images = open_images_or_skip("aufs", root_for("aufs", tmp_path, request))
    try:
        layers = images.layers
        images.load(sample_archive)
        top = images.get("sample").top_layer
        assert top is not None
        box = layers.create(top).id
        branch = layers.root / "aufs" / "diff" / box
        (branch / "etc").mkdir()                   # behind the union's back: a
        (branch / "etc" / ".wh.").write_text("")   # whiteout that names nothing
        proc = cli(layers.root, "explain", "--layer", box, "/etc/passwd")
        assert_one_line_error(proc, f"layer 4 of 4 ({box[:12]})", "corrupt whiteout",
                              "'etc/.wh.'")
        layers.remove(box)
    finally:
        from ..images.conftest import close_images

        close_images(images)
