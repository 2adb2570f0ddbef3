"""Sizes as people write them: ``512M``, ``10g``, ``1.5GiB``, ``4096``.

One grammar for every size layerfs reads (driver options, ``layer create --size``,
``run -m``, ``pool create --size``, the qemu guest's disk): a decimal number, then an
optional unit ``b``, ``k``, ``m``, ``g``, ``t`` or ``p`` (any case), optionally followed
by ``ib`` or ``b`` (``KiB``, ``kb``). Units are powers of 1024, as Docker reads them.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtp]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes that ``text`` names; InvalidArgument (naming ``what``) if it is not a size."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise InvalidArgument(f"{what}: {text!r} is not a size (a number with an optional "
                              f"b, k, m, g, t or p suffix, e.g. 512m, 10G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
