"""Ids made before stay the same: an image saved by an earlier layerfs saves byte for
byte again, whatever the exporter does now.

Saving never re-exports a layer: it replays the tar-split record kept when the layer
arrived (loaded, pulled, imported or committed) over the layer's files. Issue 22
changed the export order (each directory's whiteouts first); a layer committed
before keeps the old order, its diff id and the image id. data/README.md says how
the archive was made.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from layerfs.images import ImageStore

DATA = Path(__file__).parent / "data"
SAVED_BEFORE = DATA / "saved-before-issue-22.tar"
NAME = "lfs-test/saved-before:v1"
OLD_ORDER = ["a", "a/.wh.file2", "a/new", ".wh.b", ".wh.file1", "file4"]
NEW_ORDER = [".wh.b", ".wh.file1", "a", "a/.wh.file2", "a/new", "file4"]


def member_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.name.rstrip("/") for m in tar.getmembers()]


def test_an_image_saved_before_saves_byte_for_byte(images_on: ImageStore,
                                                   tmp_path: Path) -> None:
    images = images_on
    (image,) = images.load(SAVED_BEFORE)
    top = image.layers[-1]
    with tarfile.open(SAVED_BEFORE) as archive:
        member = archive.extractfile(f"{top.diff_id.split(':')[1]}/layer.tar")
        assert member is not None
        old_layer = member.read()
    assert member_names(old_layer) == OLD_ORDER
    assert top.diff_id == "sha256:" + hashlib.sha256(old_layer).hexdigest()

    out = tmp_path / "again.tar"
    images.save([NAME], out)
    assert out.read_bytes() == SAVED_BEFORE.read_bytes()
    with images.open_layer_tar(top) as replay:
        assert replay.read() == old_layer  # the tar-split record, replayed

    # The same layer exported now comes out in the new order (and so with another
    # digest): the save above did not re-export it.
    fresh = io.BytesIO()
    images.layers.diff(top.layer_id, fresh)
    assert member_names(fresh.getvalue()) == NEW_ORDER
