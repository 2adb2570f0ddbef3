"""Images for tests and labs, built from Debian packages only (nothing is downloaded).

* :func:`busybox_rootfs` — a small root filesystem from ``busybox-static``:
  ``/bin/busybox``, a symlink per applet, ``/etc/passwd`` and ``/etc/group``.
* :class:`LayerTar` — write a layer tar entry by entry, whiteouts and opaque
  markers included, or hostile entries on purpose.
* :func:`build_image` — an image archive from layer tars, written here with
  :mod:`tarfile` and :mod:`json` (independently of :mod:`layerfs.oci`, so the
  loader is tested against a second implementation): ``docker save`` format
  (as Docker 20.10 writes it), OCI layout directory or OCI layout tar.
* :func:`sample_image` — busybox plus two layers that add, delete, and delete
  and re-create, with the expected result (:data:`SAMPLE_EXPECTED`).
* :func:`debian_rootfs` — a minimal Debian via ``debootstrap`` (labs that want
  a package manager; needs the debootstrap package and the Debian mirror).

Everything is deterministic: same inputs, same bytes, same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")
#: mtime of everything these helpers write (2023-11-14), for reproducible tars.
FIXED_MTIME = 1_700_000_000

PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n"


class MissingTool(RuntimeError):
    """A Debian package these helpers need is not installed (the message names it)."""


def busybox_applets() -> list[str]:
    """Paths (relative, e.g. ``usr/bin/awk``) of the applets busybox-static provides."""
    if not BUSYBOX.exists():
        raise MissingTool(f"{BUSYBOX} is missing: apt-get install busybox-static")
    out = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True,
                         check=True).stdout
    return sorted({line.strip().lstrip("/") for line in out.splitlines() if line.strip()})


def busybox_rootfs(dest: str | os.PathLike[str]) -> Path:
    """Fill ``dest`` with a busybox root filesystem and return it.

    ``chroot DEST /bin/sh -c 'echo hi'`` works on the result.
    """
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    for d, mode in (("bin", 0o755), ("sbin", 0o755), ("usr", 0o755), ("usr/bin", 0o755),
                    ("usr/sbin", 0o755), ("etc", 0o755), ("dev", 0o755), ("proc", 0o555),
                    ("sys", 0o555), ("tmp", 0o1777), ("root", 0o700), ("home", 0o755),
                    ("var", 0o755), ("var/tmp", 0o1777), ("run", 0o755)):
        (root / d).mkdir(exist_ok=True)
        os.chmod(root / d, mode)
    shutil.copyfile(BUSYBOX, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    for applet in busybox_applets():
        if applet == "bin/busybox":
            continue
        link = root / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink() and not link.exists():
            os.symlink("/bin/busybox", link)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    for p in [root, *root.rglob("*")]:
        os.utime(p, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    return root


def tar_tree(src: str | os.PathLike[str], out: str | os.PathLike[str] | io.BufferedIOBase,
             ) -> None:
    """A deterministic tar of a directory's contents (sorted, names without ``./``)."""
    root = Path(src)
    entries = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    fileobj = out if isinstance(out, io.BufferedIOBase) else open(out, "wb")
    try:
        with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
            links: dict[tuple[int, int], str] = {}
            for rel in entries:
                path = root / rel
                info = tar.gettarinfo(str(path), arcname=rel)
                info.uname = info.gname = ""
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in links:
                        info.type, info.linkname, info.size = tarfile.LNKTYPE, links[key], 0
                        tar.addfile(info)
                        continue
                    links[key] = rel
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    finally:
        if fileobj is not out:
            fileobj.close()


def busybox_rootfs_tar(path: str | os.PathLike[str],
                       scratch: str | os.PathLike[str] | None = None) -> Path:
    """A busybox root filesystem as a layer tar at ``path`` (the tree is built in
    ``scratch``, default: next to ``path``, and removed)."""
    with tempfile.TemporaryDirectory(prefix=".busybox-", dir=_scratch(scratch, path)) as t:
        tree = busybox_rootfs(Path(t) / "rootfs")
        tar_tree(tree, path)
    return Path(path)


