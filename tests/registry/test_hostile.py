"""A registry that attacks its client (issue 20, items 5-7 and 9): endless bodies, answers
sent a byte at a time, redirect loops, and a token realm that fishes for the password.

Each case runs ``layerfs pull`` in a child with its address space capped at 512 MiB and
checks it fails in one line, within seconds, and leaves no image behind. The registry is
:class:`HostileRegistry`, a scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from layerfs import oci
from layerfs.digests import sha256_digest
from layerfs.distribution import Credentials, CredentialStore
from layerfs.testing import images as timg
from tests.support.registry import HostileRegistry, Route, TestCA, drip, endless, reply, sip

MEMORY = 512 << 20
USER, PASSWORD = "alice", "hostile-realm-7f3a"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def pull_cli(root: Path, ref: str, *args: str, timeout: float = 90
             ) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                           "vfs", "pull", *args, ref], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limit_memory,
                          env=dict(os.environ, COLUMNS="5000"))
    return proc, time.monotonic() - start


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("layerfs: error: "), proc.stderr[-3000:]
    for word in words:
        assert word in lines[0]
    return lines[0]


def assert_no_image(root: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                           "vfs", "images", "-q"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


# --- a small valid image the routes can serve -----------------------------------------------

class Image:
    def __init__(self, layer: bytes | None = None) -> None:
        self.layer = layer or timg.LayerTar().file("hello", b"hi\n").bytes()
        self.layer_digest = sha256_digest(self.layer)
        self.config = json.dumps({"architecture": "amd64", "os": "linux",
                                  "rootfs": {"type": "layers",
                                             "diff_ids": [self.layer_digest]}}).encode()
        self.config_digest = sha256_digest(self.config)
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": oci.MT_OCI_MANIFEST,
            "config": {"mediaType": oci.MT_OCI_CONFIG, "digest": self.config_digest,
                       "size": len(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": self.layer_digest, "size": len(self.layer)}]}).encode()

    def routes(self, **override: Route) -> dict[str, Route]:
        """Ping, manifest, config and layer, each replaceable (``manifest=``, ``config=``,
        ``layer=``, ``ping=``)."""
        served = {
            "ping": lambda h: reply(h, 200, b"{}"),
            "manifest": lambda h: reply(h, 200, self.manifest,
                                        {"Content-Type": oci.MT_OCI_MANIFEST}),
            "config": lambda h: reply(h, 200, self.config),
            "layer": lambda h: reply(h, 200, self.layer),
        }
        served.update(override)
        return {r"^/v2/$": served["ping"], r"/manifests/": served["manifest"],
                rf"/blobs/{self.config_digest}$": served["config"],
                rf"/blobs/{self.layer_digest}$": served["layer"]}


@pytest.fixture(scope="module")
def image() -> Image:
    return Image()


def test_the_scripted_image_pulls(tmp_path: Path, image: Image) -> None:
    """The routes serve a good image: what the cases below break is the only fault."""
    with HostileRegistry(image.routes()) as reg:
        proc, _ = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", "--insecure", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == image.config_digest


# --- item 5: unbounded bodies -------------------------------------------------------------

@pytest.mark.parametrize("part", ["manifest", "config", "error", "ping", "token"])
def test_an_endless_body_stops_at_its_cap(tmp_path: Path, image: Image, part: str) -> None:
    token_route = endless()
    override: dict[str, Route] = {
        "manifest": {"manifest": endless(content_type=oci.MT_OCI_MANIFEST)},
        "config": {"config": endless()},
        "error": {"manifest": endless(status=404)},
        "ping": {"ping": endless()},
        "token": {},
    }[part]
    reg = HostileRegistry(image.routes(**override))
    if part == "token":
        def challenge(h: object) -> None:
            reply(h, 401, b"{}", {"WWW-Authenticate":  # type: ignore[arg-type]
                                  f'Bearer realm="{reg.url}/token",service="x"'})
        reg.routes.update({r"^/v2/$": challenge, r"/manifests/": challenge,
                           r"^/token$": token_route})
    with reg:
        proc, took = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", "--insecure")
    assert took < 30
    if part == "ping":
        # Nothing in the answer to /v2/ is used: read up to the cap, then dropped.
        assert proc.returncode == 0, proc.stderr
        return
    if part == "error":
        # The error body is cut and not shown; the status still is.
        assert_one_line_failure(proc, "not found (HTTP 404)")
    else:
        assert_one_line_failure(proc, "-byte limit")
    assert_no_image(tmp_path / "root")


def test_a_manifest_nested_too_deep_is_one_line(tmp_path: Path, image: Image) -> None:
    """200 KB, under the size cap: json's decoder recursed until RecursionError."""
    deep = b"[" * 100_000 + b"]" * 100_000
    with HostileRegistry(image.routes(manifest=lambda h: reply(h, 200, deep))) as reg:
        proc, _ = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", "--insecure")
    assert_one_line_failure(proc, "nested too deep")


