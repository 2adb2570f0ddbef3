"""What layerfs ships for testing code built on it.

* :mod:`.conformance`: the suite every storage driver must pass, reusable by a driver
  in another package (``pytest --pyargs layerfs.testing.conformance``);
* :mod:`.trees`: build a directory tree from a spec, and compare trees exactly;
* :mod:`.images`: busybox and sample images from Debian packages, without network.

The repository's own test tooling (the qemu guest, the lab runner, test registries)
lives in ``tests/support/`` and is not shipped.
"""
