"""ContainerSpec validation and the command-line parsers: bad input fails before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfs.errors import InvalidArgument
from layerfs.runtime import (
    ContainerSpec,
    PortMapping,
    Volume,
    parse_env,
    parse_port,
    parse_size,
    parse_user,
    parse_volume,
)
from layerfs.runtime.network import NetworkConfig

ROOT = Path("/tmp/rootfs")


def spec(**kw: object) -> ContainerSpec:
    kw.setdefault("rootfs", ROOT)
    kw.setdefault("argv", ["true"])
    return ContainerSpec(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["99999:80", "80:0", "80", "a:80", "1:2:3:4", "80:80/sctp",
                                  "300.1.1.1:80:80", ":80"])
def test_bad_port_mappings_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="port"):
        parse_port(text)


def test_port_mapping_forms() -> None:
    assert parse_port("8080:80") == PortMapping(8080, 80, "tcp", None)
    assert parse_port("127.0.0.1:53:53/udp") == PortMapping(53, 53, "udp", "127.0.0.1")
    with pytest.raises(InvalidArgument, match="1-65535"):
        PortMapping(99999, 80)


@pytest.mark.parametrize("text", ["relative:/x", "/a", "/a:b", "/a:/b:rx", "/a:/b/../c"])
def test_bad_volumes_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_volume(text)


def test_volume_forms() -> None:
    assert parse_volume("/srv:/data:ro") == Volume(Path("/srv"), "/data", True)
    assert parse_volume("/srv:/data/./x/") == Volume(Path("/srv"), "/data/x", False)
    with pytest.raises(InvalidArgument, match="over the container's /"):
        Volume(Path("/srv"), "/")


def test_sizes_users_env() -> None:
    assert parse_size("64m") == 64 << 20
    assert parse_size("1g") == 1 << 30
    assert parse_size("1.5k") == 1536
    assert parse_size("4096") == 4096
    with pytest.raises(InvalidArgument):
        parse_size("lots")
    assert parse_user("1000") == (1000, 1000)
    assert parse_user("0:5") == (0, 5)
    with pytest.raises(InvalidArgument):
        parse_user("nobody")
    assert parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(InvalidArgument):
        parse_env(["NOVALUE"])


@pytest.mark.parametrize("kw, match", [
    ({"rootfs": "relative/root"}, "rootfs"),
    ({"argv": []}, "argv"),
    ({"argv": "sh -c x"}, "argv"),
    ({"argv": ["a\0b"]}, "argv"),
    ({"cwd": "tmp"}, "working directory"),
    ({"env": {"A=B": "1"}}, "environment"),
    ({"user": (-1, 0)}, "uid"),
    ({"hostname": "bad_host!"}, "hostname"),
    ({"memory": 1024}, "memory"),
    ({"cpus": 0}, "cpus"),
    ({"cpus": 10_000.0}, "cpus"),
    ({"pids_limit": 0}, "pids"),
    ({"network": "overlay"}, "network"),
    ({"ports": [(8080, 80)], "network": "none"}, "bridge"),
    ({"ports": [(8080, 80), (8080, 81)]}, "twice"),
    ({"volumes": [("/a", "/x"), ("/b", "/x")]}, "twice"),
    ({"id": "NOT-HEX"}, "id"),
    ({"name": "-bad"}, "name"),
])
def test_spec_validation(kw: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        spec(**kw)


def test_spec_defaults() -> None:
    s = spec(volumes=[("/srv", "/data", True)], ports=[(8080, 80)])
    assert len(s.id) == 32 and s.hostname == s.id[:12]
    assert s.volumes == (Volume(Path("/srv"), "/data", True),)
    assert s.ports == (PortMapping(8080, 80),)
    env = spec(env={"PATH": "/bin", "X": "1"}).environment()
    assert env["PATH"] == "/bin" and env["X"] == "1" and env["HOME"] == "/root"


@pytest.mark.parametrize("kw", [{"bridge": "a-name-that-is-too-long"}, {"subnet": "10.0.0.0/30"},
                                {"subnet": "not-a-net"}, {"table": "1bad"}])
def test_network_config_validation(kw: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument):
        NetworkConfig(**kw)  # type: ignore[arg-type]
