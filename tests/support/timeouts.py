"""Per-folder time bounds for tests that drive daemons, registries and containers."""

from __future__ import annotations

from pathlib import Path

import pytest


def bound(config: pytest.Config, items: list[pytest.Item], folder: Path, seconds: int) -> None:
    """Give every test below ``folder`` a pytest-timeout of ``seconds`` unless it has its
    own: a hung helper or daemon must not eat the CI budget."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if folder in Path(str(item.path)).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(seconds))
