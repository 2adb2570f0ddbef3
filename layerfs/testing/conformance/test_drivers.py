"""What ``pytest --pyargs layerfs.testing.conformance`` runs: the suite, and the property
test when hypothesis is installed, over the drivers of :mod:`.fixtures`."""

from __future__ import annotations

import importlib.util

from layerfs.testing.conformance.suite import DriverTests


class TestDriver(DriverTests):
    pass


if importlib.util.find_spec("hypothesis") is not None:
    from layerfs.testing.conformance.properties import PropertyTests

    class TestDriverProperties(PropertyTests):
        pass