# --- item 6: slow drip --------------------------------------------------------------------

def test_a_manifest_dripped_a_byte_at_a_time_hits_the_deadline(tmp_path: Path,
                                                                 image: Image) -> None:
    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: " + oci.MT_OCI_MANIFEST.encode() +
           b"\r\nContent-Length: %d\r\n\r\n" % len(image.manifest) + image.manifest)
    with HostileRegistry(image.routes(manifest=drip(raw, 0.2))) as reg:
        proc, took = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", "--insecure",
                              "--max-time", "3")
    assert_one_line_failure(proc, "no complete answer within 3 s")
    assert took < 20
    assert_no_image(tmp_path / "root")


def test_a_drip_in_the_headers_hits_the_deadline(tmp_path: Path, image: Image) -> None:
    with HostileRegistry(image.routes(manifest=drip(b"HTTP/1.1 200 OK\r\nX-Slow: " +
                                                    b"a" * 1000, 0.2))) as reg:
        proc, took = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", "--insecure",
                              "--max-time", "3")
    assert_one_line_failure(proc, "no complete answer within 3 s")
    assert took < 20


def test_a_blob_slower_than_the_speed_limit_fails(tmp_path: Path, image: Image) -> None:
    raw = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(image.layer) + image.layer)
    with HostileRegistry(image.routes(layer=drip(raw, 0.05))) as reg:
        proc, took = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", "--insecure",
                              "--speed-limit", "1000", "--speed-time", "2")
    assert_one_line_failure(proc, "slower than 1000 bytes/s for 2 s",
                            "the partial download is removed")
    assert took < 30
    assert_no_image(tmp_path / "root")
    assert _staged(tmp_path / "root") == [], "a partial blob was kept without --resume"


def test_an_upload_read_slower_than_the_speed_limit_fails(tmp_path: Path) -> None:
    """A registry that takes a pushed layer 1 KiB per 0.1 s: the upload fails at the
    speed limit, as a download does (the layer is bigger than the loopback socket buffers,
    so the client's writes do block)."""
    big = Image(timg.LayerTar().file("big", os.urandom(24 << 20)).bytes())
    archive = timg.build_image(tmp_path / "big.tar", [big.layer], name="big:1", cmd=["sh"])
    root = tmp_path / "root"
    assert _cli(root, "load", "-q", "-i", str(archive.path)).returncode == 0
    routes: dict[str, Route] = {
        r"^/v2/$": lambda h: reply(h, 200, b"{}"),
        r"/blobs/uploads/$": lambda h: reply(h, 202, b"", {"Location": h.path + "u1"}),
        r"/blobs/uploads/u1$": lambda h: (sip(0.1) if h.command == "PATCH" else
                                          lambda h: reply(h, 201))(h),
    }
    with HostileRegistry(routes) as reg:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root),
                               "--driver", "vfs", "push", "--insecure", "--compression", "none",
                               "--speed-limit", "100000", "--speed-time", "2", "big:1",
                               f"{reg.host}/lab/big:1"], capture_output=True, text=True,
                              timeout=60, preexec_fn=_limit_memory,
                              env=dict(os.environ, COLUMNS="5000"))
        took = time.monotonic() - start
    assert_one_line_failure(proc, "upload of", "slower than 100000 bytes/s for 2 s")
    assert took < 20
    # Final, as a slow download is: no second attempt at the same pace (the config's
    # small upload is the other PATCH).
    assert sum(r.method == "PATCH" for r in reg.seen) <= 2


