"""A complete tour of the layerfs Python API. Run as root:

    .venv/bin/python docs/example.py [ROOT] [DRIVER]

It builds an image layer from a tar made on the fly, stacks a container layer
on it, changes files through a mount, lists the changes, exports them as an
OCI layer tar, applies that tar as a new layer, and removes every layer it made
-- in a ``finally``, so an error or Ctrl-C half-way leaves nothing either.
The test suite runs this file (tests/test_docs_example.py).
"""

from __future__ import annotations

import io
import sys
import tarfile
import tempfile

import layerfs


def rootfs_tar() -> io.BytesIO:
    """A tiny root filesystem: /etc/hostname and /etc/motd."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in [("etc/hostname", "example\n"), ("etc/motd", "welcome\n")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def main(root: str, driver: str | None) -> None:
    with layerfs.open_root(root, driver=driver) as store:
        print(f"driver: {store.driver.name}")
        made: list[str] = []                               # removed at the end, come what may
        try:
            image = store.apply(rootfs_tar())              # read-only image layer
            made.append(image.id)
            box = store.create(parent=image.id)            # read-write container layer
            made.append(box.id)
            with store.mounted(box.id) as path:            # always unmounted afterwards
                (path / "etc" / "motd").write_text("changed\n")
                (path / "etc" / "hostname").unlink()
                (path / "hello.txt").write_text("hi\n")
            for change in store.changes(box.id):
                print(f"{change.kind.value} {change.path}")
            tar = io.BytesIO()
            size = store.diff(box.id, tar)                 # OCI layer tar, whiteouts included
            print(f"diff: {size} bytes of file data")
            tar.seek(0)
            copy = store.apply(tar, parent=image.id)       # same changes, new layer
            made.append(copy.id)
            with store.mounted(copy.id, readonly=True) as path:
                print("copy sees:", sorted(p.name for p in (path / "etc").iterdir()),
                      (path / "hello.txt").read_text().strip())
        finally:
            # Children before parents. On Ctrl-C or an error too: an example run
            # leaves no layers behind.
            for layer_id in reversed(made):
                store.remove(layer_id)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="layerfs-example-"),
         sys.argv[2] if len(sys.argv) > 2 else None)
