"""The optional Debian base image: debootstrap (minbase, the host's suite) from the
Debian mirror, imported as a one-layer image, with a working dpkg and apt inside.

It needs the mirror, as ``scripts/setup`` does; a mirror that cannot be reached is a
failure with debootstrap's own last lines, not a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfs.images import ImageStore
from layerfs.testing import images as timg

from .conftest import run_image


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_debootstrapped_debian_imports_and_has_apt(images: ImageStore, debian_tree: Path) -> None:
    suite = timg.host_debian_suite()
    image = images.import_rootfs(debian_tree, f"lfs/debian:{suite}",
                                 changes=["CMD [\"/bin/bash\"]"])
    assert images.get(f"lfs/debian:{suite}").id == image.id
    out = run_image(images, f"lfs/debian:{suite}",
                    ["/bin/sh", "-c", "apt-get --version | head -n1; "
                     "dpkg-query -W -f='${Status}\\n' apt dpkg; . /etc/os-release; "
                     "echo $VERSION_CODENAME"])
    first, *status, codename = out.splitlines()
    assert first.startswith("apt "), out
    assert status == ["install ok installed"] * 2, out
    assert codename == suite