def test_an_upload_never_answered_hits_the_deadline(tmp_path: Path, image: Image) -> None:
    """The registry takes the whole upload, then drips its answer: the answer has the
    request deadline (--max-time) as any other answer has."""
    archive = timg.build_image(tmp_path / "app.tar", [image.layer], name="app:1", cmd=["sh"])
    root = tmp_path / "root"
    assert _cli(root, "load", "-q", "-i", str(archive.path)).returncode == 0

    def take_then_drip(h: Any) -> None:
        h.rfile.read(int(h.headers.get("Content-Length") or 0))
        drip(b"HTTP/1.1 202 Accepted\r\n", 0.2)(h)

    routes: dict[str, Route] = {
        r"^/v2/$": lambda h: reply(h, 200, b"{}"),
        r"/blobs/uploads/$": lambda h: reply(h, 202, b"", {"Location": h.path + "u1"}),
        r"/blobs/uploads/u1$": take_then_drip,
    }
    with HostileRegistry(routes) as reg:
        start = time.monotonic()
        proc = _cli(root, "push", "--insecure", "--max-time", "3", "app:1",
                    f"{reg.host}/lab/app:1")
        took = time.monotonic() - start
    assert_one_line_failure(proc, "upload of", "no complete answer within 3 s")
    assert took < 20


# --- item 9: redirect loops -----------------------------------------------------------------

@pytest.mark.parametrize("part", ["manifest", "layer"])
def test_a_redirect_loop_is_one_line(tmp_path: Path, image: Image, part: str) -> None:
    def loop(h: object) -> None:
        reply(h, 302, b"", {"Location": h.path})  # type: ignore[arg-type,attr-defined]

    with HostileRegistry(image.routes(**{part: loop})) as reg:
        proc, _ = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", "--insecure")
    assert_one_line_failure(proc, "too many redirects")
    assert_no_image(tmp_path / "root")


# --- item 7: credentials --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def token_catcher() -> Iterator[HostileRegistry]:
    """A plain-HTTP 'token service' that records what it is sent and grants nothing."""
    with HostileRegistry({r"^/token": lambda h: reply(h, 401, b"{}")}) as catcher:
        yield catcher


def _fishing_registry(realm: str, *, tls: TestCA | None) -> HostileRegistry:
    def challenge(h: object) -> None:
        reply(h, 401, b"{}", {"WWW-Authenticate":  # type: ignore[arg-type]
                              f'Bearer realm="{realm}",service="x"'})
    return HostileRegistry({r"^/v2/": challenge},
                           tls=tls.issue("fishing") if tls is not None else None)


def _basic_sent(reg: HostileRegistry) -> list[str]:
    return [r.headers.get("Authorization", "") for r in reg.seen
            if r.headers.get("Authorization", "").startswith("Basic ")]


@pytest.mark.parametrize("scheme", ["https", "http-insecure"])
def test_no_password_to_a_plain_http_realm_on_another_host(
        tmp_path: Path, config_dir: Path, ca: TestCA, token_catcher: HostileRegistry,
        scheme: str) -> None:
    """A TLS registry (or a plain one marked insecure) names a plain-HTTP realm at another
    port: the stored password must not go there (it did, in cleartext Basic auth)."""
    tls = ca if scheme == "https" else None
    with _fishing_registry(f"{token_catcher.url}/token", tls=tls) as reg:
        CredentialStore(config_dir / "config.json").store(reg.host,
                                                          Credentials(USER, PASSWORD))
        args = ["--ca", str(ca.cert)] if tls else ["--insecure"]
        proc, _ = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", *args)
    assert proc.returncode == 1
    assert token_catcher.seen, "the realm was not asked at all: the test proves nothing"
    assert _basic_sent(token_catcher) == []
    assert PASSWORD not in proc.stderr
    assert "not sending the credentials" in proc.stderr
    assert "withheld" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_password_goes_to_a_plain_http_realm_on_the_insecure_host_itself(
        tmp_path: Path, config_dir: Path) -> None:
    """The user marked the host insecure: its own realm, over plain HTTP, gets them."""
    reg = HostileRegistry()
    def challenge(h: object) -> None:
        reply(h, 401, b"{}", {"WWW-Authenticate":  # type: ignore[arg-type]
                              f'Bearer realm="{reg.url}/token",service="x"'})
    reg.routes = {r"^/token": lambda h: reply(h, 401, b"{}"), r"^/v2/": challenge}
    with reg:
        CredentialStore(config_dir / "config.json").store(reg.host,
                                                          Credentials(USER, PASSWORD))
        proc, _ = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", "--insecure")
    assert proc.returncode == 1
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert expected in _basic_sent(reg)


