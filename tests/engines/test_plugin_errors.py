"""Bad input and crashes of the Docker graphdriver plugin, on the wire.

The plugin is served on a real unix socket and spoken to over HTTP as dockerd
does (JSON POSTs, a chunked tar upload for ApplyDiff, a streamed tar back from
Diff). Every refusal is HTTP 500 with ``{"Err": "..."}``, the shape Docker's
plugin client turns into the error ``docker`` prints; nothing is left half-made:
a hostile layer tar writes nothing outside the layer, and a server killed in the
middle of an ApplyDiff leaves a layer that the next start removes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from layerfs.engines.docker import start_plugin
from layerfs.layers import LayerStore
from layerfs.testing.images import LayerTar

from .conftest import wipe_root

DRIVER = "overlay2"


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[tuple[httpx.Client, LayerStore]]:
    layers = LayerStore.open(tmp_path / "root", DRIVER)
    server = start_plugin(layers, tmp_path / "plugin.sock")
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "plugin.sock")),
                          base_url="http://plugin", timeout=60)
    try:
        yield client, layers
    finally:
        client.close()
        server.stop()
        layers.close()
        assert wipe_root(tmp_path / "root", DRIVER) == []


def call(client: httpx.Client, method: str, body: Any = None, **kw: Any) -> httpx.Response:
    content = kw.pop("content", None)
    if content is None:
        content = b"" if body is None else json.dumps(body).encode()
    return client.post(f"/{method}", content=content, **kw)


def err(response: httpx.Response) -> str:
    assert response.status_code == 500, (response.status_code, response.text)
    message = response.json()["Err"]
    assert isinstance(message, str) and message and "\n" not in message
    return message


def test_activation_and_a_round_trip(plugin: tuple[httpx.Client, LayerStore]) -> None:
    client, layers = plugin
    assert call(client, "Plugin.Activate").json() == {"Implements": ["GraphDriver"]}
    assert call(client, "GraphDriver.Init", {"Home": "/x", "Opts": [], "UIDMaps": None,
                                             "GIDMaps": None}).json() == {}
    assert call(client, "GraphDriver.Capabilities").json() == \
        {"Capabilities": {"ReproducesExactDiffs": False}}
    assert call(client, "GraphDriver.Create", {"ID": "base"}).json() == {}
    tar = LayerTar().dir("etc").file("etc/hello", "hi\n").bytes()
    # dockerd streams the tar chunked; an iterator body makes httpx do the same.
    chunks = (tar[i:i + 1000] for i in range(0, len(tar), 1000))
    assert call(client, "GraphDriver.ApplyDiff", content=chunks,
                params={"id": "base", "parent": ""}).json() == {"Size": 3}
    assert layers.get("base").readonly  # an image layer: committed in place
    assert call(client, "GraphDriver.CreateReadWrite", {"ID": "box", "Parent": "base"}).json() \
        == {}
    path = Path(call(client, "GraphDriver.Get", {"ID": "box"}).json()["Dir"])
    (path / "etc" / "hello").unlink()
    (path / "new").write_text("x")
    assert call(client, "GraphDriver.Put", {"ID": "box"}).json() == {}
    changes = call(client, "GraphDriver.Changes", {"ID": "box", "Parent": "base"}).json()
    assert changes == {"Changes": [{"Path": "/etc", "Kind": 0}, {"Path": "/etc/hello", "Kind": 2},
                                   {"Path": "/new", "Kind": 1}]}
    diff = call(client, "GraphDriver.Diff", {"ID": "box", "Parent": "base"})
    with tarfile.open(fileobj=io.BytesIO(diff.content)) as t:
        assert sorted(t.getnames()) == ["etc", "etc/.wh.hello", "new"]
    assert call(client, "GraphDriver.DiffSize", {"ID": "box", "Parent": "base"}).json() == \
        {"Size": 1}
    assert call(client, "GraphDriver.Exists", {"ID": "box"}).json() == {"Exists": True}
    status = dict(call(client, "GraphDriver.Status").json()["Status"])
    assert status["Storage Driver"] == DRIVER
    meta = call(client, "GraphDriver.GetMetadata", {"ID": "box"}).json()["Metadata"]
    assert meta["MergedDir"] == str(layers.mnt_dir / "box")
    for layer in ("box", "base", "box"):  # removing twice is fine: Docker retries
        assert call(client, "GraphDriver.Remove", {"ID": layer}).json() == {}
    assert call(client, "GraphDriver.Exists", {"ID": "box"}).json() == {"Exists": False}


def test_bad_requests_get_one_line_errors(plugin: tuple[httpx.Client, LayerStore],
                                          tmp_path: Path) -> None:
    client, layers = plugin
    response = client.post("/GraphDriver.Explode")
    assert response.status_code == 404 and "no plugin method" in response.json()["Err"]
    assert client.get("/GraphDriver.Create").status_code == 404
    assert "not JSON" in err(call(client, "GraphDriver.Create", content=b"{nope"))
    assert "layerfs daemon -s" in err(call(client, "GraphDriver.Init",
                                           {"Home": "/x", "Opts": ["size=1G"]}))
    assert "userns" in err(call(client, "GraphDriver.Init",
                                {"Home": "/x", "UIDMaps": [{"ContainerID": 0, "HostID": 1,
                                                            "Size": 1}]}))
    assert "unknown storage option" in err(call(client, "GraphDriver.Create",
                                                {"ID": "a", "StorageOpt": {"nope": "1"}}))
    assert "not found" in err(call(client, "GraphDriver.Create", {"ID": "a", "Parent": "ghost"}))
    assert "without a layer ID" in err(call(client, "GraphDriver.Get", {}))
    assert "not found" in err(call(client, "GraphDriver.Get", {"ID": "ghost"}))
    assert "invalid layer id" in err(call(client, "GraphDriver.Create", {"ID": "../up"}))
    call(client, "GraphDriver.Create", {"ID": "a"})
    call(client, "GraphDriver.Create", {"ID": "b", "Parent": "a"})
    assert "parent is a, not" in err(call(client, "GraphDriver.Diff", {"ID": "b", "Parent": "x"}))
    # A hostile layer tar: refused, nothing written outside the layer, and the layer is
    # left for Docker to remove (as it does after a failed ApplyDiff).
    outside = tmp_path / "outside"
    evil = tarfile.TarInfo("../../../../../../../../" + str(outside).lstrip("/"))
    data = b"pwned"
    evil.size = len(data)
    hostile = LayerTar().raw(evil, data).bytes()
    call(client, "GraphDriver.Create", {"ID": "evil"})
    message = err(call(client, "GraphDriver.ApplyDiff", content=hostile,
                       params={"id": "evil", "parent": ""}))
    assert "outside" in message or "unsafe" in message.lower() or ".." in message, message
    assert not outside.exists()
    assert layers.exists("evil") and not layers.get("evil").readonly
    for layer in ("evil", "b", "a"):
        call(client, "GraphDriver.Remove", {"ID": layer})


def test_a_kill_mid_apply_diff_leaves_no_half_made_layer(tmp_path: Path) -> None:
    root = tmp_path / "root"
    layers = LayerStore.open(root, DRIVER)
    layers.create(None, layer_id="half")
    layers.close()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from layerfs.layers import LayerStore
        layers = LayerStore.open(sys.argv[1], sys.argv[2])
        with open(sys.argv[3], "rb") as stream:
            layers.apply_diff("half", stream)
    """), str(root), DRIVER, str(fifo)])
    tar = LayerTar()
    for i in range(200):
        tar.file(f"f{i}", b"x" * 65536)
    data = tar.bytes()
    with open(fifo, "wb") as w:
        w.write(data[:len(data) // 2])
        w.flush()
        time.sleep(0.5)  # let the child apply what it got
        child.kill()
        child.wait()
    layers = LayerStore.open(root, DRIVER, recover=False)
    rec = layers.store.get_layer("half")
    assert rec is not None and rec.state == "creating"  # the kill hit mid-apply
    assert not layers.exists("half")                    # ...and it is not visible
    assert any("half" in a for a in layers.recover())
    assert layers.store.get_layer("half") is None and not layers.driver.exists("half")
    layers.close()
    assert wipe_root(root, DRIVER) == []
