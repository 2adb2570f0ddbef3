"""References, platforms, ``WWW-Authenticate`` parsing and the credential store: no
registry needed."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from layerfs.distribution import Platform, RemoteReference, parse_challenges
from layerfs.distribution.auth import Credentials, CredentialStore, config_path, registry_host
from layerfs.errors import InvalidArgument

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text,registry,repo,tag,digest,name", [
    ("busybox", "docker.io", "library/busybox", "latest", None, "busybox"),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None, "busybox"),
    ("lab/app", "docker.io", "lab/app", "latest", None, "lab/app"),
    ("docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None, "busybox"),
    ("index.docker.io/lab/app:1", "docker.io", "lab/app", "1", None, "lab/app"),
    ("127.0.0.1:5000/lab/app:v1", "127.0.0.1:5000", "lab/app", "v1", None,
     "127.0.0.1:5000/lab/app"),
    ("localhost/app", "localhost", "app", "latest", None, "localhost/app"),
    ("registry.example.com/a/b/c", "registry.example.com", "a/b/c", "latest", None,
     "registry.example.com/a/b/c"),
    (f"127.0.0.1:5000/app@{DIGEST}", "127.0.0.1:5000", "app", None, DIGEST,
     "127.0.0.1:5000/app"),
    (f"127.0.0.1:5000/app:v2@{DIGEST}", "127.0.0.1:5000", "app", "v2", DIGEST,
     "127.0.0.1:5000/app"),
])
def test_references(text: str, registry: str, repo: str, tag: str | None, digest: str | None,
                    name: str) -> None:
    ref = RemoteReference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest, ref.name) == \
        (registry, repo, tag, digest, name)
    assert ref.reference == (digest or tag)
    assert ref.explicit_registry == (registry != "docker.io" or text.startswith(("docker.io",
                                                                                 "index.")))
    assert ref.local_name == (f"{name}:{tag}" if tag else None)


@pytest.mark.parametrize("text", ["", "Upper/case", "app@sha256:12", "a//b", "host:5000/",
                                  "app:-bad", "app:" + "x" * 200])
def test_bad_references(text: str) -> None:
    with pytest.raises(InvalidArgument):
        RemoteReference.parse(text)


def test_platforms() -> None:
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    assert Platform.parse("linux/amd64").matches({"os": "linux", "architecture": "amd64"})
    assert not Platform.parse("linux/amd64").matches({"os": "linux", "architecture": "arm64"})
    arm = Platform.parse("linux/arm/v7")
    assert arm.matches({"os": "linux", "architecture": "arm", "variant": "v7"})
    assert not arm.matches({"os": "linux", "architecture": "arm", "variant": "v6"})
    assert Platform.parse("linux/arm64/v8").matches({"os": "linux", "architecture": "arm64"})
    assert Platform.parse(None).os == "linux"
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(InvalidArgument):
            Platform.parse(bad)


def test_challenges() -> None:
    assert parse_challenges(['Bearer realm="https://auth.example/token",service="reg",'
                             'scope="repository:a/b:pull,push"']) == [
        ("bearer", {"realm": "https://auth.example/token", "service": "reg",
                    "scope": "repository:a/b:pull,push"})]
    assert parse_challenges(['Basic realm="my \\"registry\\""']) == [
        ("basic", {"realm": 'my "registry"'})]
    assert parse_challenges(['Bearer realm="r", error="insufficient_scope", Basic realm=x']) \
        == [("bearer", {"realm": "r", "error": "insufficient_scope"}),
            ("basic", {"realm": "x"})]
    assert parse_challenges(["Basic", ""]) == [("basic", {})]


def test_credential_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERFS_CONFIG", str(tmp_path / "cfg"))
    assert config_path() == tmp_path / "cfg/config.json"
    monkeypatch.setenv("LAYERFS_CONFIG", str(tmp_path / "elsewhere.json"))
    assert config_path() == tmp_path / "elsewhere.json"
    monkeypatch.delenv("LAYERFS_CONFIG")
    assert config_path() == Path.home() / ".config/layerfs/config.json"

    path = tmp_path / "cfg/config.json"
    path.parent.mkdir()
    # a Docker config: scheme-prefixed keys, Docker Hub's v1 key, keys layerfs ignores
    path.write_text(json.dumps({
        "auths": {"https://127.0.0.1:5000": {"auth": base64.b64encode(b"bob:pa:ss").decode()},
                  "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:h").decode()}},
        "credHelpers": {"gcr.io": "gcloud"}, "psFormat": "table"}))
    store = CredentialStore(path)
    assert store.get("127.0.0.1:5000") == Credentials("bob", "pa:ss")
    assert store.get("http://127.0.0.1:5000/v2/") == Credentials("bob", "pa:ss")
    assert store.get("docker.io") == Credentials("hub", "h")
    assert store.get("registry-1.docker.io") == Credentials("hub", "h")
    assert store.get("127.0.0.1:5001") is None
    assert sorted(store.registries()) == ["127.0.0.1:5000", "docker.io"]

    store.store("127.0.0.1:5000", Credentials("alice", "new-secret"))
    doc = json.loads(path.read_text())
    assert doc["auths"]["127.0.0.1:5000"] == {"auth": base64.b64encode(
        b"alice:new-secret").decode()}
    assert "https://127.0.0.1:5000" not in doc["auths"]
    assert doc["credHelpers"] == {"gcr.io": "gcloud"} and doc["psFormat"] == "table"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.erase("https://127.0.0.1:5000/")
    assert not store.erase("127.0.0.1:5000")
    assert store.get("127.0.0.1:5000") is None

    creds = Credentials("alice", "hunter2", identity_token="tok-123")
    assert "hunter2" not in repr(creds) and "hunter2" not in str(creds)
    assert "tok-123" not in repr(creds)
    assert registry_host("HTTPS://Reg.Example.com:443/v1/") == "reg.example.com:443"

    path.write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        store.get("x")
