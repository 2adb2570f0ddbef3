"""The index and stack model on layer tars alone (no driver): what each layer holds, what
the merged tree is at each layer and why, and dive's efficiency numbers."""

from __future__ import annotations

import io

import pytest

from layerfs.errors import CorruptState
from layerfs.inspect.index import DIR, FILE, HARDLINK, WHITEOUT, entries_from_tar
from layerfs.inspect.stack import (
    ADDED,
    MODIFIED,
    OPAQUE_CAUSE,
    REMOVED,
    REPLACED_CAUSE,
    UNMODIFIED,
    WHITEOUT_CAUSE,
    Stack,
    StackLayer,
    efficiency,
)
from layerfs.testing.images import LayerTar


def entries(layer: LayerTar) -> dict[str, object]:
    return {e.path: e for e in entries_from_tar(io.BytesIO(layer.bytes()), "test layer")}


def stack_of(*layers: LayerTar) -> Stack:
    out = []
    for pos, layer in enumerate(layers):
        es = entries_from_tar(io.BytesIO(layer.bytes()), f"layer {pos}")
        out.append(StackLayer(pos, f"L{pos}", {e.path: e for e in es},
                              sum(e.size for e in es if e.kind == FILE)))
    return Stack(out)


def test_entries_turn_whiteouts_and_opaque_markers_into_entries_and_flags() -> None:
    got = entries(LayerTar().dir("a").file("a/f", "12345").whiteout("a/gone")
                  .opaque("a").hardlink("a/h", "a/f").file("x/y/z", "deep"))
    assert got["a"].kind == DIR and got["a"].opaque and not got["a"].implicit
    assert got["a/f"].kind == FILE and got["a/f"].size == 5
    assert got["a/gone"].kind == WHITEOUT
    assert got["a/h"].kind == HARDLINK and got["a/h"].size == 5 and got["a/h"].link == "a/f"
    # parents the tar only implies are there, marked implicit
    assert got["x"].implicit and got["x/y"].implicit and got["x/y/z"].size == 4
    assert ".wh..wh..opq" not in "".join(got)


@pytest.mark.parametrize("layer, message", [
    (LayerTar().dir("a/.wh.b"), "corrupt whiteout 'a/.wh.b/': a whiteout is a file"),
    (LayerTar().file("a/.wh.", ""), "corrupt whiteout 'a/.wh.': it names no entry"),
    (LayerTar().file(".wh..wh..opq", ""), "the layer root cannot be opaque"),
    (LayerTar().hardlink("a", "nothing"), "hardlink 'a' points at 'nothing'"),
])
def test_a_damaged_layer_is_one_clear_error(layer: LayerTar, message: str) -> None:
    with pytest.raises(CorruptState) as err:
        entries(layer)
    assert message in str(err.value)
    assert str(err.value).startswith("test layer: ")


def test_the_stack_knows_what_each_layer_did_and_why() -> None:
    st = stack_of(
        LayerTar().dir("d").file("d/keep", "k").file("d/over", "1").file("d/gone", "g")
        .dir("d/sub").file("d/sub/deep", "deep").dir("o").file("o/old", "old")
        .dir("r").file("r/x", "x"),
        LayerTar().dir("d").file("d/over", "22").whiteout("d/gone").whiteout("d/sub")
        .dir("o").opaque("o").file("o/new", "new").file("r", "now a file"),
    )
    top = st.top
    assert st.entry_at("d/keep").size == 1
    assert st.entry_at("d/over").size == 2
    for path in ("d/gone", "d/sub", "d/sub/deep", "o/old", "r/x"):
        assert st.entry_at(path) is None, path
    causes = {p: st.history[p][-1] for p in ("d/gone", "d/sub/deep", "o/old", "r/x")}
    assert (causes["d/gone"].cause, causes["d/gone"].by) == (WHITEOUT_CAUSE, "d/gone")
    assert (causes["d/sub/deep"].cause, causes["d/sub/deep"].by) == (WHITEOUT_CAUSE, "d/sub")
    assert (causes["o/old"].cause, causes["o/old"].by) == (OPAQUE_CAUSE, "o")
    assert (causes["r/x"].cause, causes["r/x"].by) == (REPLACED_CAUSE, "r")
    # marks, as dive colours them
    assert st.mark("d/over", top) == MODIFIED
    assert st.mark("o/new", top) == ADDED
    assert st.mark("d/gone", top) == REMOVED
    assert st.mark("d/keep", top) == UNMODIFIED
    assert st.mark("d", top) == UNMODIFIED          # listed again, metadata unchanged
    assert st.mark("d/keep", 0) == ADDED
    assert st.children("d", top) == ["keep", "over"]
    assert st.children("d", top, with_removed=True) == ["gone", "keep", "over", "sub"]
    assert st.children("o", 0) == ["old"]
    assert "d" in st.dirs_with_changes(top)


