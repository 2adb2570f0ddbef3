"""Every hostile tar is refused, in every whiteout format, and nothing outside the layer changes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from layerfs.errors import InvalidArgument, UnsafeArchive
from layerfs.tar import WhiteoutFormat, apply_layer
from layerfs.testing.trees import Dir, File, make_tree, tree_manifest

from .hostile_tars import HostileCase, hostile_cases

# The corpus aims at <tmp_path>/outside; build it once with a placeholder to
# get the names, and again per test with the real path.
CASES = {c.name: c for c in hostile_cases(Path("/placeholder/outside"))}


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 24
    assert sum(c.expect is UnsafeArchive for c in CASES.values()) >= 24


def test_corpus_does_not_depend_on_the_temp_path_length() -> None:
    """Escapes aim at an absolute path under the machine's temp folder; a long one must
    reach the archive whole (in a PAX record), not cut at ustar's 100 bytes."""
    outside = Path("/" + "long-temp-folder/" * 20 + "outside")
    aimed = [c for c in hostile_cases(outside) if b"/long-temp-folder/" in c.data]
    assert len(aimed) >= 8
    for case in aimed:
        assert bytes(outside) in case.data, case.name


def _snapshot(tmp_path: Path) -> tuple[object, dict[str, object]]:
    """Everything outside tmp_path/layer: tmp_path's own metadata plus the manifest."""
    st = os.lstat(tmp_path)
    own = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    manifest = {k: v for k, v in tree_manifest(tmp_path).items()
                if k != "layer" and not k.startswith("layer/")}
    return own, manifest


@pytest.mark.parametrize("fmt", list(WhiteoutFormat), ids=lambda f: f.value)
@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_tar_is_refused(tmp_path: Path, name: str, fmt: WhiteoutFormat) -> None:
    outside = tmp_path / "outside"
    make_tree(outside, {"canary": File(b"tweet", mode=0o600),
                        "sub/": Dir(mode=0o700), "sub/deep": b"deep"})
    case: HostileCase = {c.name: c for c in hostile_cases(outside)}[name]
    if case.formats is not None and fmt.value not in case.formats:
        pytest.skip(f"{name} does not apply to {fmt.value}")
    layer = tmp_path / "layer"
    layer.mkdir()
    if case.setup:
        make_tree(layer, case.setup)
    before = _snapshot(tmp_path)

    with pytest.raises(InvalidArgument) as info:
        apply_layer(layer, io.BytesIO(case.data), fmt)

    assert isinstance(info.value, case.expect), (
        f"{name}: expected {case.expect.__name__}, got {type(info.value).__name__}: {info.value}")
    assert case.mentions in str(info.value), str(info.value)
    assert _snapshot(tmp_path) == before
    for aim in case.aims:
        assert not os.path.lexists(aim), aim
    assert (outside / "canary").read_bytes() == b"tweet"


def test_messages_are_one_clear_line(tmp_path: Path) -> None:
    """Errors read as sentences naming the problem, not as tarfile tracebacks."""
    for case in hostile_cases(tmp_path / "outside"):
        layer = tmp_path / "layers" / case.name
        layer.mkdir(parents=True)
        if case.setup:
            make_tree(layer, case.setup)
        with pytest.raises(InvalidArgument) as info:
            apply_layer(layer, io.BytesIO(case.data), WhiteoutFormat.IN_PLACE)
        msg = str(info.value)
        assert "\n" not in msg and len(msg) < 400, (case.name, msg)
        assert msg.startswith(("layer tar", "layer stream", "applying layer")), (case.name, msg)
