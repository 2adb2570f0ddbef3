"""containerd's filter syntax (layerfs/engines/filters.py), on the examples of its docs and suite."""

from __future__ import annotations

import pytest

from layerfs.engines import filters
from layerfs.errors import InvalidArgument

OBJECT = {("name",): "a-wl", ("kind",): "active", ("parent",): "p-wl",
          ("labels", "l"): "2", ("labels", "containerd.io/gc.root"): "check-walk",
          ("labels", "very complex label"): "something"}


def lookup(path: tuple[str, ...]) -> str | None:
    if path[0] == "labels":
        return OBJECT.get(("labels", ".".join(path[1:])))
    return OBJECT.get(path)


@pytest.mark.parametrize("expressions, matches", [
    ([], True),
    (["name==a-wl"], True),
    (["name==other"], False),
    (["name==other", "name==a-wl"], True),                      # any filter
    (["kind==active,labels.l==2"], True),                        # all selectors of one
    (["kind==active,labels.l==3"], False),
    (['labels."containerd.io/gc.root"==check-walk'], True),
    (['labels."very complex label"==something'], True),
    (["labels.l"], True),                                        # presence
    (["labels.missing"], False),
    (['parent!=""'], True),
    (["parent!=p-wl"], False),
    (["labels.missing!=x"], True),                               # absent compares as ""
    (["name~=^a-"], True),
    (["name~=/^b-/"], False),
    (["name~=|w.$|"], True),
    ([" name == a-wl , kind == active "], True),                 # spaces are allowed
    (['name=="a\\x2dwl"'], True),                                # Go escapes in quotes
])
def test_filters_match_as_containerds_do(expressions: list[str], matches: bool) -> None:
    assert filters.parse(expressions).matches(lookup) is matches


@pytest.mark.parametrize("bad", ['name=="open', "name==", ",name==a", "name==a,", "9-x==1",
                                 "name~=(", "labels.==x", "name=a"])
def test_bad_filters_are_invalid_arguments(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="filter"):
        filters.parse([bad])