def test_aggregated_marks_compare_with_the_base_layer() -> None:
    st = stack_of(LayerTar().file("a", "1").file("b", "1"),
                  LayerTar().file("c", "1"),
                  LayerTar().file("a", "22").whiteout("c"))
    assert st.mark("c", 1) == ADDED
    assert st.mark("c", 2) == REMOVED
    assert st.mark("c", 2, aggregated=True) == UNMODIFIED   # never in the base: not shown
    assert st.mark("a", 2, aggregated=True) == MODIFIED
    assert st.mark("b", 2, aggregated=True) == UNMODIFIED
    assert st.mark("c", 1, aggregated=True) == ADDED


def test_efficiency_is_dives_for_files_overwritten_and_deleted() -> None:
    # Hand-computed with dive's formula: nodes per path, their sizes
    #   big: 1000 (L1), 0 (whiteout, L3)     -> cumulative 1000, min 0
    #   conf: 10 (L1), 30 (L2)               -> cumulative 40, min 10
    #   base: 500 (L0)                       -> 500, 500
    # score = (0 + 10 + 500) / (1000 + 40 + 500); wasted = 1000 + 40
    st = stack_of(LayerTar().file("base", b"b" * 500),
                  LayerTar().file("big", b"x" * 1000).file("conf", b"c" * 10),
                  LayerTar().file("conf", b"c" * 30),
                  LayerTar().whiteout("big"))
    eff = efficiency(st)
    assert eff.score == pytest.approx(510 / 1540)
    assert eff.wasted_bytes == 1040
    assert [(i.path, i.count, i.wasted, i.layers) for i in eff.inefficiencies] == [
        ("big", 2, 1000, (1, 3)), ("conf", 2, 40, (1, 2))]
    assert eff.size_bytes == 1540 and eff.user_size_bytes == 1040
    assert eff.user_wasted_ratio == pytest.approx(1040 / 1040)


def test_efficiency_counts_files_deleted_with_their_directory() -> None:
    # dive attaches a directory's whiteout to the directory alone; layerfs gives each
    # file inside its deletion node (documented in stack.efficiency).
    st = stack_of(LayerTar().file("keep", b"k" * 100),
                  LayerTar().dir("cache").file("cache/a", b"a" * 300).file("cache/b", b"b" * 200),
                  LayerTar().whiteout("cache"))
    eff = efficiency(st)
    assert eff.wasted_bytes == 500
    assert {i.path for i in eff.inefficiencies} == {"cache/a", "cache/b"}
    assert eff.score == pytest.approx(100 / 600)


def test_an_image_without_waste_scores_one() -> None:
    eff = efficiency(stack_of(LayerTar().file("a", "1"), LayerTar().file("b", "2")))
    assert (eff.score, eff.wasted_bytes, eff.inefficiencies) == (1.0, 0, [])
    empty = efficiency(stack_of(LayerTar().dir("d")))
    assert empty.score == 1.0 and empty.user_wasted_ratio == 0.0


def test_diff_of_two_stacks() -> None:
    from layerfs.inspect.diff import diff_stacks
    from layerfs.inspect.targets import LayerRef, Target

    base = LayerTar().dir("etc").file("etc/conf", "a=1").file("etc/old", "o")
    a = stack_of(base)
    b = stack_of(base, LayerTar().dir("etc").file("etc/conf", "a=22").whiteout("etc/old")
                 .file("etc/new", "n"))
    ta = Target("image", "a", [LayerRef("L0", chain_id="c0")])
    tb = Target("image", "b", [LayerRef("L0", chain_id="c0"), LayerRef("L1", chain_id="c1")])
    d = diff_stacks(ta, a, tb, b)
    assert [(c.kind, c.path, c.size) for c in d.changes] == [
        ("C", "etc/conf", 4), ("A", "etc/new", 1), ("D", "etc/old", 1)]
    assert (d.shared, d.a_only, d.b_only) == (1, 0, 1)
