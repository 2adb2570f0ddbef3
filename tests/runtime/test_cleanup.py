"""Crash recovery: a runner killed with SIGKILL leaves a record that names exactly what to undo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerfs.errors import NotFound
from layerfs.runtime import (
    ContainerSpec,
    PortMapping,
    RuntimeConfig,
    cleanup_stale,
    inspect,
    list_containers,
)
from layerfs.runtime.cgroups import Cgroup, Limits
from layerfs.runtime.network import Ipam, ensure_bridge, link_exists, veth_name
from layerfs.runtime.state import write_record

from ..host_resources import free_port
from .conftest import Session
from .helpers import nft_rules, run, sh, wait_for

RUNNER = """
import json, sys, time
from pathlib import Path
from layerfs.runtime import ContainerSpec, PortMapping, RuntimeConfig, start
from layerfs.runtime.network import NetworkConfig
a = json.loads(sys.argv[1])
cfg = RuntimeConfig(cgroup_parent=a["parent"], network=NetworkConfig(**a["net"]),
                    die_with_runner=a["die"])
spec = ContainerSpec(rootfs=Path(a["rootfs"]), argv=["sleep", "60"], network="bridge",
                     ports=[PortMapping(a["port"], 80)], memory=64 << 20, pids_limit=50)
c = start(spec, a["state"], cfg)
print(json.dumps({"id": spec.id, "pid": c.pid}), flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def start_runner(lfs: Session, state: Path, die: bool) -> tuple[subprocess.Popen[str], str, int]:
    args = {"parent": lfs.cgroup_parent, "net": lfs.net.to_record(), "die": die,
            "rootfs": str(lfs.rootfs), "port": free_port(), "state": str(state)}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(args)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "runner failed to start the container"
    info = json.loads(line)
    return proc, info["id"], info["pid"]


def assert_all_gone(lfs: Session, state: Path, cid: str) -> None:
    for d in lfs.cgroup_dirs():
        assert not (d / cid).exists(), d / cid
    assert not link_exists(veth_name(cid))
    assert cid not in nft_rules(lfs.net.table)
    with Ipam(state) as ipam:
        assert ipam.leases() == [] and ipam.ports() == []


def test_kill_9_of_the_runner_then_cleanup(lfs: Session, state: Path) -> None:
    runner, cid, pid = start_runner(lfs, state, die=True)
    assert alive(pid) and link_exists(veth_name(cid))
    assert f"layerfs:{cid}" in nft_rules(lfs.net.table)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    # PR_SET_PDEATHSIG: the container dies with its runner ...
    wait_for(lambda: not alive(pid), what="container to die with its runner")
    assert inspect(state, cid).status == "dead"
    # ... but its cgroup, veth, rules and leases stay until someone cleans up.
    assert any((d / cid).exists() for d in lfs.cgroup_dirs())
    assert cleanup_stale(state) == [cid]
    assert_all_gone(lfs, state, cid)
    info = inspect(state, cid)
    assert info.status == "exited" and "runner died" in info.exit["reason"]  # type: ignore[index]
    assert cleanup_stale(state) == []


def test_next_start_cleans_a_container_that_outlived_its_runner(lfs: Session,
                                                                 state: Path) -> None:
    runner, cid, pid = start_runner(lfs, state, die=False)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    time.sleep(0.2)
    assert alive(pid)  # not tied to the runner: it keeps running, unmanaged
    config = lfs.config()
    status, out = run(sh(lfs.rootfs, "echo fresh"), state, config)  # start() cleans first
    assert status.code == 0 and out == "fresh\n"
    assert not alive(pid)
    assert_all_gone(lfs, state, cid)
    assert {i.id: i.status for i in list_containers(state)}[cid] == "exited"


def test_cleanup_of_a_half_made_container(lfs: Session, state: Path,
                                          config: RuntimeConfig) -> None:
    # A runner killed in the middle of start(): the record says "creating", the cgroup
    # and a lease exist, and one nft rule was added but its handle never recorded.
    cid = os.urandom(16).hex()
    cdir = state / "containers" / cid
    cdir.mkdir(parents=True)
    (cdir / "lock").touch()
    cg = Cgroup.create(cid, Limits(pids=10), parent=lfs.cgroup_parent)
    ensure_bridge(lfs.net, state)
    with Ipam(state) as ipam:
        address = ipam.allocate(lfs.net, cid)
    subprocess.run(["nft", "add", "rule", "ip", lfs.net.table, "postrouting", "ip", "saddr",
                    address, "masquerade", "comment", f'"layerfs:{cid}"'], check=True)
    record = {"id": cid, "status": "creating", "created": time.time(), "argv": ["x"],
              "cgroup": cg.to_record(), "pid": None, "pid_start": None,
              "network": {"container_id": cid, "bridge": lfs.net.bridge, "table": lfs.net.table,
                          "veth": veth_name(cid), "address": address, "prefixlen": 24,
                          "gateway": lfs.net.gateway, "ports": [], "rules": []}}
    write_record(cdir, record)
    assert cleanup_stale(state) == [cid]
    assert_all_gone(lfs, state, cid)


def test_failed_start_leaves_nothing(lfs: Session, state: Path, config: RuntimeConfig) -> None:
    spec = ContainerSpec(rootfs=lfs.rootfs, argv=["/missing"], network="bridge",
                         ports=[PortMapping(free_port(), 80)], memory=32 << 20)
    with pytest.raises(NotFound, match="/missing"):
        run(spec, state, config)
    assert not (state / "containers" / spec.id).exists()
    assert_all_gone(lfs, state, spec.id)
