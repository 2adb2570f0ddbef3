"""Driver options: the ``-s KEY=VALUE`` settings a driver takes, parsed and typed.

A driver lists the keys it knows (``known_options``); anything else is refused, so a
typo is an error rather than a setting silently ignored (containerd's string labels are
the counter-example).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import InvalidArgument
from .units import parse_size


@dataclass
class DriverOptions:
    """Parsed ``key=value`` driver options with typed accessors and unknown-key checks."""

    values: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, items: Mapping[str, str] | list[str] | None) -> DriverOptions:
        if items is None:
            return cls({})
        if isinstance(items, Mapping):
            return cls(dict(items))
        values = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidArgument(f"driver option {item!r} is not KEY=VALUE")
            values[key.strip()] = value.strip()
        return cls(values)

    def check_known(self, driver: str, known: set[str]) -> None:
        unknown = sorted(set(self.values) - known)
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(f"{driver}: unknown option(s) {', '.join(unknown)} "
                                  f"(known: {allowed})")

    def get_bool(self, key: str, default: bool) -> bool:
        raw = self.values.get(key)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise InvalidArgument(f"option {key}={raw!r} is not a boolean (use true/false)")

    def get_size(self, key: str, default: int | None) -> int | None:
        raw = self.values.get(key)
        if raw is None:
            return default
        return parse_size(raw, what=f"option {key}")

    def get_str(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)
