"""The conformance suite every layerfs storage driver passes, shipped so that a driver
in another package can run it too.

Run it against a driver that is installed (registered in the ``layerfs.drivers``
entry-point group)::

    LAYERFS_CONFORMANCE_DRIVERS=mydriver pytest --pyargs layerfs.testing.conformance

or reuse it in your own tests, overriding the fixtures of :mod:`.fixtures` where your
driver needs something (options, a root on a particular filesystem)::

    # conftest.py
    pytest_plugins = ["layerfs.testing.conformance.fixtures"]

    @pytest.fixture
    def driver_name() -> str:
        return "mydriver"

    # test_conformance.py
    from layerfs.testing.conformance import DriverTests

    class TestMyDriver(DriverTests):
        pass

:class:`PropertyTests` (random edits, diff/apply round trips) needs hypothesis; import it
from :mod:`.properties`. docs/writing-a-driver.md walks through writing a driver.
"""

from typing import TYPE_CHECKING, Any

import pytest

# Plain asserts in the suite report their values (pytest rewrites them) wherever it runs.
pytest.register_assert_rewrite("layerfs.testing.conformance.fixtures",
                               "layerfs.testing.conformance.properties",
                               "layerfs.testing.conformance.suite")

from .fixtures import DriverFactory, close_and_check, open_or_skip, selected_drivers  # noqa: E402

if TYPE_CHECKING:
    from .suite import DriverTests, make_base, manifest_of, tar_of

_SUITE = {"DriverTests", "make_base", "manifest_of", "tar_of"}


def __getattr__(name: str) -> Any:
    # The suite module is imported on first use, not with the fixtures: a conftest.py
    # that imports the fixtures must be loaded (and register the "slow" marker) before
    # the suite's decorators run.
    if name in _SUITE:
        from . import suite

        return getattr(suite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DriverFactory", "DriverTests", "close_and_check", "make_base", "manifest_of",
           "open_or_skip", "selected_drivers", "tar_of"]
