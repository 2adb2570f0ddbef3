"""``union stats``, ``image diff``, ``layer ls`` sizes, and the index's place in the store
(schema migration, caching, removal with the layer)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.images import ImageStore
from layerfs.inspect.index import INDEX_FORMAT, Indexer
from layerfs.inspect.targets import image_target, load_stack
from layerfs.layers import LayerStore
from layerfs.metastore import SCHEMA_VERSION, MetaStore

from ..conftest import root_for
from ..images.conftest import image_store
from .conftest import REPO, assert_one_line_error, cli


def test_union_stats_reads_and_resets_the_aufs_counters(
        tmp_path: Path, request: pytest.FixtureRequest, sample_archive: Path) -> None:
    with image_store("aufs", root_for("aufs", tmp_path, request)) as images:
        layers = images.layers
        if getattr(layers.driver, "mode", "") != "fuse":
            pytest.skip("kernel aufs keeps no counters")
        images.load(sample_archive)
        top = images.get("sample").top_layer
        assert top is not None
        with layers.mounted(top, readonly=True) as mnt:
            os.stat(mnt / "sample/dir/b.txt")
            proc = cli(layers.root, "union", "stats", str(mnt), "--json", check=True)
            data = json.loads(proc.stdout)
            assert data["mount"] == str(mnt)
            c = data["counters"]
            assert c["lookups"] == 3 and c["lookup_name_stats"] > 0
            assert c["lookup_whiteout_probes"] > 0 and c["copy_ups"] == 0
            table = cli(layers.root, "union", "stats", str(mnt), check=True).stdout
            assert "union counters of" in table
            assert "lookup_whiteout_probes" in table and "copy_up_bytes" in table
            # the kernel refuses any setxattr on a read-only mount, the reset one too
            assert_one_line_error(cli(layers.root, "union", "stats", str(mnt), "--reset"),
                                  "mounted read-only")
            assert_one_line_error(cli(layers.root, "union", "stats", str(tmp_path)),
                                  "is not a mount of this root")
        box = layers.create(top).id
        with layers.mounted(box) as mnt:
            with open(mnt / "sample/keep.txt", "a") as f:        # a copy-up with data
                f.write("more\n")
            proc = cli(layers.root, "union", "stats", str(mnt), "--reset", "--json",
                       check=True)
            c = json.loads(proc.stdout)["counters"]
            assert c["copy_ups"] == 1 and c["copy_up_bytes"] == len("kept\n")
            after = json.loads(cli(layers.root, "union", "stats", str(mnt), "--json",
                                   check=True).stdout)["counters"]
            assert after["copy_ups"] == 0 and after["lookups"] == 0
        layers.remove(box)
        assert_one_line_error(cli(layers.root, "union", "stats", "nobody"),
                              "no such container: nobody")


def test_union_stats_on_a_driver_without_counters(tmp_path: Path, sample_archive: Path) -> None:
    with image_store("vfs", tmp_path / "root") as images:
        images.load(sample_archive)
        top = images.get("sample").top_layer
        assert top is not None
        with images.layers.mounted(top, readonly=True) as mnt:
            assert_one_line_error(cli(images.layers.root, "union", "stats", str(mnt)),
                                  "vfs keeps no union counters")


def test_image_diff_lists_changes_and_shared_layers(tmp_path: Path, sample_archive: Path,
                                                    busybox_archive: Path) -> None:
    with image_store("overlay2", tmp_path / "root") as images:
        images.load(sample_archive)
        images.load(busybox_archive)
        root = images.layers.root
        proc = cli(root, "image", "diff", "busybox", "sample", check=True)
        assert "layers: 1 shared by chain id" in proc.stdout
        assert "A /sample/changed.txt  (file)  10 B" in proc.stdout
        assert "9 added (27 B), 0 changed (0 B), 0 deleted (0 B)" in proc.stdout
        data = json.loads(cli(root, "image", "diff", "sample", "busybox", "--json",
                              check=True).stdout)
        assert data["layers"] == {"shared": 1, "shared_bytes": data["layers"]["shared_bytes"],
                                  "a_only": 2, "b_only": 0}
        assert data["summary"]["deleted"] == 9 and data["summary"]["added"] == 0
        # layers compare too: the sample's layer 2 against its top layer
        target = image_target(images, "sample")
        two, three = target.layers[1].layer_id, target.layers[2].layer_id
        data = json.loads(cli(root, "image", "diff", f"layer:{two}", f"layer:{three}",
                              "--json", check=True).stdout)
        kinds = {c["path"]: c["kind"] for c in data["changes"]}
        assert kinds["/sample/gone.txt"] == "D"
        # "version 1" -> "version 2": same size, same mtime, so not changed by docker
        # diff's rule (content is not compared; the quick check rsync and Docker use)
        assert "/sample/changed.txt" not in kinds
        assert kinds["/sample/tree/fresh.txt"] == "A" and kinds["/sample/replaced/old.txt"] == "D"
        assert_one_line_error(cli(root, "image", "diff", "busybox", "nothing"),
                              "'nothing' is no image, container or layer here")


def test_layer_ls_shows_a_size_for_read_write_layers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with LayerStore.open(root, "overlay2") as layers:
        box = layers.create()
        with layers.mounted(box.id) as mnt:
            (mnt / "f").write_bytes(b"x" * 3000)
    rows = json.loads(cli(root, "layer", "ls", "--json", check=True).stdout)
    assert [(r["readonly"], r["size"]) for r in rows] == [(False, 3000)]
    table = cli(root, "layer", "ls", check=True).stdout
    assert "2.9 KiB" in table


def test_the_index_is_kept_once_and_goes_with_its_layer(tmp_path: Path,
                                                        sample_archive: Path) -> None:
    with image_store("vfs", tmp_path / "root") as images:
        images.load(sample_archive)
        layers = images.layers
        target = image_target(images, "sample")
        indexer = Indexer(layers, images)
        load_stack(indexer, target)
        store = layers.store
        for ref in target.layers:
            info = store.index_info(ref.layer_id)
            assert info is not None and info.format == INDEX_FORMAT
        top = target.layers[-1].layer_id
        rows = store.db.execute("SELECT COUNT(*) FROM layer_files WHERE layer = ?",
                                (top,)).fetchone()[0]
        assert rows == store.index_info(top).entries > 0  # type: ignore[union-attr]
        # a second read comes from the store, not from the layer
        def no_read(layer_id: str) -> None:
            raise AssertionError(f"layer {layer_id} read again")
        indexer.read = no_read  # type: ignore[method-assign, assignment]
        load_stack(indexer, target)
        images.remove("sample")
        assert store.db.execute("SELECT COUNT(*) FROM layer_files").fetchone()[0] == 0
        assert store.db.execute("SELECT COUNT(*) FROM layer_index").fetchone()[0] == 0


def test_a_schema_1_store_is_migrated_in_one_transaction(tmp_path: Path) -> None:
    db_path = tmp_path / "layerfs.db"
    MetaStore(db_path).close()
    # take it back to what schema 1 was, as a database of an older layerfs
    db = sqlite3.connect(db_path)
    db.executescript("DROP TABLE layer_files; DROP TABLE layer_index; "
                     "UPDATE settings SET value = '1' WHERE key = 'schema';")
    db.close()
    store = MetaStore(db_path)
    assert store.get_setting("schema") == str(SCHEMA_VERSION) == "2"
    names = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"layer_index", "layer_files"} <= names
    store.close()
    # a database from a newer layerfs is refused, not damaged
    db = sqlite3.connect(db_path)
    db.execute("UPDATE settings SET value = '99' WHERE key = 'schema'")
    db.commit()
    db.close()
    proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(tmp_path), "layer",
                           "ls"], capture_output=True, text=True, cwd=REPO)
    assert_one_line_error(proc, "written by a newer layerfs (schema 99")


def test_save_index_refuses_a_layer_being_removed(tmp_path: Path) -> None:
    with LayerStore.open(tmp_path / "root", "vfs") as layers:
        rec = layers.create(readonly=True)
        layers.store.db.execute("UPDATE layers SET state = 'removing' WHERE id = ?", (rec.id,))
        assert layers.store.save_index(rec.id, format=1, source="diff", rows=[],
                                       total_bytes=0) is False
        assert layers.store.index_info(rec.id) is None
        layers.store.db.execute("UPDATE layers SET state = 'ready' WHERE id = ?", (rec.id,))


def test_explain_lays_indexes_of_an_image_loaded_on_every_driver(sample_on: ImageStore) -> None:
    """The same answers whatever the driver (the index is the layer's diff)."""
    target = image_target(sample_on, "sample")
    stack = load_stack(Indexer(sample_on.layers, sample_on), target)
    assert stack.entry_at("sample/keep.txt") is not None
    assert stack.entry_at("sample/gone.txt") is None
    assert sorted(stack.children("sample", stack.top)) == ["changed.txt", "dir", "keep.txt",
                                                           "replaced", "tree"]


def test_a_container_is_explained_and_diffed_against_its_image(tmp_path: Path,
                                                               sample_archive: Path) -> None:
    with image_store("overlay2", tmp_path / "root") as images:
        images.load(sample_archive)
        root = images.layers.root
        run = cli(root, "run", "--name", "box", "--network", "none", "sample", "sh", "-c",
                  "echo more >> /sample/keep.txt; rm /sample/dir/b.txt; echo n > /new.txt")
        assert run.returncode == 0, run.stderr
        proc = cli(root, "explain", "--container", "box", "/sample/keep.txt", check=True)
        assert "in container box (4 layers)" in proc.stdout
        assert "served by layer 4 of 4 (container box (read-write))" in proc.stdout
        assert "hides the file from layer 2 of 4 (add /sample): replaced by layer 4" \
            in proc.stdout
        data = json.loads(cli(root, "image", "diff", "sample", "container:box", "--json",
                              check=True).stdout)
        kinds = {c["path"]: c["kind"] for c in data["changes"]}
        assert kinds["/sample/keep.txt"] == "C" and kinds["/sample/dir/b.txt"] == "D"
        assert kinds["/new.txt"] == "A"
        assert data["layers"]["shared"] == 3 and data["layers"]["b_only"] == 1
        cli(root, "rm", "box", check=True)


def test_every_inspect_command_on_the_driver(sample_on: ImageStore, inspect_driver: str) -> None:
    """explain, explore, diff and union stats through the library, on every driver (the
    qemu guest runs this for devicemapper: no CLI processes, Python is slow there)."""
    from layerfs.inspect.diff import diff_stacks
    from layerfs.inspect.explain import explain
    from layerfs.inspect.explore import Analysis, evaluate
    from layerfs.inspect.targets import layer_target

    layers = sample_on.layers
    indexer = Indexer(layers, sample_on)
    image = image_target(sample_on, "sample")
    box = layers.create(image.layers[-1].layer_id).id
    with layers.mounted(box) as mnt:
        (mnt / "sample/keep.txt").write_text("changed by the box\n")
        os.unlink(mnt / "sample/dir/b.txt")
        counters = layers.driver.counters(mnt)
        if getattr(layers.driver, "mode", "") == "fuse":
            assert counters is not None and counters["lookups"] > 0
        else:
            assert counters is None, inspect_driver
    boxed = layer_target(sample_on, box)
    kept = explain(layers, indexer, boxed, "/sample/keep.txt")
    assert kept.serving is not None and kept.serving.position == 3
    assert [(c.position, c.how) for c in kept.hidden] == [(1, "override")]
    gone = explain(layers, indexer, boxed, "/sample/dir/b.txt")
    assert gone.deleted is not None and (gone.deleted.position, gone.deleted.how) == \
        (3, "whiteout")
    analysis = Analysis.of(image, load_stack(indexer, image))
    assert analysis.efficiency.wasted_bytes == 39
    assert not evaluate(analysis.efficiency).passed
    d = diff_stacks(image, load_stack(indexer, image), boxed, load_stack(indexer, boxed))
    kinds = {c.path: c.kind for c in d.changes}
    assert kinds["sample/keep.txt"] == "C" and kinds["sample/dir/b.txt"] == "D"
    assert (d.shared, d.a_only, d.b_only) == (3, 0, 1)
    layers.remove(box)