# --- layer tars, entry by entry ------------------------------------------------------------

class LayerTar:
    """Build a layer tar in memory::

        layer = LayerTar().dir("etc").file("etc/motd", "hi\\n").whiteout("etc/hostname")
        data = layer.bytes()
    """

    def __init__(self) -> None:
        self._entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def _info(self, name: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = FIXED_MTIME
        return info

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> LayerTar:
        self._entries.append((self._info(name.rstrip("/") + "/", tarfile.DIRTYPE, mode, uid,
                                         gid), None))
        return self

    def file(self, name: str, data: bytes | str, mode: int = 0o644, uid: int = 0,
             gid: int = 0) -> LayerTar:
        payload = data.encode() if isinstance(data, str) else data
        info = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(payload)
        self._entries.append((info, payload))
        return self

    def symlink(self, name: str, target: str) -> LayerTar:
        info = self._info(name, tarfile.SYMTYPE, 0o777, 0, 0)
        info.linkname = target
        self._entries.append((info, None))
        return self

    def hardlink(self, name: str, target: str) -> LayerTar:
        info = self._info(name, tarfile.LNKTYPE, 0o644, 0, 0)
        info.linkname = target
        self._entries.append((info, None))
        return self

    def whiteout(self, path: str) -> LayerTar:
        """Delete ``path`` (and everything below it) from the layers underneath."""
        parent, _, base = path.rstrip("/").rpartition("/")
        return self.file(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b"")

    def opaque(self, directory: str) -> LayerTar:
        """Hide everything the layers underneath have in ``directory``."""
        return self.file(f"{directory.rstrip('/')}/.wh..wh..opq", b"")

    def raw(self, info: tarfile.TarInfo, data: bytes | None = None) -> LayerTar:
        """Any entry at all (hostile names, odd types) for negative tests."""
        self._entries.append((info, data))
        return self

    def tree(self, src: str | os.PathLike[str]) -> LayerTar:
        """Add every entry of a directory, as :func:`tar_tree` writes them."""
        buf = io.BytesIO()
        tar_tree(src, buf)
        buf.seek(0)
        with tarfile.open(fileobj=buf) as tar:
            for info in tar.getmembers():
                member = tar.extractfile(info) if info.isreg() else None
                data = member.read() if member is not None else None
                self._entries.append((info, data))
        return self

    def bytes(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in self._entries:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


# --- image archives ---------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class BuiltImage:
    """What :func:`build_image` wrote."""

    path: Path
    id: str                       # sha256 of the config: the image id
    diff_ids: list[str]
    config: dict[str, Any]
    name: str | None
    layer_blobs: list[str] = field(default_factory=list)   # names inside the archive


def image_config(diff_ids: Sequence[str], *, cmd: Sequence[str] | None = None,
                 entrypoint: Sequence[str] | None = None, env: Sequence[str] = (),
                 workdir: str = "", user: str = "", exposed: Sequence[str] = (),
                 history: Sequence[str] | None = None) -> dict[str, Any]:
    """An image config (the JSON Docker and OCI share) for ``diff_ids``."""
    cfg: dict[str, Any] = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                   "/sbin:/bin", *env]}
    if cmd is not None:
        cfg["Cmd"] = list(cmd)
    if entrypoint is not None:
        cfg["Entrypoint"] = list(entrypoint)
    if workdir:
        cfg["WorkingDir"] = workdir
    if user:
        cfg["User"] = user
    if exposed:
        cfg["ExposedPorts"] = {p: {} for p in exposed}
    created = "2023-11-14T22:13:20Z"
    steps = list(history) if history is not None else [f"layer {i}" for i in range(len(diff_ids))]
    return {
        "architecture": "amd64", "os": "linux", "created": created,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": created, "created_by": step} for step in steps],
    }


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


#: Archive formats of :func:`build_image`, named as ``layerfs save --format`` names them.
FORMATS = ("docker", "oci", "oci-dir")


