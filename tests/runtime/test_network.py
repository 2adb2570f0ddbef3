"""Bridge networking: container to container, published ports, outbound NAT, exact cleanup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.errors import InUse
from layerfs.runtime import PortMapping, RunningContainer, RuntimeConfig, start

from ..host_resources import free_port, free_subnet
from .conftest import Session
from .helpers import nft_rules, run, sh, start_logged, wait_for

HTTPD = "mkdir -p /www/{n} && echo {body} > /www/{n}/index.html && exec httpd -f -p {port} -h /www/{n}"


def http_get(host: str, port: int, path: str = "/", timeout: float = 2) -> str:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode(errors="replace")


def host_ipv4() -> str:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if " lfst" not in line:
            return line.split()[3].split("/")[0]
    raise RuntimeError("no global IPv4 address on this host")


def httpd(rootfs: Path, state: Path, config: RuntimeConfig, body: str, port: int = 8000,
          **kw: object) -> RunningContainer:
    name = os.urandom(4).hex()
    spec = sh(rootfs, HTTPD.format(n=name, body=body, port=port), network="bridge", **kw)
    c, _ = start_logged(spec, state, config)
    return c


@pytest.fixture
def containers() -> Iterator[list[RunningContainer]]:
    started: list[RunningContainer] = []
    yield started
    for c in started:
        c.kill(9)
        c.wait()


def test_two_containers_talk_over_the_bridge(rootfs: Path, state: Path, lfs: Session,
                                             config: RuntimeConfig,
                                             containers: list[RunningContainer]) -> None:
    a = httpd(rootfs, state, config, "hello-from-a")
    containers.append(a)
    assert a.address and a.address.startswith(lfs.net.subnet.rsplit(".", 1)[0])
    script = (f"for i in $(seq 50); do wget -q -O - http://{a.address}:8000/ && break; "
              f"sleep 0.1; done; ls /sys/class/net | tr '\\n' ' '; echo; ip route")
    status, out = run(sh(rootfs, script, network="bridge"), state, config)
    assert status.code == 0, out
    lines = out.splitlines()
    assert lines[0] == "hello-from-a"
    assert lines[1].split() == ["eth0", "lo"]
    assert f"default via {lfs.net.gateway} dev eth0" in out


def test_published_port_answers_from_the_host(rootfs: Path, state: Path, lfs: Session,
                                              config: RuntimeConfig,
                                              containers: list[RunningContainer]) -> None:
    port = free_port()
    c = httpd(rootfs, state, config, "published", ports=[PortMapping(port, 8000)])
    containers.append(c)
    wait_for(lambda: _answers("127.0.0.1", port), what="httpd on 127.0.0.1")
    assert "published" in http_get("127.0.0.1", port)          # host loopback (OUTPUT DNAT)
    assert "published" in http_get(host_ipv4(), port)          # host address
    rules = nft_rules(lfs.net.table)
    assert rules.count(f"layerfs:{c.id}") == 4, rules
    # Only the bridge allows 127/8 to be routed; the host-wide setting is left alone.
    assert Path(f"/proc/sys/net/ipv4/conf/{lfs.net.bridge}/route_localnet").read_text() == "1\n"


def test_port_bound_to_one_host_address(rootfs: Path, state: Path, config: RuntimeConfig,
                                        containers: list[RunningContainer]) -> None:
    port = free_port()
    c = httpd(rootfs, state, config, "loopback-only",
              ports=[PortMapping(port, 8000, host_ip="127.0.0.1")])
    containers.append(c)
    wait_for(lambda: _answers("127.0.0.1", port), what="httpd on 127.0.0.1")
    with pytest.raises(ConnectionRefusedError):
        http_get(host_ipv4(), port)


def test_host_port_conflict_is_refused_and_leaves_nothing(
        rootfs: Path, state: Path, config: RuntimeConfig,
        containers: list[RunningContainer]) -> None:
    port = free_port()
    first = httpd(rootfs, state, config, "first", ports=[PortMapping(port, 8000)])
    containers.append(first)
    spec = sh(rootfs, "true", network="bridge", ports=[PortMapping(port, 80)])
    with pytest.raises(InUse, match=str(port)):
        start(spec, state, config)
    assert not (state / "containers" / spec.id).exists()


def test_rules_removed_by_handle_and_others_kept(rootfs: Path, state: Path, lfs: Session,
                                                 config: RuntimeConfig) -> None:
    port = free_port()
    # A rule that is not ours, in our table, with a similar comment: it must survive.
    added = subprocess.run(
        ["nft", "-e", "-a", "add", "rule", "ip", lfs.net.table, "postrouting", "ip", "saddr",
         "192.0.2.250", "masquerade", "comment", '"layerfs:not-a-container"'],
        capture_output=True, text=True)
    if added.returncode != 0:  # the table is created with the bridge, on first use
        run(sh(rootfs, "true", network="bridge"), state, config)
        added = subprocess.run(
            ["nft", "-e", "-a", "add", "rule", "ip", lfs.net.table, "postrouting", "ip",
             "saddr", "192.0.2.250", "masquerade", "comment", '"layerfs:not-a-container"'],
            capture_output=True, text=True, check=True)
    handle = added.stdout.strip().rsplit("handle", 1)[1].strip()
    try:
        status, _ = run(sh(rootfs, "true", network="bridge", ports=[PortMapping(port, 80)]),
                        state, config)
        assert status.code == 0
        rules = nft_rules(lfs.net.table)
        assert "layerfs:not-a-container" in rules
        assert rules.count("comment") == 1, rules
    finally:
        subprocess.run(["nft", "delete", "rule", "ip", lfs.net.table, "postrouting", "handle",
                        handle], check=True)


def test_addresses_are_released_and_reused(rootfs: Path, state: Path,
                                           config: RuntimeConfig) -> None:
    forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    first = start(sh(rootfs, "true", network="bridge"), state, config)
    address = first.address
    first.wait()
    second = start(sh(rootfs, "true", network="bridge"), state, config)
    assert second.address == address
    second.wait()
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forward_before


def test_concurrent_starts_from_threads(rootfs: Path, state: Path, config: RuntimeConfig,
                                        containers: list[RunningContainer]) -> None:
    # Namespaces are switched per thread (ForkInto), leases are sqlite transactions:
    # eight threads starting at once must get eight running containers, eight addresses.
    errors: list[BaseException] = []

    def one() -> None:
        try:
            c, _ = start_logged(sh(rootfs, "sleep 30", network="bridge"), state, config)
            containers.append(c)
        except BaseException as err:
            errors.append(err)

    before = {k: os.readlink(f"/proc/thread-self/ns/{k}") for k in ("net", "pid_for_children")}
    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({c.address for c in containers}) == 8
    for c in containers:
        with open(f"/proc/{c.pid}/net/dev") as f:  # the container's netns, seen from here
            devices = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
        assert devices == ["eth0", "lo"]
    # and the runner's own namespaces are untouched
    assert before == {k: os.readlink(f"/proc/thread-self/ns/{k}") for k in before}


@pytest.fixture
def outside(lfs: Session) -> Iterator[tuple[str, str, str]]:
    """A network namespace standing for "the internet", routed from the host over a /30.

    Returns (netns name, host-side address, outside address). Forwarding is enabled
    on the host-side interface only (replies to masqueraded traffic enter there).
    """
    ns, host_if, out_if = f"{lfs.tag}o", f"{lfs.tag}h", f"{lfs.tag}x"
    prefix = free_subnet().rsplit(".", 1)[0]
    host_ip, out_ip = f"{prefix}.1", f"{prefix}.2"
    cmds = [["ip", "netns", "add", ns],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", out_if, "netns", ns],
            ["ip", "addr", "add", f"{host_ip}/30", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "-n", ns, "addr", "add", f"{out_ip}/30", "dev", out_if],
            ["ip", "-n", ns, "link", "set", out_if, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"]]
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True)
        Path(f"/proc/sys/net/ipv4/conf/{host_if}/forwarding").write_text("1")
        yield ns, host_ip, out_ip
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if os.path.exists(f"/sys/class/net/{host_if}"):
            subprocess.run(["ip", "link", "del", host_if], capture_output=True)


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(1); print("listening", flush=True)
s.settimeout(20)
conn, peer = s.accept(); conn.sendall(("peer=" + peer[0] + "\\n").encode()); conn.close()
"""


def test_outbound_traffic_is_masqueraded(rootfs: Path, state: Path, lfs: Session,
                                         config: RuntimeConfig,
                                         outside: tuple[str, str, str]) -> None:
    ns, host_ip, out_ip = outside
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, out_ip],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline() == "listening\n"
        status, out = run(sh(rootfs, f"nc {out_ip} 9000 </dev/null; hostname -i",
                             network="bridge"), state, config)
        assert status.code == 0, out
        peer, own = out.split()[:2]
        assert own.startswith(lfs.net.subnet.rsplit(".", 1)[0]), out
        assert peer == f"peer={host_ip}", out   # the outside saw the host, not the container
    finally:
        server.kill()
        server.wait()


def _answers(host: str, port: int) -> bool:
    try:
        return "HTTP" in http_get(host, port, timeout=0.5)
    except OSError:
        return False
