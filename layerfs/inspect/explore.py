"""``layerfs image explore``: the analysis behind the explorer, its JSON and its CI mode.

The explorer shows an image the way dive does: its layers with the command that made
each and its size, the file tree as of a selected layer with what that layer (or every
layer up to it) added, changed and deleted, the space wasted by files that later layers
overwrite or delete, and dive's efficiency score (:func:`~layerfs.inspect.stack.efficiency`
documents the definition). This module holds what does not need a terminal:
:class:`Analysis` (the numbers, and ``--json``) and :func:`evaluate` (``--ci``: dive's
three rules, exit status 1 when one fails). The terminal UI is :mod:`.tui`.

CI rules, as dive's CI mode has them (same names and defaults; a rule is off when its
value is ``disabled``):

``lowest-efficiency`` (default 0.9)       fail if the efficiency score is below it;
``highest-wasted-bytes`` (default off)    fail if more bytes than this are wasted;
``highest-user-wasted-percent`` (0.1)     fail if the wasted bytes are more than this
                                          ratio of the bytes the layers above the base
                                          add (a ratio, 0.1 = 10 %, as in dive).

Sizes are read as everywhere in layerfs, in powers of 1024 (``20M`` = 20 MiB); dive
reads ``20MB`` as 20,000,000 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument
from ..units import parse_size
from .rules import (
    DEFAULT_HIGHEST_USER_WASTED_PERCENT,
    DEFAULT_HIGHEST_WASTED_BYTES,
    DEFAULT_LOWEST_EFFICIENCY,
    DISABLED,
)
from .stack import Efficiency, Stack, efficiency
from .targets import Target


@dataclass
class Analysis:
    target: Target
    stack: Stack
    efficiency: Efficiency

    @classmethod
    def of(cls, target: Target, stack: Stack) -> Analysis:
        return cls(target, stack, efficiency(stack))

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.target.as_dict(),
                "layers": [layer.as_dict() for layer in self.stack.layers],
                **self.efficiency.as_dict()}


@dataclass(frozen=True)
class RuleResult:
    name: str
    status: str          # PASS, FAIL or SKIP
    message: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.name, "status": self.status, "message": self.message}


@dataclass
class CiReport:
    results: list[RuleResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.status != "FAIL" for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rules": [r.as_dict() for r in self.results]}


def _ratio(text: str, what: str) -> float | None:
    if text.strip().lower() == DISABLED:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgument(f"--{what} {text!r}: give a ratio between 0 and 1, or "
                              f"'disabled'") from None
    if not 0 <= value <= 1:
        raise InvalidArgument(f"--{what} {text!r}: give a ratio between 0 and 1 (0.9 = 90 %)")
    return value


def evaluate(eff: Efficiency, *, lowest_efficiency: str = DEFAULT_LOWEST_EFFICIENCY,
             highest_wasted_bytes: str = DEFAULT_HIGHEST_WASTED_BYTES,
             highest_user_wasted_percent: str = DEFAULT_HIGHEST_USER_WASTED_PERCENT
             ) -> CiReport:
    """dive's CI rules over the analysis (values as given on the command line)."""
    report = CiReport()
    low = _ratio(lowest_efficiency, "lowest-efficiency")
    if low is None:
        report.results.append(RuleResult("lowest-efficiency", "SKIP", "disabled"))
    elif eff.score < low:
        report.results.append(RuleResult(
            "lowest-efficiency", "FAIL",
            f"image efficiency is too low (efficiency={eff.score:.4f} < threshold={low})"))
    else:
        report.results.append(RuleResult("lowest-efficiency", "PASS"))
    if highest_wasted_bytes.strip().lower() == DISABLED:
        report.results.append(RuleResult("highest-wasted-bytes", "SKIP", "disabled"))
    else:
        limit = parse_size(highest_wasted_bytes, what="--highest-wasted-bytes")
        if eff.wasted_bytes > limit:
            report.results.append(RuleResult(
                "highest-wasted-bytes", "FAIL",
                f"too many bytes wasted (wasted-bytes={eff.wasted_bytes} > threshold={limit})"))
        else:
            report.results.append(RuleResult("highest-wasted-bytes", "PASS"))
    high = _ratio(highest_user_wasted_percent, "highest-user-wasted-percent")
    if high is None:
        report.results.append(RuleResult("highest-user-wasted-percent", "SKIP", "disabled"))
    elif eff.user_wasted_ratio > high:
        report.results.append(RuleResult(
            "highest-user-wasted-percent", "FAIL",
            f"too many bytes wasted, relative to the user bytes added "
            f"(%-user-wasted-bytes={eff.user_wasted_ratio:.4f} > threshold={high})"))
    else:
        report.results.append(RuleResult("highest-user-wasted-percent", "PASS"))
    return report


def summary_lines(analysis: Analysis, size: Callable[[int], str], *,
                  limit: int | None = 20) -> list[str]:
    """dive's CI text: the numbers, then the inefficient files (largest first)."""
    eff = analysis.efficiency
    ratio = eff.user_wasted_ratio
    pct = "inf" if ratio == float("inf") else f"{ratio * 100:.4f} %"
    out = [f"{analysis.target.describe()}:",
           f"  efficiency: {eff.score * 100:.4f} %",
           f"  wasted bytes: {eff.wasted_bytes} ({size(eff.wasted_bytes)})",
           f"  user wasted percent: {pct}",
           "Inefficient files:",
           f"{'Count':>5}  {'Wasted Space':>12}  File Path"]
    files = eff.inefficiencies if limit is None else eff.inefficiencies[:limit]
    if not files:
        out.append("None")
    for f in files:
        out.append(f"{f.count:>5}  {size(f.wasted):>12}  /{f.path}")
    if len(files) < len(eff.inefficiencies):
        out.append(f"... {len(eff.inefficiencies) - len(files)} more (--json lists all)")
    return out


def report_lines(report: CiReport) -> list[str]:
    out = ["Results:"]
    for r in report.results:
        out.append(f"  {r.status}: {r.name}" + (f": {r.message}" if r.message and
                                                r.status != "SKIP" else ""))
    total = len(report.results)
    n = {s: sum(1 for r in report.results if r.status == s) for s in ("PASS", "FAIL", "SKIP")}
    out.append(f"Result: {'PASS' if report.passed else 'FAIL'} [Total: {total}] "
               f"[Passed: {n['PASS']}] [Failed: {n['FAIL']}] [Skipped: {n['SKIP']}]")
    return out
