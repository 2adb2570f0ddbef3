"""For ``pytest --pyargs layerfs.testing.conformance``: the suite's default fixtures."""

import pytest

from layerfs.testing.conformance.fixtures import (  # noqa: F401 (fixtures, found by name)
    capabilities,
    driver_factory,
    driver_name,
    layer_root,
    store,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