def build_image(out: str | os.PathLike[str], layers: Sequence[bytes], *,
                name: str | None = "test:latest", format: str = "docker",
                compression: str = "none", config: dict[str, Any] | None = None,
                **config_args: Any) -> BuiltImage:
    """Write an image made of ``layers`` (uncompressed layer tars, bottom first).

    ``format``: ``docker`` (a ``docker save`` tar as Docker 20.10 writes it:
    ``<v1id>/layer.tar``, ``<id>.json``, ``manifest.json``, ``repositories``),
    ``oci-dir`` (an OCI layout directory) or ``oci`` (a tar of one) -- the names
    ``layerfs save --format`` uses. ``compression``
    (``gzip``/``zstd``) applies to layer blobs. ``config`` replaces the generated
    config; ``config_args`` go to :func:`image_config`.
    """
    out = Path(out)
    diff_ids = [_sha256(layer) for layer in layers]
    cfg = config if config is not None else image_config(diff_ids, **config_args)
    config_bytes = json.dumps(cfg, separators=(",", ":")).encode()
    image_id = _sha256(config_bytes)
    files: dict[str, bytes] = {}
    blobs: list[str] = []
    if format == "docker":
        parent = ""
        for i, layer in enumerate(layers):
            v1 = hashlib.sha256(f"{parent} {diff_ids[i]}".encode()).hexdigest()
            files[f"{v1}/VERSION"] = b"1.0"
            files[f"{v1}/json"] = json.dumps({"id": v1, **({"parent": parent} if parent
                                                           else {})}).encode()
            files[f"{v1}/layer.tar"] = _compress(layer, compression)
            blobs.append(f"{v1}/layer.tar")
            parent = v1
        files[f"{image_id.split(':')[1]}.json"] = config_bytes
        manifest = [{"Config": f"{image_id.split(':')[1]}.json",
                     "RepoTags": [name] if name else None, "Layers": blobs}]
        files["manifest.json"] = json.dumps(manifest).encode()
        if name:
            repo, _, tag = name.rpartition(":")
            files["repositories"] = json.dumps({repo: {tag: parent}}).encode()
        write_tar(out, files)
    elif format in ("oci", "oci-dir"):
        media = {"none": "application/vnd.oci.image.layer.v1.tar",
                 "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                 "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}[compression]
        descs = []
        for layer in layers:
            blob = _compress(layer, compression)
            digest = _sha256(blob)
            files[f"blobs/sha256/{digest.split(':')[1]}"] = blob
            blobs.append(f"blobs/sha256/{digest.split(':')[1]}")
            descs.append({"mediaType": media, "digest": digest, "size": len(blob)})
        files[f"blobs/sha256/{image_id.split(':')[1]}"] = config_bytes
        manifest_doc = {"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   "digest": image_id, "size": len(config_bytes)},
                        "layers": descs}
        manifest_bytes = json.dumps(manifest_doc).encode()
        m_digest = _sha256(manifest_bytes)
        files[f"blobs/sha256/{m_digest.split(':')[1]}"] = manifest_bytes
        desc: dict[str, Any] = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                "digest": m_digest, "size": len(manifest_bytes)}
        if name:
            desc["annotations"] = {"org.opencontainers.image.ref.name": name}
        files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode()
        files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
        if format == "oci":
            write_tar(out, files)
        else:
            for rel, data in files.items():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(data)
    else:
        raise ValueError(f"unknown format {format!r} (use one of {', '.join(FORMATS)})")
    return BuiltImage(out, image_id, diff_ids, cfg, name, blobs)


