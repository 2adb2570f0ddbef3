"""containerd's filter expressions, as its List calls send them.

A filter is a comma-separated list of *selectors*, all of which must match::

    name==foo,labels."containerd.io/gc.root"
    kind==active,labels.l==2
    parent!=""
    name~=^sha256:

A selector is a field path (fields joined by ``.``; a field that is not a
plain word is double-quoted, Go string syntax) with an optional operator and
value: no operator tests that the field is present, ``==`` and ``!=``
compare, ``~=`` searches with a regular expression. A value is a bare word
(up to the next comma or space) or quoted with ``"..."``, ``/.../`` or
``|...|``. A request carries several filters; an object is listed when it
matches any of them, and no filter at all matches everything.

containerd's grammar is small enough that a hand-written parser is shorter
than any dependency; see docs/architecture.md.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from layerfs.errors import InvalidArgument

#: Looks a field path up on an object: its value, or None when the field is absent.
FieldLookup = Callable[[tuple[str, ...]], str | None]

_WORD = re.compile(r"[A-Za-z0-9_]+")
_BARE_VALUE = re.compile(r"[^\s,]+")
_OPERATORS = ("==", "!=", "~=")


@dataclass(frozen=True)
class Selector:
    """One ``fieldpath[operator value]`` term."""

    path: tuple[str, ...]
    operator: str | None = None
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def matches(self, lookup: FieldLookup) -> bool:
        found = lookup(self.path)
        if self.operator is None:
            return found is not None
        if self.operator == "==":
            return found is not None and found == self.value
        if self.operator == "!=":
            # containerd compares an absent field as the empty string here.
            return (found or "") != self.value
        assert self.pattern is not None
        return self.pattern.search(found or "") is not None


@dataclass(frozen=True)
class Filter:
    """Filters of one request: any of ``alternatives`` (each a conjunction) must match."""

    alternatives: tuple[tuple[Selector, ...], ...] = ()

    def matches(self, lookup: FieldLookup) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(lookup) for s in conj) for conj in self.alternatives)


def parse(expressions: Sequence[str]) -> Filter:
    """Parse a request's filter strings; InvalidArgument names the bad one and where."""
    return Filter(tuple(_Parser(e).selectors() for e in expressions if e.strip()))


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.text!r}: {what} at position {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def selectors(self) -> tuple[Selector, ...]:
        result = [self.selector()]
        while True:
            self.skip_space()
            if self.pos == len(self.text):
                return tuple(result)
            if not self.peek(","):
                raise self.error("expected ',' or the end")
            self.pos += 1
            result.append(self.selector())

    def selector(self) -> Selector:
        path = [self.field()]
        while True:
            self.skip_space()
            if not self.peek("."):
                break
            self.pos += 1
            path.append(self.field())
        self.skip_space()
        operator = next((op for op in _OPERATORS if self.peek(op)), None)
        if operator is None:
            return Selector(tuple(path))
        self.pos += len(operator)
        value = self.value()
        pattern = None
        if operator == "~=":
            try:
                pattern = re.compile(value)
            except re.error as err:
                raise self.error(f"bad regular expression {value!r} ({err})") from None
        return Selector(tuple(path), operator, value, pattern)

    def field(self) -> str:
        self.skip_space()
        if self.peek('"'):
            return self.quoted('"')
        match = _WORD.match(self.text, self.pos)
        if match is None:
            raise self.error("expected a field name or a quoted field")
        self.pos = match.end()
        return match.group()

    def value(self) -> str:
        self.skip_space()
        for quote in ('"', "/", "|"):
            if self.peek(quote):
                return self.quoted(quote)
        match = _BARE_VALUE.match(self.text, self.pos)
        if match is None:
            raise self.error("expected a value")
        self.pos = match.end()
        return match.group()

    def quoted(self, quote: str) -> str:
        start = self.pos
        i = start + 1
        while i < len(self.text):
            if self.text[i] == "\\":
                i += 2
                continue
            if self.text[i] == quote:
                break
            i += 1
        else:
            raise self.error("unterminated quoted text")
        self.pos = i + 1
        body = self.text[start + 1:i]
        if quote != '"':
            # /.../ and |...| are for regular expressions: only the delimiter is escaped.
            return body.replace("\\" + quote, quote)
        try:
            # Go's escapes (\n \t \" \\ \xHH \uHHHH) read the same as Python's.
            value = ast.literal_eval(self.text[start:i + 1])
        except (SyntaxError, ValueError):
            raise self.error(f"bad quoted text {self.text[start:i + 1]}") from None
        assert isinstance(value, str)
        return value