# --- item 8: a full disk ------------------------------------------------------------------

def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                           "vfs", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="5000"))


def _staged(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith((".partial", ".lock")) or
                  ("registry-blobs" in p.parts and p.is_file()))


def _fill(path: Path, leave: int) -> None:
    """Write zeros into ``path`` until only ``leave`` bytes stay free (0: none at all)."""
    st = os.statvfs(path.parent)
    room = st.f_bavail * st.f_frsize - leave
    with open(path, "wb") as f:
        try:
            while room > 0:
                room -= f.write(bytes(min(room, 1 << 20)))
                f.flush()
        except OSError:
            pass


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs, unmounted afterwards (by its exact path)."""
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "lfs-test-small-disk",
                    str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_is_one_line_and_listings_still_work(small_disk: Path,
                                                          tmp_path: Path) -> None:
    root = small_disk / "root"
    small = Image()
    archive = timg.build_image(tmp_path / "small.tar", [small.layer], name="small:1",
                               cmd=["sh"])
    assert _cli(root, "load", "-q", "-i", str(archive.path)).returncode == 0
    # A layer twice the free space left: the download runs into ENOSPC.
    big = Image(timg.LayerTar().file("big", os.urandom(8 << 20)).bytes())
    _fill(small_disk / "filler", leave=4 << 20)
    with HostileRegistry(big.routes()) as reg:
        proc, _ = pull_cli(root, f"{reg.host}/lab/big:1", "--insecure")
    assert _staged(root) == [], "the failed pull kept files that hold the space"
    assert_one_line_failure(proc, "no space left")

    # Now nothing at all is free: read-only commands list, writes fail in one line.
    _fill(small_disk / "filler2", leave=0)
    for args in (["layer", "ls"], ["images"]):
        proc = _cli(root, *args)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    assert "small" in _cli(root, "images").stdout
    for args in (["layer", "create"], ["load", "-q", "-i", str(archive.path)]):
        assert_one_line_failure(_cli(root, *args), "no space left")
    (small_disk / "filler2").unlink()
    (small_disk / "filler").unlink()
    assert _cli(root, "layer", "create").returncode == 0


def test_a_digest_mismatch_leaves_no_staged_file(tmp_path: Path, image: Image) -> None:
    wrong = bytearray(image.layer)
    wrong[600] ^= 0xFF
    with HostileRegistry(image.routes(layer=lambda h: reply(h, 200, bytes(wrong)))) as reg:
        proc, _ = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", "--insecure")
    assert_one_line_failure(proc, "digest mismatch")
    assert _staged(tmp_path / "root") == []


def test_an_https_realm_on_another_host_gets_the_password_with_a_warning(
        tmp_path: Path, config_dir: Path, ca: TestCA) -> None:
    """Docker Hub's layout (registry and token service on two hosts, both HTTPS) keeps
    working; the user is told where the password went."""
    tls_catcher = HostileRegistry({r"^/token": lambda h: reply(h, 401, b"{}")},
                                  tls=ca.issue("tls-catcher"))
    with tls_catcher, _fishing_registry(f"{tls_catcher.url}/token", tls=ca) as reg:
        CredentialStore(config_dir / "config.json").store(reg.host,
                                                          Credentials(USER, PASSWORD))
        proc, _ = pull_cli(tmp_path / "root", f"{reg.host}/lab/app:1", "--ca", str(ca.cert))
    assert proc.returncode == 1
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert expected in _basic_sent(tls_catcher)
    assert f"token service on another host, {tls_catcher.host} (HTTPS)" in proc.stderr
    assert PASSWORD not in proc.stderr