def write_tar(out: Path, files: Mapping[str, bytes | memoryview]) -> None:
    """A tar of ``files`` (name -> contents), sorted, each parent directory written once
    before its first entry; everything dated :data:`FIXED_MTIME`. Contents may be
    memoryviews of one big buffer (a benchmark's gigabyte image is never copied whole)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for rel in sorted(files):
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
                    tar.addfile(info)
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(files[rel]), 0o644, FIXED_MTIME
            tar.addfile(info, io.BytesIO(files[rel]))


def _scratch(scratch: str | os.PathLike[str] | None, near: str | os.PathLike[str]) -> Path:
    """Where to build: ``scratch`` (made if missing), else next to ``near``."""
    if scratch is None:
        return Path(near).parent
    Path(scratch).mkdir(parents=True, exist_ok=True)
    return Path(scratch)


def _busybox_layer(scratch: str | os.PathLike[str] | None, near: Path) -> bytes:
    with tempfile.TemporaryDirectory(prefix=".busybox-", dir=_scratch(scratch, near / "x")) as t:
        return busybox_rootfs_tar(Path(t) / "layer.tar", t).read_bytes()


def busybox_image_tar(path: str | os.PathLike[str], scratch: str | os.PathLike[str] | None = None,
                      *, name: str = "busybox:latest", format: str = "docker",
                      cmd: Sequence[str] = ("sh",)) -> BuiltImage:
    """A one-layer busybox image archive (``docker load``/``layerfs load`` take it)."""
    layer = _busybox_layer(scratch, Path(path).parent)
    return build_image(path, [layer], name=name, format=format, cmd=list(cmd),
                       history=["busybox-static rootfs"])


# --- a multi-layer sample with deletions --------------------------------------------------------

#: What the top of :func:`sample_image` contains below /sample (path -> content; None = dir).
SAMPLE_EXPECTED: dict[str, str | None] = {
    "sample": None,
    "sample/keep.txt": "kept\n",
    "sample/changed.txt": "version 2\n",
    "sample/replaced": None,
    "sample/replaced/new.txt": "new\n",
    "sample/dir": None,
    "sample/dir/b.txt": "b\n",
    "sample/tree": None,
    "sample/tree/fresh.txt": "fresh\n",
}
#: Paths that layers 2 and 3 delete; none may be visible at the top.
SAMPLE_DELETED = ["sample/gone.txt", "sample/dir/a.txt", "sample/replaced/old.txt",
                  "sample/tree/sub", "sample/tree/sub/deep.txt", "sample/tree/old.txt"]
#: The Cmd of the sample image and what it prints when run.
SAMPLE_CMD = ["/bin/sh", "-c", "cat /sample/keep.txt /sample/changed.txt; ls /sample/dir; "
              "ls /sample/replaced; ls /sample/tree; test -e /sample/gone.txt || echo gone; "
              "echo \"$GREETING from $(pwd)\""]
SAMPLE_OUTPUT = "kept\nversion 2\nb.txt\nnew.txt\nfresh.txt\ngone\nhello from /sample\n"


def sample_layers(scratch: str | os.PathLike[str] | None = None) -> list[bytes]:
    """busybox, then a layer adding files, then one deleting and re-creating.

    Layer 3 uses both whiteout styles: ``.wh.`` files for single deletions, an
    opaque marker for the directory that is deleted and re-created
    (``sample/replaced``), and per-file whiteouts for ``sample/tree`` (as
    Docker's naive differ and umoci write it).
    """
    base = _busybox_layer(scratch, Path(tempfile.gettempdir()))
    two = (LayerTar().dir("sample").file("sample/keep.txt", "kept\n")
           .file("sample/changed.txt", "version 1\n").file("sample/gone.txt", "bye\n")
           .dir("sample/dir").file("sample/dir/a.txt", "a\n").file("sample/dir/b.txt", "b\n")
           .dir("sample/replaced").file("sample/replaced/old.txt", "old\n")
           .dir("sample/tree").file("sample/tree/old.txt", "old\n").dir("sample/tree/sub")
           .file("sample/tree/sub/deep.txt", "deep\n")).bytes()
    three = (LayerTar().dir("sample").file("sample/changed.txt", "version 2\n")
             .whiteout("sample/gone.txt").dir("sample/dir").whiteout("sample/dir/a.txt")
             .dir("sample/replaced").opaque("sample/replaced")
             .file("sample/replaced/new.txt", "new\n")
             .dir("sample/tree").whiteout("sample/tree/sub").whiteout("sample/tree/old.txt")
             .file("sample/tree/fresh.txt", "fresh\n")).bytes()
    return [base, two, three]


def sample_image(out: str | os.PathLike[str], scratch: str | os.PathLike[str] | None = None, *,
                 name: str | None = "sample:latest", format: str = "docker",
                 compression: str = "none") -> BuiltImage:
    """The three-layer sample as an archive; running it prints :data:`SAMPLE_OUTPUT`."""
    return build_image(out, sample_layers(scratch), name=name, format=format,
                       compression=compression, cmd=SAMPLE_CMD, env=["GREETING=hello"],
                       workdir="/sample",
                       history=["busybox-static rootfs", "add /sample", "delete and replace"])


# --- Debian -----------------------------------------------------------------------------------

def host_debian_suite() -> str:
    """The host's Debian codename (its apt sources are known to reach that suite)."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip('"'):
                return value.strip('"')
    except OSError:
        pass
    return "bookworm"


def debian_rootfs(dest: str | os.PathLike[str], *, suite: str | None = None,
                  mirror: str = "http://deb.debian.org/debian",
                  variant: str = "minbase") -> Path:
    """A minimal Debian root filesystem made by ``debootstrap`` (for labs that want apt).

    Needs the ``debootstrap`` package and the Debian mirror (the only network
    these machines have). ``suite`` defaults to the host's. About 25 s and 200 MB
    for minbase here.
    """
    if shutil.which("debootstrap") is None:
        raise MissingTool("debootstrap is missing: apt-get install debootstrap")
    root = Path(dest)
    suite = suite or host_debian_suite()
    proc = subprocess.run(["debootstrap", f"--variant={variant}", suite, str(root), mirror],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"debootstrap {suite} from {mirror} failed ({proc.returncode}); "
                           f"is the mirror reachable?\n{tail}")
    return root


# --- python -m layerfs.testing.images -------------------------------------------------------------

USAGE_EXAMPLES = """\
examples (as root, with the checkout's venv active: source .venv/bin/activate):
  python -m layerfs.testing.images rootfs-tar rootfs.tar     a busybox root filesystem tar
  python -m layerfs.testing.images busybox busybox.tar       busybox:latest, `docker save` format
  python -m layerfs.testing.images busybox --format oci --name lab/bb:1 bb.oci.tar
  python -m layerfs.testing.images rootfs ./rootfs           the same tree as a directory
  python -m layerfs.testing.images sample sample.tar         three layers with deletions
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Make test images from the command line (nothing is downloaded)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m layerfs.testing.images", epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Images for trying layerfs out, built from Debian's busybox-static: no "
                    "download, same bytes every time.")
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    p = sub.add_parser("rootfs", help="a busybox root filesystem, as a directory")
    p.add_argument("dest", help="directory to fill (made if missing)")
    p = sub.add_parser("rootfs-tar", help="a busybox root filesystem, as a layer tar")
    p.add_argument("dest", help="tar file to write")
    p.add_argument("--scratch", metavar="DIR", help="where to build it (made if missing; "
                   "default: next to the tar)")
    for name, help_ in (("busybox", "a one-layer busybox image archive (Cmd: sh)"),
                        ("sample", "busybox plus two layers that add, delete and re-create")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("dest", help="archive to write (a directory for --format oci-dir)")
        p.add_argument("--format", choices=FORMATS, default="docker",
                       help="docker (`docker save`), oci (an OCI layout in a tar) or oci-dir "
                            "(an OCI layout directory); default: %(default)s")
        p.add_argument("--name", default=f"{name}:latest",
                       help="image name (default: %(default)s)")
        p.add_argument("--scratch", metavar="DIR", help="where to build it (made if missing)")
    args = parser.parse_args(argv)
    try:
        if args.what == "rootfs":
            print(busybox_rootfs(args.dest))
        elif args.what == "rootfs-tar":
            print(busybox_rootfs_tar(args.dest, args.scratch))
        elif args.what == "busybox":
            print(busybox_image_tar(args.dest, args.scratch, name=args.name,
                                    format=args.format).path)
        else:
            print(sample_image(args.dest, args.scratch, name=args.name, format=args.format).path)
    except (MissingTool, OSError, ValueError) as err:
        print(f"python -m layerfs.testing.images: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
