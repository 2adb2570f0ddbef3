"""Authentication and TLS against real registries:

* Distribution with htpasswd (bcrypt) basic auth behind TLS from a test CA: ``--ca``,
  ``--insecure`` for that host only, ``login``/``logout`` through the CLI with the
  password on stdin, credentials stored Docker-style with mode 0600 and never printed;
* Distribution with ``auth: token``: bearer tokens from an in-test token server (RS256
  JWTs signed by a certificate of the test CA, verified by the registry through its
  ``rootcertbundle``), scopes per operation, cross-repository mounts needing two scopes.
"""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from layerfs.distribution import (
    RegistryError,
    RegistryOptions,
    Unauthorized,
    login,
    pull,
    push,
)
from layerfs.distribution.auth import Credentials, CredentialStore
from layerfs.images import ImageStore
from layerfs.testing import images as timg
from tests.support.registry import Distribution, TestCA, TokenServer

from ..daemons import CliMode
from ..images.conftest import close_images, run_image
from .conftest import PASSWORD, USER, Samples, layerfs, open_overlay2


def test_basic_auth_over_tls(images: ImageStore, tmp_path: Path, config_dir: Path,
                             basic_registry: Distribution, test_ca: TestCA,
                             samples: Samples, cli_mode: CliMode) -> None:
    host, ca = basic_registry.host, str(test_ca.cert)
    images.load(samples.sample.path)
    name = f"{host}/secure-{cli_mode.name}/sample:1"   # each mode pushes anew

    with pytest.raises(Unauthorized, match=rf"unauthorized \(HTTP 401\).*layerfs login {host}"):
        push(images, "sample", name, options=RegistryOptions(ca=ca))
    with pytest.raises(RegistryError, match=rf"^{host}: TLS certificate not trusted \(unable "
                                            r"to get local issuer certificate\): pass --ca FILE"):
        pull(images, name)

    # login: a wrong password is refused and nothing is stored
    root = tmp_path / "cli"
    wrong = layerfs(root, "login", "-u", USER, "--password-stdin", "--ca", ca, host,
                    input=b"not-the-password\n", check=False)
    assert wrong.returncode == 1 and "unauthorized" in wrong.stderr
    assert not (config_dir / "config.json").exists()

    ok = layerfs(root, "login", "-u", USER, "--password-stdin", "--ca", ca, host,
                 input=f"{PASSWORD}\n".encode())
    assert ok.stdout == "Login Succeeded\n"
    assert PASSWORD not in ok.stdout + ok.stderr
    config = config_dir / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config_dir.stat().st_mode) == 0o700
    doc = json.loads(config.read_text())
    assert doc == {"auths": {host: {"auth": base64.b64encode(
        f"{USER}:{PASSWORD}".encode()).decode()}}}

    # push and pull with the stored credentials, through the CLI
    layerfs(root, "load", "-q", "-i", str(samples.sample.path))
    pushed = layerfs(root, "push", "--ca", ca, "sample", name)
    assert pushed.stdout.count(": Pushed") == 3 and PASSWORD not in pushed.stdout
    other = tmp_path / "other"
    assert layerfs(other, "pull", "-q", "--ca", ca, name).stdout == samples.sample.id + "\n"

    # --insecure: no certificate check, for this host only
    result = pull(images, name, options=RegistryOptions(insecure=True))
    assert result.image.id == samples.sample.id
    assert run_image(images, name) == timg.SAMPLE_OUTPUT

    out = layerfs(root, "logout", host)
    assert out.stdout == f"Removing login credentials for {host}\n"
    assert json.loads(config.read_text()) == {"auths": {}}
    assert layerfs(root, "logout", host).stdout == f"Not logged in to {host}\n"
    with pytest.raises(Unauthorized):
        pull(images, name, options=RegistryOptions(ca=ca))


@pytest.mark.usefixtures("cli_mode")
def test_cli_login_needs_a_password_source(tmp_path: Path, basic_registry: Distribution,
                                           test_ca: TestCA) -> None:
    failed = layerfs(tmp_path / "root", "login", "--password-stdin", "--ca", str(test_ca.cert),
                     basic_registry.host, input=b"x\n", check=False)
    assert failed.returncode == 1 and "-u USER" in failed.stderr


def test_token_auth(images: ImageStore, tmp_path: Path, token_registry: Distribution,
                    token_server: TokenServer, test_ca: TestCA, samples: Samples) -> None:
    host, ca = token_registry.host, str(test_ca.cert)
    images.load(samples.sample.path)
    name = f"{host}/tok/sample:1"
    store = CredentialStore()

    # anonymous: the token server grants nothing, the registry refuses
    with pytest.raises(Unauthorized, match=r"unauthorized \(HTTP 401\)"):
        push(images, "sample", name, options=RegistryOptions(ca=ca))
    # a wrong password: the token service refuses
    with pytest.raises(Unauthorized, match=r"the token service https://127\.0\.0\.1:\d+/token "
                                           r"refused the credentials \(HTTP 401\)"):
        login(host, Credentials(USER, "wrong"), options=RegistryOptions(ca=ca))
    assert store.get(host) is None
    login(host, Credentials(USER, PASSWORD), options=RegistryOptions(ca=ca))
    assert store.get(host) == Credentials(USER, PASSWORD)

    token_server.requests.clear()
    pushed = push(images, "sample", name, options=RegistryOptions(ca=ca))
    assert len(pushed.uploaded) == 4
    asked = [(r.user, r.scopes) for r in token_server.requests]
    assert asked == [(USER, ["repository:tok/sample:pull,push"])], \
        "one token for the whole push, fetched up front after the first challenge"

    other = open_overlay2(tmp_path / "other")
    try:
        result = pull(other, name, options=RegistryOptions(ca=ca))
        assert result.image.id == samples.sample.id
        assert run_image(other, name) == timg.SAMPLE_OUTPUT
    finally:
        close_images(other)

    # a push to another repository mounts from the first: one token for both scopes
    token_server.requests.clear()
    mounted = push(images, "sample", f"{host}/tok/copy:1", options=RegistryOptions(ca=ca))
    assert sorted(mounted.mounted) == sorted(pushed.uploaded)
    scopes = {s for r in token_server.requests for s in r.scopes}
    assert scopes == {"repository:tok/copy:pull,push", "repository:tok/sample:pull"}
    granted = token_server.requests[-1].granted
    assert {g["name"] for g in granted} == {"tok/copy", "tok/sample"}
