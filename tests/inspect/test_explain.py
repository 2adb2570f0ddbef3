"""``layerfs explain`` on every driver: the serving layer, the copies it hides and why,
unknown paths, broken images; the index it reads is built once and kept."""

from __future__ import annotations

import json
from pathlib import Path

from layerfs.images import ImageStore
from layerfs.inspect.explain import explain
from layerfs.inspect.index import Indexer
from layerfs.inspect.targets import image_target

from .conftest import assert_one_line_error, cli


def test_explain_tells_the_story_of_each_path(sample_on: ImageStore) -> None:
    layers = sample_on.layers
    indexer = Indexer(layers, sample_on)
    target = image_target(sample_on, "sample")

    ex = explain(layers, indexer, target, "/sample/changed.txt")
    assert ex.serving is not None and ex.serving.position == 2
    assert ex.serving.command == "delete and replace"
    assert ex.entry is not None and ex.entry.size == len("version 2\n")
    assert [(c.position, c.how, c.wasted) for c in ex.hidden] == [(1, "override", 10)]

    gone = explain(layers, indexer, target, "sample/gone.txt")
    assert not gone.exists and gone.deleted is not None
    assert (gone.deleted.position, gone.deleted.how) == (2, "whiteout")
    assert gone.nearest_parent == "/sample" and gone.wasted_bytes == 4

    deep = explain(layers, indexer, target, "/sample/tree/sub/deep.txt")
    assert deep.deleted is not None and deep.deleted.by == "sample/tree/sub"
    old = explain(layers, indexer, target, "/sample/replaced/old.txt")
    assert old.deleted is not None and (old.deleted.how, old.deleted.by) == \
        ("opaque", "sample/replaced")

    replaced = explain(layers, indexer, target, "/sample/replaced")
    assert [c.position for c in replaced.merged_from] == [2]   # opaque: layer 3 alone
    assert replaced.merged_from[0].entry is not None and replaced.merged_from[0].entry.opaque

    nothing = explain(layers, indexer, target, "/sample/dir/nope/deeper")
    assert not nothing.exists and nothing.deleted is None
    assert nothing.nearest_parent == "/sample/dir"

    # /linuxrc -> /bin/busybox: the last component is explained as it is
    link = explain(layers, indexer, target, "/linuxrc")
    assert link.entry is not None and link.entry.kind == "l"

    # Every layer of the image is indexed once, from its tar-split record, and kept.
    for layer in target.layers:
        info = layers.store.index_info(layer.layer_id)
        assert info is not None and info.source == "tar-split", layer


def test_explain_cli_lines_and_json(sample_on: ImageStore) -> None:
    root = sample_on.layers.root
    proc = cli(root, "explain", "--image", "sample", "/sample/changed.txt", check=True)
    assert "/sample/changed.txt in image sample:latest (3 layers)" in proc.stdout
    assert "served by layer 3 of 3 (delete and replace): file, 10 B, mode 0644, owner 0:0" \
        in proc.stdout
    assert "hides the file from layer 2 of 3 (add /sample): replaced by layer 3, 10 B " \
           "wasted" in proc.stdout
    proc = cli(root, "explain", "--image", "sample", "--json", "/sample/gone.txt",
               "/sample/keep.txt")
    assert proc.returncode == 1          # one of the paths does not exist
    gone, keep = json.loads(proc.stdout)
    assert gone["exists"] is False and gone["deleted"]["how"] == "whiteout"
    assert gone["nearest_parent"] == "/sample" and gone["wasted_bytes"] == 4
    assert keep["exists"] is True and keep["serving"]["layer"] == 2
    assert keep["entry"] == {"path": "/sample/keep.txt", "kind": "file", "mode": "0644",
                             "uid": 0, "gid": 0, "size": 5, "mtime": 1700000000}


def test_an_unknown_path_names_its_nearest_parent(sample_on: ImageStore) -> None:
    root = sample_on.layers.root
    proc = cli(root, "explain", "--image", "sample", "/etc/nothing/here")
    assert proc.returncode == 1
    assert "no such file or directory in any layer" in proc.stdout
    assert "nearest existing parent: /etc" in proc.stdout


def test_bad_targets_are_one_line_errors(sample_on: ImageStore) -> None:
    root = sample_on.layers.root
    assert_one_line_error(cli(root, "explain", "--image", "nope", "/x"), "image 'nope' not found")
    assert_one_line_error(cli(root, "explain", "/x"), "name one of --image")
    assert_one_line_error(cli(root, "explain", "--image", "sample", "--layer", "x", "/x"),
                          "name one of --image")
    assert_one_line_error(cli(root, "explain", "--container", "nobody", "/x"),
                          "no such container: nobody")


def _break(root: Path, sql: str, *args: object) -> None:
    import sqlite3

    db = sqlite3.connect(root / "layerfs.db")
    db.execute("PRAGMA foreign_keys = OFF")
    db.execute(sql, args)
    db.commit()
    db.close()


def test_a_broken_image_is_reported_in_one_line(tmp_path: Path, sample_archive: Path) -> None:
    # vfs: the store is broken on purpose, so no fixture's clean-up check can run on it
    root = tmp_path / "root"
    with ImageStore.open(root, "vfs") as images:
        images.load(sample_archive)
        middle = image_target(images, "sample").layers[1].layer_id
    # a damaged tar-split record (and no index kept): the layer cannot be read
    _break(root, "UPDATE image_layers SET tar_split = ? WHERE layer = ?", b"garbage", middle)
    assert_one_line_error(cli(root, "explain", "--image", "sample", "/sample/keep.txt"),
                          "image sample:latest: layer 2 of 3", "tar-split record is damaged")
    # a layer the image names but the store lost
    _break(root, "DELETE FROM layers WHERE id = ?", middle)
    assert_one_line_error(cli(root, "explain", "--image", "sample", "/sample/keep.txt"),
                          "image sample:latest: layer 2 of 3", "missing from the store")
