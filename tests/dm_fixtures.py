"""devicemapper options for the shared fixtures (tests/conftest.py).

The conformance suite opens every root without options; devicemapper's
defaults (a 100G sparse loopback pool, a 10G xfs base device) work in the qemu
guest but cost guest RAM and time, so its roots get a small loopback pool:
1G of data, 64M of metadata, a 256M ext4 base device (xfs needs 300M at
least; tests/drivers/test_devicemapper.py covers xfs). The options are
recorded at set-up, so subprocesses that reopen a root without options get
the same pool.
"""

from __future__ import annotations

CONFORMANCE_OPTIONS = ["loopdatasize=1G", "loopmetadatasize=64M", "basesize=256M", "fs=ext4"]


def options_for(driver: str, options: list[str] | None) -> list[str] | None:
    """The options to open a fresh test root of ``driver`` with."""
    if driver == "devicemapper" and options is None:
        return list(CONFORMANCE_OPTIONS)
    return options
